"""Exact tests through the whole path, with stub noise predictors whose results are computed by hand.

The stub "UNet" (tests/stubs.py) predicts eps = coef(timestep) * x, pixel by pixel: eps = 0 (the identity
denoiser) or a constant that grows with the diffusers timestep, so that a network called at the wrong timestep
gives a different number. Every expected value below is a closed form written out here (Eq. 3, Tweedie's formula,
the DDPM posterior of Ho et al. as diffusers' DDPMScheduler.step computes it, DDIM with eta = 0, the
clipping-aware observation model), with the random draws reproduced from the same per-image seeds. None of
them calls the function under test.

Level convention (noise.py): abar_0 = 1, abar_t = scheduler.alphas_cumprod[t - 1]; a network call at level t
is a call at diffusers timestep t - 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run as run_cli
from jobs import denoise_alone, png_tensor
from PIL import Image
from stubs import SIZE, StubUNet, eps_linear, eps_zero

from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPResult
from tdpm_dip.methods import Context, Job, run, run_native
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import image_generators, make_scheduler
from tdpm_dip.sampling import EpsModel, ddim_between, ddim_chain, reverse_chain

SCHED = make_scheduler("linear")
AC = SCHED.alphas_cumprod.double()  # abar_t = AC[t - 1]
T_STAR_25 = 57  # anchors.md: sigma 25 -> diffusers timestep 56, level 57
T0 = 10  # defaults.T_TRUNC, the blind TDPM-DIP's DIP target level
DECLIP_SALT = 15485863  # observe.declip draws image i's excess from seed i + this


def ctx_of(unet: StubUNet, batch_size: int = 4) -> Context:
    """A method's context around a stub noise predictor (tests/stubs.py), default DIP settings."""
    return Context(unet, SCHED, batch_size=batch_size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ by hand


def abar(t: int) -> float:
    return 1.0 if t == 0 else float(AC[t - 1])


def level_of_sigma(sigma255: float) -> int:
    """The level whose (1 - abar) / abar is closest to (2 sigma / 255)^2."""
    ratio = ((1 - AC) / AC).numpy()
    return int(np.abs(ratio - (2 * sigma255 / 255) ** 2).argmin()) + 1


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def declip_by_hand(y: torch.Tensor, sigmas: list[float], seeds: list[int]) -> torch.Tensor:
    """A pixel stored at +1 becomes 1 + |n|, at -1 becomes -1 - |n|, with |n| ~ |N(0, (2 sigma / 255)^2)| from
    seed + 15485863; every other pixel stays."""
    excess = draw(tuple(y.shape[1:]), gens([s + DECLIP_SALT for s in seeds])).abs()
    excess = excess * torch.tensor([2 * s / 255 for s in sigmas]).view(-1, 1, 1, 1)
    out = y.clone()
    out[y == 1.0] = 1.0 + excess[y == 1.0]
    out[y == -1.0] = -1.0 - excess[y == -1.0]
    return out


def tweedie_factor(unet: StubUNet, t: int) -> float:
    """Tweedie at level t with eps = c x_t, x_t = sqrt(abar) y: y - sqrt((1 - abar) / abar) c sqrt(abar) y."""
    return 1.0 - unet.coef(t - 1) * math.sqrt(1 - abar(t))


def ddpm_chain_by_hand(
    unet: StubUNet, x: torch.Tensor, t: int, generators: list[torch.Generator], levels: list[int] | None = None
) -> torch.Tensor:
    """t DDPM posterior steps (Ho et al. Alg. 2 as DDPMScheduler.step writes it: clip_sample, fixed_small), or
    with `levels` (t first) the posterior steps from each level to the next one and, from the last, to 0.

    Step from level s to s - 1 calls the network at timestep s - 1: x0 = clip((x - sqrt(1 - abar_s) eps) /
    sqrt(abar_s)), mean = sqrt(abar_{s-1}) beta_s / (1 - abar_s) x0 + sqrt(alpha_s) (1 - abar_{s-1}) / (1 -
    abar_s) x with alpha_s = abar_s / abar_{s-1}, beta_s = 1 - alpha_s, plus sqrt((1 - abar_{s-1}) / (1 -
    abar_s) beta_s) z for every step but the last; z is the next draw of each image's generator.

    The coefficients are computed in float32 from the float32 abar, in diffusers' order: 1 - abar_s /
    abar_{s-1} loses ~3 digits to cancellation at small levels (1e-4 in x after a few steps), the same
    rounding as the code under test, so the comparison can be tight."""
    ac = SCHED.alphas_cumprod  # float32
    one = torch.tensor(1.0)
    path = list(range(t, -1, -1)) if levels is None else [*levels, 0]
    for s, prev in zip(path[:-1], path[1:]):
        a, a_prev = ac[s - 1], (ac[prev - 1] if prev > 0 else one)
        alpha = a / a_prev
        beta = 1 - alpha
        eps = unet.coef(s - 1) * x
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a)) * x
        if prev > 0:
            z = draw(tuple(x.shape[1:]), generators)
            mean = mean + ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20) ** 0.5 * z
        x = mean
    return x


def ddim_by_hand(unet: StubUNet, x: torch.Tensor, levels: list[int], clip: bool = False) -> torch.Tensor:
    """DDIM, eta = 0, over the given levels: x0 = (x - sqrt(1 - a_hi) eps) / sqrt(a_hi) (clipped if asked),
    x <- sqrt(a_lo) x0 + sqrt(1 - a_lo) eps, with eps = c(hi - 1) x."""
    x = x.double()
    for hi, lo in zip(levels[:-1], levels[1:]):
        eps = unet.coef(hi - 1) * x
        x0 = (x - math.sqrt(1 - abar(hi)) * eps) / math.sqrt(abar(hi))
        if clip:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(abar(lo)) * x0 + math.sqrt(1 - abar(lo)) * eps
    return x.float()


def noisy_8bit(h: int, w: int, seed: int, n: int = 1) -> torch.Tensor:
    """n 8-bit observations (sprites on white + noise of std 25, rounded and clipped), as [-1, 1] tensors."""
    rng = np.random.default_rng(seed)
    x = (make_sprites(n, max(h, w), seed=seed).images[:, :, :h, :w].numpy() + 1) * 127.5
    y = np.clip(np.round(x + rng.normal(0, 25, x.shape)), 0, 255)
    return torch.from_numpy(y).float() / 127.5 - 1


# ------------------------------------------------------------------------------------------ 1. eps = 0


def test_identity_denoiser_returns_the_clamped_observation() -> None:
    """eps = 0: Tweedie's posterior mean is y itself; the method returns the (declipped) observation clamped to
    [-1, 1], i.e. y.clamp(-1, 1) (declipped pixels go past +-1 and are clamped back); the ensemble too."""
    y = 1.3 * torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y[:, :, :3] = 1.0  # stored on the bounds: what declip acts on
    y[:, :, -3:] = -1.0
    for method, calls in (("tweedie", 1), ("ensemble", 8)):
        for declip in (False, True):
            unet = eps_zero()
            res = run(ctx_of(unet), "denoise", "blind", method, Job((0, 1, 2), noisy=y, sigma=(25.0,), declip=declip))
            if method == "tweedie":
                assert torch.equal(res.images, y.clamp(-1, 1)), declip
            else:  # the mean of 8 equal terms may round by an ulp
                assert torch.allclose(res.images, y.clamp(-1, 1), rtol=0, atol=1e-6), declip
            assert unet.timesteps == [T_STAR_25 - 1] * calls  # t* = 57: timestep 56, one batch of 3
            assert res.nfe == calls


def test_ensemble_averages_fewer_symmetries_on_large_images() -> None:
    """8 symmetries up to 256 x 256 px, then in proportion to the pixels (at least 1); --symmetries overrides.
    A 368 x 368 image averages 3 (8 * 65536 // 135424): 3 network calls at t*, the identity's output still y."""
    from tdpm_dip.errors import UserError
    from tdpm_dip.methods.blind import ensemble_size

    sizes = [(64, 64), (256, 256), (257, 256), (300, 300), (512, 512), (1024, 1024)]
    assert [ensemble_size(None, h, w) for h, w in sizes] == [8, 8, 7, 5, 2, 1]
    assert ensemble_size(3, 512, 512) == 3 and ensemble_size(8, 1024, 1024) == 8
    for bad in (0, 9):
        with pytest.raises(UserError, match="1 to 8"):
            ensemble_size(bad, 64, 64)
    y = 0.5 * torch.randn(1, 3, 368, 368, generator=torch.Generator().manual_seed(0))
    for symmetries, calls in ((None, 3), (1, 1), (2, 2)):
        unet = eps_zero()
        job = Job((0,), noisy=y, sigma=(25.0,), declip=False, symmetries=symmetries)
        res = run(ctx_of(unet), "denoise", "blind", "ensemble", job)
        assert res.nfe == calls and unet.timesteps == [T_STAR_25 - 1] * calls, symmetries
        assert torch.allclose(res.images, y.clamp(-1, 1), rtol=0, atol=1e-6)


def test_tweedie_with_a_linear_eps_per_image_sigma_and_declip() -> None:
    """eps = c(ts) x: Tweedie's estimate is k(t*) y with k = 1 - c(t* - 1) sqrt(1 - abar_t*); each image at its
    own t* (its own sigma), on its own declipped observation; then clamped."""
    y = noisy_8bit(SIZE, SIZE, seed=1, n=3)
    sigmas, seeds = [10.0, 25.0, 50.0], [4, 5, 6]
    levels = [level_of_sigma(s) for s in sigmas]
    assert levels[1] == T_STAR_25 and len(set(levels)) == 3
    outputs = {}
    for declip in (False, True):
        unet = eps_linear()
        res = run(
            ctx_of(unet), "denoise", "blind", "tweedie", Job(tuple(seeds), noisy=y, sigma=tuple(sigmas), declip=declip)
        )
        obs = declip_by_hand(y, sigmas, seeds) if declip else y
        k = torch.tensor([tweedie_factor(unet, t) for t in levels]).view(-1, 1, 1, 1)
        assert torch.allclose(res.images, (k * obs).clamp(-1, 1), rtol=0, atol=1e-6), declip
        assert sorted(unet.timesteps) == sorted(t - 1 for t in levels)
        outputs[declip] = res.images
    # Not vacuous: the declipped draws survive the clamp in many pixels (|k| < 1), so they are compared.
    assert ((outputs[True] - outputs[False]).abs() > 1e-3).float().mean() > 0.1


# ------------------------------------------------------------------------------------------ 2. chains

# How these catch a chain that calls the network at the wrong timestep: eps = 0.02 (ts + 1) x, so a chain that
# calls it at timestep s (level s + 1, e.g. EpsModel.eps passing `level` instead of `level - 1`, or a sampler
# passing `ts + 1` where `ts` is due) sees eps larger by 0.02 x at every step. The hand chain repeats
# diffusers' float32 arithmetic and matches the code to the last bit; the wrong timestep moves the output by
# 2e-4 after one step (t = 1) and 1.6e-3 after twelve, 200 to 1600 times the tolerance of 1e-6. A step taken
# with the wrong scheduler timestep (sched.step(eps, level, ...)) uses the wrong abar and fails by far more.


def test_reverse_chain_equals_the_ddpm_posterior_by_hand() -> None:
    x = 0.6 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in (1, 2, 12):
        unet = eps_linear()
        got = reverse_chain(EpsModel(unet, SCHED), x, t, image_generators([7, 8]))
        expected = ddpm_chain_by_hand(unet, x, t, gens([7, 8]))
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), t
        assert unet.timesteps == list(range(t - 1, -1, -1))  # level s -> s - 1 at timestep s - 1, t calls
        assert (got.abs() < 1).float().mean() > 0.5  # not all clipped: the eps term is in the result


def test_strided_reverse_chain_is_the_posterior_between_its_levels_by_hand() -> None:
    """steps < t: the true posterior q(x_s | x_t', x0_hat) between round(linspace(t, 0, steps + 1)), one
    network call per level at timestep level - 1."""
    x = 0.6 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for t, steps, levels in ((12, 3, [12, 8, 4]), (400, 10, list(range(400, 0, -40))), (7, 2, [7, 4])):
        unet = eps_linear()
        got = reverse_chain(EpsModel(unet, SCHED), x, t, image_generators([7, 8]), steps=steps)
        expected = ddpm_chain_by_hand(unet, x, t, gens([7, 8]), levels=levels)
        assert torch.allclose(got, expected, rtol=0, atol=1e-5), (t, steps)
        assert unet.timesteps == [s - 1 for s in levels]
    unet = eps_linear()
    full = reverse_chain(EpsModel(unet, SCHED), x, 6, image_generators([7, 8]), steps=6)
    assert torch.equal(full, reverse_chain(EpsModel(unet, SCHED), x, 6, image_generators([7, 8])))
    with pytest.raises(ValueError, match="1..6 steps"):
        reverse_chain(EpsModel(unet, SCHED), x, 6, image_generators([7, 8]), steps=7)


def test_blind_and_paper_ddpm_are_the_chain_by_hand() -> None:
    """The whole path of the ddpm methods: blind scales y to x_t* = sqrt(abar_t*) y and averages K chains
    that continue the same generators; paper draws z first, x_tn = sqrt(abar) x0 + sqrt(1 - abar) z, then
    runs t_noisy steps on the same generators."""
    y = noisy_8bit(8, 8, seed=2, n=3)
    unet = eps_linear(0.005)
    res = run(
        ctx_of(unet, batch_size=2),
        "denoise",
        "blind",
        "ddpm",
        Job((3, 4, 5), noisy=y, sigma=(25.0,), samples=2, declip=False),
    )
    g = gens([3, 4, 5])
    x_t = math.sqrt(abar(T_STAR_25)) * y
    expected = (ddpm_chain_by_hand(unet, x_t, T_STAR_25, g) + ddpm_chain_by_hand(unet, x_t, T_STAR_25, g)) / 2
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6)
    assert res.nfe == 2 * T_STAR_25

    clean = make_sprites(2, SIZE, seed=4).images
    unet = eps_linear()
    res = run(ctx_of(unet), "denoise", "paper", "ddpm", Job((9, 10), clean=clean, t_noisy=20))
    g = gens([9, 10])
    x_tn = math.sqrt(abar(20)) * clean + math.sqrt(1 - abar(20)) * draw((3, SIZE, SIZE), g)
    assert torch.allclose(res.inputs, x_tn, rtol=0, atol=1e-6)
    assert torch.allclose(res.images, ddpm_chain_by_hand(unet, x_tn, 20, g), rtol=0, atol=1e-6)
    assert unet.timesteps == list(range(19, -1, -1))


def test_ddim_between_equals_its_closed_form() -> None:
    """Deterministic DDIM from level 57 to 0 in 5 calls, on the levels round(linspace(57, 0, 6)) = 57, 46, 34,
    23, 11, 0. With eps = c x every step multiplies x by sqrt(a_lo) (1 - sqrt(1 - a_hi) c) / sqrt(a_hi) +
    sqrt(1 - a_lo) c; `clip` clamps each x0."""
    levels = [57, 46, 34, 23, 11, 0]
    x = 0.9 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    unet = eps_linear()
    got = ddim_between(EpsModel(unet, SCHED), x, 57, 0, 5)
    factor = 1.0
    for hi, lo in zip(levels[:-1], levels[1:]):
        c = unet.coef(hi - 1)
        factor *= (
            math.sqrt(abar(lo)) * (1 - math.sqrt(1 - abar(hi)) * c) / math.sqrt(abar(hi)) + math.sqrt(1 - abar(lo)) * c
        )
    assert torch.allclose(got, factor * x, rtol=1e-5, atol=1e-6)
    assert unet.timesteps == [hi - 1 for hi in levels[:-1]]
    unet = eps_linear()
    got = ddim_between(EpsModel(unet, SCHED), x, 57, 0, 5, clip=True)
    assert torch.allclose(got, ddim_by_hand(unet, x, levels, clip=True), rtol=1e-5, atol=1e-6)
    # A partial path (t_to > 0) stops at level t_to: levels 30, 20, 10.
    unet = eps_linear()
    got = ddim_between(EpsModel(unet, SCHED), x, 30, 10, 2)
    assert torch.allclose(got, ddim_by_hand(unet, x, [30, 20, 10]), rtol=1e-5, atol=1e-6)
    # The blind ddim method: the same chain from sqrt(abar_57) y, clamped.
    y = noisy_8bit(8, 8, seed=3, n=2)
    unet = eps_linear()
    res = run(ctx_of(unet), "denoise", "blind", "ddim", Job((0, 1), noisy=y, sigma=(25.0,), ddim_steps=5, declip=False))
    assert torch.allclose(res.images, (factor * math.sqrt(abar(57)) * y).clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_ddim_chain_from_noise_equals_its_closed_form() -> None:
    """Generation DDIM, 4 steps, "trailing" spacing: timesteps 999, 749, 499, 249, each step to the timestep 250
    lower (abar = 1 after the last), x0 clipped to [-1, 1] (the DDPM's clip_sample), eta = 0."""
    unet = eps_linear(1e-3)
    x_T = 0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    got = ddim_chain(EpsModel(unet, SCHED), x_T, 4, image_generators([0, 1]))
    x = x_T.double()
    for ts in (999, 749, 499, 249):
        a, a_prev = float(AC[ts]), (float(AC[ts - 250]) if ts >= 250 else 1.0)
        eps = unet.coef(ts) * x
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    assert unet.timesteps == [999, 749, 499, 249]
    assert torch.allclose(got, x.float(), rtol=0, atol=1e-5)
    assert (got.abs() < 1).float().mean() > 0.3  # not all clipped: eps is in the result


# ------------------------------------------------------------------------------------------ 3. native size


def test_run_native_maps_every_pixel_back_to_its_place() -> None:
    """An odd-sized observation (13 x 19) is reflect-padded to a side the networks accept and cropped back:
    with the identity denoiser the output is the declipped observation, clamped, i.e. y itself, pixel for
    pixel; with eps = c x it is k y, clamped. A crop from the wrong corner or a shifted pad moves the
    pixels and fails."""
    y = noisy_8bit(13, 19, seed=7, n=2)
    seeds = (11, 12)
    unet = eps_zero()
    res = run_native(ctx_of(unet), "tweedie", Job(seeds, noisy=y, sigma=(25.0,)))
    assert res.images.shape == (2, 3, 13, 19)
    assert unet.shapes == [(2, 3, 16, 24)]  # padded to a multiple of 8 (the default DIP preset's 4 levels)
    expected = declip_by_hand(y, [25.0, 25.0], list(seeds)).clamp(-1, 1)
    assert torch.equal(expected, y) and torch.equal(res.images, expected)
    assert torch.equal(res.inputs, y)
    for method in ("tweedie", "ensemble"):
        unet = eps_linear()
        res = run_native(ctx_of(unet), method, Job(seeds, noisy=y, sigma=(25.0,), declip=False))
        k = tweedie_factor(unet, T_STAR_25)
        assert torch.allclose(res.images, (k * y).clamp(-1, 1), rtol=0, atol=1e-6), method


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return path


def test_cli_input_folder_maps_each_file_to_its_own_output(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`denoise --input DIR` on files of two sizes (two of them the same size, so they share a batch): the output
    file of image i (sorted names) equals the method run in-process on that image alone with seed SEED + i.
    A mix-up between files, between seeds or between the images of one batch fails."""
    from tdpm_dip.api import Denoiser
    from tdpm_dip.images import to_uint8

    folder = tmp_path / "noisy"
    folder.mkdir()
    sizes = {"a": (13, 19), "b": (16, 16), "c": (13, 19)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        y = noisy_8bit(h, w, seed=20 + i)[0]
        Image.fromarray(((y + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    out, seed = tmp_path / "out", 5
    code, _, err = run_cli(
        [
            "denoise",
            "--model",
            tiny_model,
            "--input",
            folder,
            "--sigma",
            "25",
            "--method",
            "tweedie",
            "--method",
            "ddpm",
            "--samples",
            "1",
            "--seed",
            seed,
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    den = Denoiser.from_pretrained(str(tiny_model), device="cpu")  # the context the CLI builds
    for method in ("tweedie", "ddpm"):
        for i, name in enumerate(sorted(sizes)):
            x = png_tensor(folder / f"{name}.png")
            got = np.asarray(Image.open(out / method / f"{name}.png"))
            expected = denoise_alone(den.ctx, x, method, seed + i, 25.0, samples=1)
            # The CLI ran a and c in one batch: float sums may differ in the last bit, a level at most.
            assert got.shape == expected.shape == (*sizes[name], 3)
            diff = np.abs(got.astype(int) - expected.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (method, name, diff.max(), (diff > 0).mean())
            # ... and the comparison tells seeds apart (declip's draws, the chain's noise).
            other = denoise_alone(den.ctx, x, method, seed + i + 1, 25.0, samples=1)
            assert np.abs(other.astype(int) - got.astype(int)).max() > 1, (method, name)
            assert np.array_equal(np.asarray(Image.open(out / "noisy" / f"{name}.png")), to_uint8(x))


# ------------------------------------------------------------------------------------------ 4. TDPM-DIP's start


def test_blind_tdpm_dip_starts_each_chain_from_the_rescaled_dip_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """job.t_trunc None: the DIP is fitted to x_T0 = sqrt(abar_T0) x_hat + sqrt(1 - abar_T0) z (T0 = 10, z the
    image's first draw) and G(z) misses it by a known mean square error e; the chain of that image starts at
    the first level t with (1 - abar_t) / abar_t >= ((1 - abar_T0) + e) / abar_T0, kept in [T0, t*], from
    sqrt(abar_t / abar_T0) G(z), once per sample, with the image's own generator."""
    from tdpm_dip.methods import blind, common

    seeds = [3, 4, 5]
    errors = [0.0, 0.1, 1.0]  # G(z) = target + e_i * (+-1 pattern): mean square error e_i^2
    y = noisy_8bit(SIZE, SIZE, seed=8, n=3)
    pattern = torch.where(torch.arange(3 * SIZE * SIZE).view(3, SIZE, SIZE) % 2 == 0, 1.0, -1.0)
    seen: dict = {"fit": [], "chain": []}

    def fake_fit(ctx, target, z, fit_seeds, reference, cfg=None):
        seen["fit"].append((target.clone(), z.clone(), list(fit_seeds)))
        out = target + torch.tensor(errors).view(-1, 1, 1, 1) * pattern
        return DIPResult(out, torch.zeros(1, target.shape[0]))

    def fake_chain(ctx, x_t, t, chain_gens, desc):
        seen["chain"].append((x_t.clone(), t, [g.initial_seed() for g in chain_gens]))
        return x_t

    monkeypatch.setattr(blind, "fit", fake_fit)
    monkeypatch.setattr(common, "chain", fake_chain)
    res = run(
        ctx_of(eps_zero()),
        "denoise",
        "blind",
        "tdpm-dip",
        Job(tuple(seeds), noisy=y, sigma=(25.0,), samples=2, declip=False),
    )

    # the DIP target, by hand: x_hat = y (eps = 0), z = the first draw of each image's generator
    ((target, z, fit_seeds),) = seen["fit"]
    assert fit_seeds == seeds and torch.equal(z, draw((3, SIZE, SIZE), gens(seeds)))
    a0 = abar(T0)
    assert torch.allclose(target, math.sqrt(a0) * y + math.sqrt(1 - a0) * z, rtol=0, atol=1e-6)
    g_out = target + torch.tensor(errors).view(-1, 1, 1, 1) * pattern

    # the start levels, by hand
    ratio = ((1 - AC) / AC).numpy()
    levels = []
    for e in errors:
        need = ((1 - a0) + e**2) / a0
        first = int(np.nonzero(ratio >= need)[0][0]) + 1
        levels.append(min(max(first, T0), T_STAR_25))
    assert levels[0] == T0 and levels[2] == T_STAR_25 and T0 < levels[1] < T_STAR_25  # three groups
    assert res.info["t_trunc"] == levels

    # each chain: one per level and sample, lowest level first, from sqrt(abar_t / abar_T0) G(z)
    assert [t for _, t, _ in seen["chain"]] == levels * 2
    for x_t, t, chain_seeds in seen["chain"]:
        i = levels.index(t)
        assert chain_seeds == [seeds[i]]
        assert torch.allclose(x_t, math.sqrt(abar(t) / a0) * g_out[i : i + 1], rtol=1e-6, atol=0), t
    starts = torch.cat([math.sqrt(abar(t) / a0) * g_out[i : i + 1] for i, t in enumerate(levels)])
    assert torch.allclose(res.images, starts.clamp(-1, 1), rtol=1e-6, atol=0)  # in the images' order

    # job.t_trunc given: every chain starts at it, from G(z) itself (the report's Algorithm 3)
    seen["chain"].clear()
    run(
        ctx_of(eps_zero()),
        "denoise",
        "blind",
        "tdpm-dip",
        Job(tuple(seeds), noisy=y, sigma=(25.0,), samples=1, declip=False, t_trunc=5),
    )
    ((x_t, t, chain_seeds),) = seen["chain"]
    target5 = seen["fit"][-1][0]
    assert t == 5 and chain_seeds == seeds
    assert torch.allclose(target5, math.sqrt(abar(5)) * y + math.sqrt(1 - abar(5)) * z, rtol=0, atol=1e-6)
    assert torch.allclose(x_t, target5 + torch.tensor(errors).view(-1, 1, 1, 1) * pattern, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ 5. declip


def test_declip_moves_only_the_pixels_on_the_bounds_outwards() -> None:
    """A pixel stored at -1 becomes -1 - |excess| (strictly below -1), at +1 becomes 1 + |excess|, anything else
    stays; the excess of image i is |N(0, 1)| * 2 sigma_i / 255 from seed_i + 15485863 (recomputed here)."""
    from tdpm_dip.methods.observe import declip

    y = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8).clone()
    y[:, :, 0] = -1.0
    y[:, :, 1] = 1.0
    y[:, 0, 2] = 1.2  # an unclipped (float) observation beyond the bound stays as it is
    sigmas, seeds = [10.0, 40.0], [3, 8]
    got = declip(y, sigmas, seeds)
    excess = draw((3, 8, 8), gens([s + DECLIP_SALT for s in seeds])).abs()
    excess = excess * torch.tensor([2 * 10.0 / 255, 2 * 40.0 / 255]).view(2, 1, 1, 1)
    lo, hi = y == -1.0, y == 1.0
    assert torch.equal(got[lo], -1.0 - excess[lo]) and (got[lo] < -1).all()
    assert torch.equal(got[hi], 1.0 + excess[hi]) and (got[hi] > 1).all()
    assert torch.equal(got[~lo & ~hi], y[~lo & ~hi])
    assert lo.sum() >= 2 * 3 * 8 and hi.sum() >= 2 * 3 * 8


def test_run_native_pads_an_image_smaller_than_the_networks_multiple() -> None:
    """A 9x9 image for networks whose sides must be multiples of 32 (six levels, as the report's DDPM):
    reflection pads in passes; the crop gives back the 9x9 observation exactly (eps = 0)."""
    from stubs import eps_zero

    from tdpm_dip.methods import Context, Job, run_native
    from tdpm_dip.noise import make_scheduler

    net = eps_zero()
    net.config["block_out_channels"] = (8, 8, 8, 8, 8, 8)
    ctx = Context(net, make_scheduler("linear"), batch_size=2)
    y = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    res = run_native(ctx, "tweedie", Job((0, 1), noisy=y, sigma=(25.0,), declip=False))
    assert res.images.shape == (2, 3, 9, 9) and torch.equal(res.images, y)

"""Blind denoising and the method registry, on tiny networks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from jobs import denoise_alone, denoise_blind, denoise_paper, png_tensor
from PIL import Image
from stubs import eps_zero

from tdpm_dip import registry
from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig, DIPResult, dip_defaults
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, run_native
from tdpm_dip.methods.blind import ensemble_estimate as ensemble_tweedie
from tdpm_dip.methods.blind import start_level
from tdpm_dip.methods.blind import tweedie_estimate as tweedie
from tdpm_dip.methods.observe import declip, estimate_sigma
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import abar, add_noise, make_scheduler, sigma_to_level

SIZE = 16


@pytest.fixture(scope="module")
def ctx() -> Context:
    cfg = DIPConfig(preset="dip-tiny", iters=3, lr=1e-3, input_noise=1.0, average=0.9)
    from tdpm_dip.generator import TDPMGenerator as Generator

    # An untrained G_psi at T_trunc 2 (the T_trunc of _job_for), so amortized `tdpm` runs like every method.
    gen = Generator(build_unet("generator-small", seed=1, sample_size=SIZE).eval(), 2, (3, SIZE, SIZE), {}, "random")
    return Context(
        build_unet("tiny", seed=0, sample_size=SIZE),
        make_scheduler("linear"),
        cfg,
        batch_size=4,
        dip_plugin=DIPConfig(preset="dip-tiny", iters=3, lr=1e-3),
        generator=gen,
    )


@pytest.fixture(scope="module")
def sprites() -> torch.Tensor:
    return make_sprites(4, SIZE, seed=5).images


# ------------------------------------------------------------------------------ observation model


def test_clipped_noise_is_what_an_8bit_file_holds(sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "clipped")
    levels = (y + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # integer 8-bit levels
    assert levels.min() >= 0 and levels.max() <= 255
    assert (levels == 255).float().mean() > 0.05  # the sprites' white background clips
    f = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    assert f.max() > 1.0  # the float model is not clipped
    # Same draws: where the float observation stays inside the range, the clipped one is its rounding.
    inside = (f > -1) & (f < 1)
    assert torch.allclose(y[inside], (torch.round((f[inside] + 1) * 127.5)) / 127.5 - 1, atol=1e-5)


def test_declip_restores_the_noise_std_on_a_white_background() -> None:
    white = torch.ones(2, 3, 64, 64)
    y = add_noise(white, 25, [0, 1], "clipped")
    s = 2 * 25 / 255
    assert (y - 1).std() < 0.7 * s  # clipping removed most of the noise
    d = declip(y, [25.0, 25.0], [0, 1])
    assert abs(float((d - 1).std()) - s) < 0.1 * s and abs(float((d - 1).mean())) < 0.1 * s
    inside = (y > -1) & (y < 1)
    assert torch.equal(d[inside], y[inside])  # pixels inside the range are untouched
    f = add_noise(white, 25, [0, 1], "float")
    assert torch.equal(declip(f, [25.0, 25.0], [0, 1]), f)  # unclipped inputs pass through


def test_bad_noise_model_is_a_user_error(sprites: torch.Tensor) -> None:
    with pytest.raises(UserError):
        add_noise(sprites, 25, [0, 1, 2, 3], "poisson")
    with pytest.raises(UserError):
        add_noise(sprites, 300, [0, 1, 2, 3])


# ------------------------------------------------------------------------------ estimators


def test_tweedie_equals_its_closed_form(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    t = sigma_to_level(ctx.scheduler, 25)
    a = abar(ctx.scheduler, t)
    with torch.no_grad():
        eps = ctx.unet(math.sqrt(a) * y, t - 1).sample
    expected = (math.sqrt(a) * y - math.sqrt(1 - a) * eps) / math.sqrt(a)
    assert torch.allclose(tweedie(ctx, y, [t] * 4), expected, atol=1e-5)
    res = denoise_blind(ctx, y, "tweedie", [0, 1, 2, 3], 25)
    assert res.nfe == 1 and torch.allclose(res.images, expected.clamp(-1, 1), atol=1e-5)


def test_ensemble_is_the_mean_over_the_symmetries_and_equivariant(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    t = [sigma_to_level(ctx.scheduler, 25)] * 4
    e = ensemble_tweedie(ctx, [y] * 8, t)
    assert torch.allclose(ensemble_tweedie(ctx, [y], t), tweedie(ctx, y, t), atol=1e-6)
    # Averaging over the whole group makes the estimator equivariant: flipping y flips the output.
    assert torch.allclose(ensemble_tweedie(ctx, [y.flip(-1)] * 8, t), e.flip(-1), atol=1e-5)
    assert torch.allclose(ensemble_tweedie(ctx, [y.transpose(-1, -2)] * 8, t), e.transpose(-1, -2), atol=1e-5)


def test_mean_of_k_chains_has_lower_variance_than_one(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites[:1].repeat(6, 1, 1, 1), 10, [0] * 6, "float")  # one observation, six seeds
    seeds = list(range(10, 16))
    one = denoise_blind(ctx, y, "ddpm", seeds, 10, samples=1).images
    four = denoise_blind(ctx, y, "ddpm", seeds, 10, samples=4).images
    assert four.var(0).mean() < 0.5 * one.var(0).mean()
    assert denoise_blind(ctx, y[:1], "ddpm", [0], 10, samples=4).nfe == 4 * sigma_to_level(ctx.scheduler, 10)


def test_start_level_rule_matches_a_known_fit_error() -> None:
    """A DIP that misses its x_T0 target by a known mean square error starts the chain where the noise
    variance covers target noise plus that error; a perfect fit starts at T0; never above t*."""
    sched = make_scheduler("linear")
    a0 = abar(sched, 10)
    assert start_level(sched, 10, 0.0, cap=57) == 10
    for std in (0.05, 0.1):  # the DIP's error, on [-1, 1] images
        t = start_level(sched, 10, std**2, cap=1000)
        ratio = (1 - abar(sched, t)) / abar(sched, t)
        expected = ((1 - a0) + std**2) / a0
        below = (1 - abar(sched, t - 1)) / abar(sched, t - 1)
        assert below < expected <= ratio  # the first level that covers it
    assert start_level(sched, 10, 0.5, cap=57) == 57
    # The error of a real fit is what the rule reads: the blind estimate's level is that of its DIP.
    rng = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 32, 32)
    g = x + 0.1 * torch.randn(x.shape, generator=rng)
    mse = float(((g - x) ** 2).mean())
    assert abs(mse - 0.01) < 0.001 and start_level(sched, 10, mse, 1000) == start_level(sched, 10, 0.01, 1000)


def test_native_size_keeps_the_exact_size_and_aspect(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    y = add_noise(make_sprites(1, 20, seed=1).images[:, :, :, :13].contiguous(), 25, [0], "clipped")
    for method in ("ensemble", "tdpm-dip"):
        res = run_native(ctx, method, Job((0,), noisy=y, sigma=(25.0,)))
        assert res.images.shape == y.shape == (1, 3, 20, 13)
        assert torch.isfinite(res.images).all()
    # Content: every output pixel comes from its own input pixel (the crop undoes the reflect pad, 13 -> 14
    # columns here). With the identity denoiser (eps = 0, tests/stubs.py) the ensemble returns the declipped y
    # clamped, i.e. y itself.
    from tdpm_dip.methods import blind

    ident = dataclasses.replace(ctx, unet=eps_zero(), dip_memo={})
    res = run_native(ident, "ensemble", Job((0,), noisy=y, sigma=(25.0,)))
    assert torch.allclose(res.images, y, rtol=0, atol=1e-6)
    # tdpm-dip, with a DIP that fits its target x_T0 exactly: the chain starts at T0 from sqrt(abar_T0) y +
    # sqrt(1 - abar_T0) z, and with eps = 0 its 10 steps remove no noise: y plus noise of std ~0.05, far closer
    # to y than y is to itself moved by one pixel.
    monkeypatch.setattr(
        blind,
        "fit",
        lambda c, target, z, seeds, ref, cfg=None: DIPResult(target.clone(), torch.zeros(1, target.shape[0])),
    )
    res = run_native(ident, "tdpm-dip", Job((0,), noisy=y, sigma=(25.0,), samples=1))
    assert res.images.shape == y.shape and res.info["t_trunc"] == 10

    def mse(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b) ** 2).mean())

    moved = min(mse(y[..., 1:, :], y[..., :-1, :]), mse(y[..., :, 1:], y[..., :, :-1]))
    assert mse(res.images, y) < 0.1 * moved, (mse(res.images, y), moved)  # ~0.002 against ~0.1


# ------------------------------------------------------------------------------ the registry


def test_every_blind_method_depends_only_on_its_own_seed(ctx: Context, sprites: torch.Tensor) -> None:
    """Image i's output is the same alone, in a batch, with another batch size."""
    y = add_noise(sprites, 25, [7, 8, 9, 10], "clipped")
    import dataclasses

    for m in registry.methods("denoise", "blind"):
        if m.extra:
            continue
        full = denoise_blind(ctx, y, m.name, [7, 8, 9, 10], 25, samples=2).images
        small = denoise_blind(
            dataclasses.replace(ctx, batch_size=1, dip_memo={}), y[2:3], m.name, [9], 25, samples=2
        ).images
        # DIP fits: vmapped (batch) and plain (alone) networks round differently, as in test_core's batched fit
        assert torch.allclose(full[2], small[0], atol=1e-4 if m.uses_dip else 1e-5), m.name


def test_cli_choices_are_the_registry() -> None:
    from tdpm_dip.cli import cli

    den = {p.name: p for p in cli.commands["denoise"].params}
    assert set(den["methods"].type.choices) == set(registry.names("denoise"))
    gen = {p.name: p for p in cli.commands["generate"].params}
    assert set(gen["method"].type.choices) == set(registry.names("generate"))
    assert registry.names("denoise", "blind")[0] == "ensemble"  # the recommended method comes first
    with pytest.raises(UserError, match="paper protocol"):
        registry.get("generate", "blind", "tdpm-dip")  # it exists, under another protocol: the error says which


def test_dip_defaults_have_one_home() -> None:
    assert dip_defaults("paper", "paper-dip") == DIPConfig(preset="paper-dip", iters=100, lr=1e-4)
    blind = dip_defaults("blind", "dip-small")
    assert blind.iters == 400 and blind.input_noise > 0 and blind.average is not None
    assert dip_defaults("blind", "dip-small", iters=7, lr=2e-3).iters == 7
    assert dip_defaults("plugin", "dip-small").input_noise == 0  # its target holds z: it must fit it exactly


# ------------------------------------------------------------------------------ the user's path (CLI)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return path


@pytest.fixture(scope="module")
def noisy_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8-bit noisy PNGs of two sizes, one of them not square, as a user's files."""
    root = tmp_path_factory.mktemp("files")
    folder, clean = root / "noisy", root / "clean"
    folder.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(24, 24), (20, 30), (24, 24)]):
        x = (make_sprites(1, max(h, w), seed=i).images[0, :, :h, :w].permute(1, 2, 0).numpy() + 1) * 127.5
        y = np.clip(np.round(x + rng.normal(0, 25, x.shape)), 0, 255).astype(np.uint8)
        Image.fromarray(y).save(folder / f"img{i}.png")
        Image.fromarray(np.round(x).astype(np.uint8)).save(clean / f"img{i}.png")
    return folder


@pytest.mark.parametrize("sigma", [["--sigma", "25"], []])
def test_denoise_input_keeps_each_files_size(
    model: Path, noisy_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture, sigma: list[str]
) -> None:
    import json

    from tdpm_dip.api import Denoiser
    from tdpm_dip.embedded import default_ddpm
    from tdpm_dip.images import to_uint8

    out = tmp_path / "den"
    code, stdout, err = run(
        [
            "denoise",
            "--model",
            model,
            "--input",
            noisy_files,
            *sigma,
            "--method",
            "tweedie",
            "--method",
            "ensemble",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    sigmas = json.loads((out / "metrics.json").read_text())["sigma"]  # given, or estimated per image
    den = Denoiser.from_pretrained(str(model), device="cpu")  # the context the command builds
    for i, name in enumerate(("img0", "img1", "img2")):
        size = Image.open(noisy_files / f"{name}.png").size
        x = png_tensor(noisy_files / f"{name}.png")
        assert np.array_equal(np.asarray(Image.open(out / "noisy" / f"{name}.png")), to_uint8(x))
        for m in ("tweedie", "ensemble"):
            got = np.asarray(Image.open(out / m / f"{name}.png"))
            assert got.shape == (size[1], size[0], 3)
            # Content: the file of image i is the method run on that image alone with seed i (the default
            # --seed 0): the pad is cropped off at the right corner and no file gets another's output. img0 and
            # img2 share a batch; float sums may then differ in the last bit: one 8-bit level at most.
            diff = np.abs(got.astype(int) - denoise_alone(den.ctx, x, m, i, sigmas[i]).astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (m, name, diff.max())
    assert (out / "comparison.png").is_file() and "ensemble" in (out / "metrics.md").read_text()
    if not sigma:
        assert "estimated sigma" in err
    # Scored against the clean originals: every method beats its noisy input, on every image. The untrained
    # tiny DDPM above cannot (its outputs score ~1 dB below the input), so this run takes the 32 px sprite DDPM
    # shipped in the package, trained on sprites like these: +4.7 to +7.4 dB per image here.
    scored = tmp_path / "scored"
    code, stdout, err = run(
        [
            "denoise",
            "--model",
            default_ddpm("generate"),
            "--input",
            noisy_files,
            *sigma,
            "--method",
            "tweedie",
            "--method",
            "ensemble",
            "--reference",
            noisy_files.parent / "clean",
            "--device",
            "cpu",
            "--out",
            scored,
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((scored / "metrics.json").read_text())
    assert [r["method"] for r in metrics["rows"]] == ["tweedie", "ensemble"]
    for row in metrics["rows"]:
        assert row["input PSNR"] < 25 and row["PSNR"] > row["input PSNR"] + 3, row
        assert math.isfinite(row["PSNR"]) and 0 < row["SSIM"] <= 1
    for image in metrics["images"]:
        for m in ("tweedie", "ensemble"):
            assert image[m]["PSNR"] > image["input"]["PSNR"] + 3, (image["name"], m, image)
            assert image[m]["SSIM"] > image["input"]["SSIM"], (image["name"], m, image)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--samples", "0"], "--samples"),
        (["--noise", "poisson"], "--noise"),
        (["--sigma", "0"], "--sigma"),
        (["--method", "tweedie", "--protocol", "paper"], "paper protocol"),
    ],
)
def test_bad_denoise_options_are_one_line_errors(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], fragment: str
) -> None:
    code, _, err = run(["denoise", "--model", model, "--clean", sprite_dir, *args, "--out", tmp_path / "x"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_denoise_clean_reports_the_noise_model(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    for noise in ("clipped", "float"):
        out = tmp_path / noise
        code, _, err = run(
            [
                "denoise",
                "--model",
                model,
                "--clean",
                sprite_dir,
                "--n",
                "2",
                "--noise",
                noise,
                "--method",
                "tweedie",
                "--out",
                out,
            ],
            capsys,
        )
        assert code == 0, err
        rows = json.loads((out / "metrics.json").read_text())["rows"]
        assert rows[0]["noise"].startswith(noise) and rows[0]["NFE"] == 1


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_sigma_estimator_reads_8bit_clipped_files(sigma: float) -> None:
    """Without --sigma the noise level is estimated: within 10 % of the sigma added, on 8-bit files that clipped
    it (white-background sprites, a white and a black image: half their noise clipped) and on unclipped noise
    over a flat grey image (the wavelet estimator where nothing saturates)."""
    sprites = make_sprites(4, 64, seed=3).images
    cases = [
        (sprites, "clipped"),
        (torch.ones(1, 3, 64, 64), "clipped"),
        (-torch.ones(1, 3, 64, 64), "clipped"),
        (torch.zeros(2, 3, 64, 64), "clipped"),
        (torch.zeros(2, 3, 64, 64), "float"),
    ]
    for images, model in cases:
        est = estimate_sigma(add_noise(images, sigma, list(range(images.shape[0])), model))
        assert all(abs(e - sigma) < 0.1 * sigma for e in est), (model, images.mean().item(), est)


def test_a_plain_wavelet_estimate_reads_clipped_noise_low() -> None:
    """Why the estimator looks for saturated regions: skimage's wavelet MAD on a clipped white image reads the
    one-sided remnant of the noise, far below the sigma added."""
    from skimage.restoration import estimate_sigma as wavelet

    y = add_noise(torch.ones(1, 3, 64, 64), 25, [0], "clipped")[0]
    plain = wavelet(((y.permute(1, 2, 0) + 1) / 2).numpy(), channel_axis=-1, average_sigmas=True) * 255
    assert plain < 0.75 * 25 and abs(estimate_sigma(y[None])[0] - 25) < 2.5


def _job_for(m: registry.Method, x: torch.Tensor, seeds: tuple[int, ...]) -> Job:
    if m.task == "generate":
        return Job(seeds, reference=x, t_trunc=2, ddim_steps=3)
    return Job(seeds, clean=x, t_noisy=6, t_trunc=2)


@pytest.mark.parametrize("task, protocol", [("denoise", "paper"), ("generate", "unconditional"), ("generate", "paper")])
def test_paper_and_generation_methods_depend_only_on_their_own_seed(
    ctx: Context, sprites: torch.Tensor, task: str, protocol: str
) -> None:
    """Every paper-protocol and generation method of the registry: image i alone (batch size 1) equals
    image i among others (batch size 4), ancestral DDPM chains included."""
    import dataclasses

    from tdpm_dip.methods import run as run_method

    for m in registry.methods(task, protocol):
        full = run_method(ctx, task, protocol, m.name, _job_for(m, sprites, (3, 4, 5, 6))).images
        alone = run_method(
            dataclasses.replace(ctx, batch_size=1, dip_memo={}), task, protocol, m.name, _job_for(m, sprites[2:3], (5,))
        ).images
        # Rounding differs between batch sizes; DIP fits (vmapped vs plain) and DDIM's first step from pure
        # noise (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), abar_T ~ 4e-5) amplify it. A seed mix-up is O(1).
        tol = 1e-3 if (m.name == "ddim" and task == "generate") else 1e-4 if m.uses_dip else 1e-5
        assert torch.allclose(full[2], alone[0], atol=tol), m.name


def test_paper_dip_target_is_the_oracle_formula(
    ctx: Context, sprites: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper protocol's DIP fits x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z with the clean x0 and the very
    z that is the DIP's input; the blind tdpm-dip's target has the same form with the ensemble estimate."""
    from tdpm_dip.methods import blind, common, paper

    seen = []
    real = common.fit

    def spy(c, target, z, seeds, reference, cfg=None):
        seen.append((target.clone(), z.clone()))
        return real(c, target, z, seeds, reference, cfg)

    monkeypatch.setattr(paper, "fit", spy)
    monkeypatch.setattr(blind, "fit", spy)
    denoise_paper(ctx, sprites[:2], "tdpm-dip", [0, 1], t_noisy=20, t_trunc=5)
    target, z = seen[-1]
    a = abar(ctx.scheduler, 5)
    assert torch.allclose(target, math.sqrt(a) * sprites[:2] + math.sqrt(1 - a) * z, atol=1e-6)
    y = add_noise(sprites[:2], 25, [0, 1], "clipped")
    denoise_blind(ctx, y, "tdpm-dip", [0, 1], 25, samples=1)
    target, z = seen[-1]
    x_hat = ensemble_tweedie(ctx, [declip(y, [25.0, 25.0], [0, 1])] * 8, [sigma_to_level(ctx.scheduler, 25)] * 2)
    a = abar(ctx.scheduler, 10)
    assert torch.allclose(target, math.sqrt(a) * x_hat + math.sqrt(1 - a) * z, atol=1e-5)

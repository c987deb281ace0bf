"""Behaviour the other tests left open, found by mutation testing (docs/mutation.md, `make mutation`).

Each test pins something a user or a caller relies on, with stub networks whose outputs are known by hand
(tests/stubs.py) and closed forms written out here; none of them calls the function under test to get its expected
value. One-line errors are asserted in full where a user reads them (the CLI prints them as they are).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stubs import SIZE, StubConfig, StubUNet, eps_linear, eps_zero
from test_exact import AC, SCHED, T0, T_STAR_25, abar, ddpm_chain_by_hand, draw, gens, noisy_8bit

from tdpm_dip.errors import UserError
from tdpm_dip.noise import (
    check_level,
    check_t_trunc,
    image_generators,
    make_scheduler,
    num_levels,
    randn,
    sigma_to_level,
)
from tdpm_dip.sampling import EpsModel, ddim_between, ddim_chain, reverse_chain


def linear_abar(T: int = 1000) -> torch.Tensor:
    """Ho et al.'s schedule: betas linear from 1e-4 to 0.02 over T steps, abar_t = prod (1 - beta_s)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_abar(T: int = 1000) -> torch.Tensor:
    """Nichol and Dhariwal's schedule: abar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2, s = 0.008,
    through betas clipped at 0.999."""
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = torch.tensor([min(1 - f[t + 1] / f[t], 0.999) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


# ------------------------------------------------------------------------------------------ noise.py


def test_schedulers_are_the_published_schedules() -> None:
    """linear (the default) is Ho et al.'s 1000-step schedule, cosine Nichol and Dhariwal's; both clip the predicted
    x0 to [-1, 1] and predict eps; any T is honoured."""
    for sched, expected in (
        (make_scheduler(), linear_abar()),
        (make_scheduler("linear"), linear_abar()),
        (make_scheduler("cosine"), cosine_abar()),
        (make_scheduler("linear", 50), linear_abar(50)),
        (make_scheduler("squaredcos_cap_v2", 20), cosine_abar(20)),
    ):
        assert num_levels(sched) == len(expected)
        assert torch.allclose(sched.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
        assert sched.config.clip_sample is True and sched.config.prediction_type == "epsilon"
    with pytest.raises(UserError) as e:
        make_scheduler("quadratic")
    assert str(e.value) == "unknown schedule 'quadratic'; choose linear or cosine"


def test_level_checks_accept_exactly_their_range_and_say_so() -> None:
    """A noise level is an integer in [0, T]; T_trunc one in [0, T - 1]. The messages are what the CLI prints."""
    s = make_scheduler("linear", 100)
    for t in (0, 1, 99, 100):
        assert check_level(s, t) == t
    for t in (-1, 101, 2.0):
        with pytest.raises(UserError) as e:
            check_level(s, t)  # type: ignore[arg-type]
        assert str(e.value) == f"t must be an integer in [0, 100], got {t}"
    with pytest.raises(UserError) as e:
        check_level(s, 101, "--t-noisy")
    assert str(e.value) == "--t-noisy must be an integer in [0, 100], got 101"
    for t in (0, 1, 98, 99):
        assert check_t_trunc(s, t) == t
    for t in (-1, 100, 5.0):
        with pytest.raises(UserError) as e:
            check_t_trunc(s, t)  # type: ignore[arg-type]
        assert str(e.value) == f"T_trunc must be an integer in [0, 99], got {t}"


def test_sigma_levels_of_both_schedules_by_hand() -> None:
    """t* is the level whose (1 - abar) / abar is closest to (2 sigma / 255)^2, on the schedule given."""
    for name, ac in (("linear", linear_abar()), ("cosine", cosine_abar())):
        ratio = (1 - ac) / ac
        for sigma in (1.0, 5.0, 25.0, 80.0, 255.0):
            expected = int((ratio - (2 * sigma / 255) ** 2).abs().argmin()) + 1
            assert sigma_to_level(make_scheduler(name), sigma) == expected, (name, sigma)


def test_image_generators_and_randn_draw_per_image_streams() -> None:
    """Row i of randn is torch.randn from seed i (on the CPU by default), whatever the other seeds."""
    g = image_generators([5, 7])
    assert [x.device.type for x in g] == ["cpu", "cpu"] and [x.initial_seed() for x in g] == [5, 7]
    x = randn((2, 3), image_generators(range(4, 7)))
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    for i, s in enumerate((4, 5, 6)):
        assert torch.equal(x[i], torch.randn((2, 3), generator=torch.Generator().manual_seed(s)))


# ------------------------------------------------------------------------------------------ sampling.py


def x0_rounding(x: torch.Tensor, eps: torch.Tensor, a: float, ops: int = 4) -> torch.Tensor:
    """How far float32 may put x0 = (x - sqrt(1 - a) eps) / sqrt(a) from its exact value, per element: each of the
    few float32 operations (eps, the product, the difference, the quotient) rounds by at most the unit roundoff
    relative to |x| + sqrt(1 - a) |eps|, and the division by sqrt(a) multiplies that error by 1 / sqrt(a) (156 at
    abar_1000 of the linear schedule). Clamping to [-1, 1] never widens it. Which kernels a CPU runs (AVX2,
    AVX-512) decides where inside this bound the result lands, so a fixed atol is right on one machine only."""
    u = torch.finfo(torch.float32).eps / 2
    return ops * u * (x.abs() + math.sqrt(1 - a) * eps.abs()) / math.sqrt(a) + 1e-12


def test_eps_model_x0_and_eps_by_hand() -> None:
    """x0(x, t) = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) with eps = c(t - 1) x, the network called at timestep
    t - 1; eps comes back in float32 whatever the network's dtype."""
    unet = eps_linear()
    model = EpsModel(unet, SCHED)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in (1, 57, 1000):
        k = (1 - math.sqrt(1 - abar(t)) * unet.coef(t - 1)) / math.sqrt(abar(t))
        assert torch.allclose(model.x0(x, t), k * x, rtol=1e-5, atol=1e-6), t
    assert unet.timesteps == [0, 56, 999]
    unet64 = eps_linear()
    unet64.dtype = torch.float64
    e = EpsModel(unet64, SCHED).eps(x, 3)
    assert e.dtype == torch.float32 and torch.allclose(e, unet64.coef(2) * x)


def test_ddim_chain_accepts_one_to_T_steps_and_reports_each_level() -> None:
    """One step from pure noise is x0 = clip((x - sqrt(1 - abar_T) eps) / sqrt(abar_T)) (the predicted clean image);
    the callback sees each level reached (the network was called at T); 0 or T + 1 steps are refused."""
    unet = eps_linear(1e-3)
    x_T = 0.5 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    seen: list[int] = []
    got = ddim_chain(EpsModel(unet, SCHED), x_T, 1, image_generators([0, 1]), callback=seen.append)
    a = float(AC[999])
    eps = unet.coef(999) * x_T.double()
    expected = ((x_T.double() - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    assert ((got.double() - expected).abs() <= x0_rounding(x_T.double(), eps, a)).all()
    assert seen == [0] and unet.timesteps == [999]
    seen.clear()
    ddim_chain(EpsModel(eps_zero(), SCHED), x_T, 4, image_generators([0, 1]), callback=seen.append)
    assert seen == [750, 500, 250, 0]
    assert ddim_chain(EpsModel(eps_zero(), SCHED), x_T, 1000, image_generators([0, 1])).shape == x_T.shape
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 1000\]"):
            ddim_chain(EpsModel(eps_zero(), SCHED), x_T, steps, image_generators([0, 1]))


def test_ddim_chain_with_eta_one_adds_the_ancestral_noise() -> None:
    """eta = 1: each step adds sigma_t z, sigma_t = sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)) (Song et al.
    Eq. 16), z the next draw of each image's generator; the deterministic part is DDIM's with
    sqrt(1 - a_prev - sigma_t^2) eps. Two steps (timesteps 999, 499) by hand."""
    unet = eps_linear(1e-3)
    x_T = 0.5 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    got = ddim_chain(EpsModel(unet, SCHED), x_T, 2, image_generators([3, 4]), eta=1.0)
    g = gens([3, 4])
    x = x_T.double()
    for ts, prev in ((999, 499), (499, -1)):
        a, a_prev = float(AC[ts]), (float(AC[prev]) if prev >= 0 else 1.0)
        eps = unet.coef(ts) * x
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - var) * eps + math.sqrt(var) * draw((3, 4, 4), g).double()
    assert torch.allclose(got, x.float(), rtol=0, atol=1e-5)


def test_ddim_between_edge_cases() -> None:
    """t_from = t_to is no step (the input back, no network call); one step from level t to 0 is the predicted x0;
    levels outside [0, T], t_to > t_from or no step are refused."""
    unet = eps_linear()
    x = 0.3 * torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ddim_between(EpsModel(unet, SCHED), x, 20, 20, 3), x) and unet.timesteps == []
    got = ddim_between(EpsModel(unet, SCHED), x, 20, 0, 1)
    k = (1 - math.sqrt(1 - abar(20)) * unet.coef(19)) / math.sqrt(abar(20))
    assert torch.allclose(got, k * x, rtol=1e-5, atol=1e-7) and unet.timesteps == [19]
    for t_from, t_to, steps in ((5, 6, 1), (5, 0, 0), (1001, 0, 2), (5, -1, 2)):
        with pytest.raises((ValueError, UserError)):
            ddim_between(EpsModel(unet, SCHED), x, t_from, t_to, steps)
    with pytest.raises(ValueError) as e:
        ddim_between(EpsModel(unet, SCHED), x, 5, 6, 1)
    assert str(e.value) == "a chain from level 5 to 6 in 1 steps: need t_from >= t_to and steps >= 1"


def test_reverse_chain_reports_each_step_and_refuses_bad_levels() -> None:
    seen: list[int] = []
    x = torch.zeros(1, 3, 4, 4)
    reverse_chain(EpsModel(eps_zero(), SCHED), x, 3, image_generators([0]), callback=seen.append)
    assert seen == [2, 1, 0]
    for t in (-1, 1001):
        with pytest.raises(UserError):
            reverse_chain(EpsModel(eps_zero(), SCHED), x, t, image_generators([0]))


# ------------------------------------------------------------------------------------------ generator.py


class StubG(torch.nn.Module):
    """G_psi stand-in: G(z, w) = 0.5 z + mean(w) per image (0.5 z without w). Records the timesteps and w it gets.
    With w_dim its config names it (as StyleGenerator's does), else it has no style input (style_dim 0)."""

    def __init__(self, w_dim: int = 0) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.config = StubConfig(w_dim=w_dim) if w_dim else StubConfig(block_out_channels=(16, 32))
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, z: torch.Tensor, timestep: int, class_labels: torch.Tensor | None = None) -> SimpleNamespace:
        self.calls.append((int(timestep), None if class_labels is None else class_labels.clone()))
        out = 0.5 * z
        if class_labels is not None:
            out = out + class_labels.mean(1).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=out)


def tdpm_by_hand(
    unet: StubUNet, seeds: list[int], t: int, z_shape: tuple[int, ...], w_dim: int, predict_x0: bool
) -> torch.Tensor:
    """Amortized TDPM of each image from its own generator: z_img, then w, then (predict x0) eps; x_T = G(z, w) or
    sqrt(abar_t) G(z, w) + sqrt(1 - abar_t) eps; then t DDPM posterior steps on the same generator; clamped."""
    out = []
    for s in seeds:
        g = gens([s])
        z = draw(z_shape, g)
        x = 0.5 * z
        if w_dim:
            x = x + draw((w_dim,), g).mean(1).view(-1, 1, 1, 1)
        if predict_x0:
            x = math.sqrt(abar(t)) * x + math.sqrt(1 - abar(t)) * draw(z_shape, g)
        out.append(ddpm_chain_by_hand(unet, x, t, g).clamp(-1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("w_dim, predict", [(0, "x_T"), (4, "x_T"), (4, "x0")])
def test_tdpm_generator_samples_by_hand(w_dim: int, predict: str) -> None:
    """TDPMGenerator.sample: G_psi at timestep 0 on (z_img, w) drawn from image i's generator, the forward noise of
    level T_trunc added when it predicts x0, then T_trunc DDPM steps; the same through `generate --method tdpm`, in
    batches, with its cost and info."""
    from tdpm_dip.generator import TDPMGenerator, draw_latents
    from tdpm_dip.methods import Context, Job, run

    z_shape, t, seeds = (3, 8, 8), 5, [3, 4, 5]
    net = StubG(w_dim)
    gen = TDPMGenerator(net, t, z_shape, {"predict": predict, "objective": "mse"}, "gen-folder")  # type: ignore[arg-type]
    unet = eps_linear()
    expected = tdpm_by_hand(eps_linear(), seeds, t, z_shape, w_dim, predict == "x0")
    seen: list[int] = []
    got = gen.sample(EpsModel(unet, SCHED), image_generators(seeds), seen.append)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert seen == [4, 3, 2, 1, 0] and unet.timesteps == [4, 3, 2, 1, 0]
    assert [ts for ts, _ in net.calls] == [0] and (net.calls[0][1] is None) == (w_dim == 0)
    z, w = draw_latents(z_shape, w_dim, image_generators(seeds), "cpu")
    g = gens(seeds)
    assert torch.equal(z, draw(z_shape, g)) and (w is None if not w_dim else torch.equal(w, draw((w_dim,), g)))

    res = run(
        Context(eps_linear(), SCHED, batch_size=2, generator=gen),
        "generate",
        "unconditional",
        "tdpm",
        Job(tuple(seeds)),
    )
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6)
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("tdpm", "unconditional", 1 + t, 1 + t)
    assert res.info == {"t_trunc": t, "reverse_steps": t, "generator": "gen-folder", "objective": "mse"}


def test_tdpm_method_refuses_a_missing_or_mismatched_generator() -> None:
    from tdpm_dip.generator import TDPMGenerator
    from tdpm_dip.methods import Context, Job, run

    with pytest.raises(UserError) as e:
        run(Context(eps_zero(), SCHED), "generate", "unconditional", "tdpm", Job((0,)))
    assert str(e.value) == "method tdpm needs a generator (--generator, made by `tdpm-dip train-generator`)"
    gen = TDPMGenerator(StubG(), 5, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    with pytest.raises(UserError) as e:
        run(Context(eps_zero(), SCHED, generator=gen), "generate", "unconditional", "tdpm", Job((0,), t_trunc=3))
    assert str(e.value) == "T_trunc 3 does not match the generator's 5 (g)"
    res = run(Context(eps_zero(), SCHED, generator=gen), "generate", "unconditional", "tdpm", Job((0,), t_trunc=5))
    assert res.info["t_trunc"] == 5 and res.info["objective"] is None
    bad = TDPMGenerator(StubG(), 1000, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="T_trunc must be an integer in"):
        run(Context(eps_zero(), SCHED, generator=bad), "generate", "unconditional", "tdpm", Job((0,)))


# ------------------------------------------------------------------------------------------ methods/generate.py


def test_generate_ddpm_is_the_full_chain_from_noise_by_hand() -> None:
    """`generate --method ddpm`: x_T from image i's generator at the DDPM's size, then all T = 1000 posterior steps
    on the same generator (the stub: eps = c x, so every step is known by hand)."""
    from tdpm_dip.methods import Context, Job, run

    unet = StubUNet(base=0.01, per_step=1e-4)
    seeds = [2, 3, 4]
    res = run(Context(unet, SCHED, batch_size=2), "generate", "unconditional", "ddpm", Job(tuple(seeds)))
    g = gens(seeds)
    expected = ddpm_chain_by_hand(StubUNet(base=0.01, per_step=1e-4), draw((3, SIZE, SIZE), g), 1000, g)
    assert res.images.shape == (3, 3, SIZE, SIZE)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-5)
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("ddpm", "unconditional", 1000, 1000)
    assert unet.timesteps == list(range(999, -1, -1)) * 2  # two batches (2 + 1 images)


def test_generate_ddim_draws_x_T_then_steps_with_the_jobs_eta() -> None:
    """`generate --method ddim`: x_T from image i's generator, then DDIM in job.ddim_steps calls (default: 110, the
    cost of TDPM-DIP) with job.eta, in batches; eta = 1 draws its step noise from the same generators."""
    from tdpm_dip.methods import Context, Job, run

    seeds = (5, 6, 7)
    for eta in (0.0, 1.0):
        unet = eps_linear(1e-3)
        res = run(
            Context(unet, SCHED, batch_size=2), "generate", "unconditional", "ddim", Job(seeds, ddim_steps=3, eta=eta)
        )
        g = image_generators(seeds)
        x_T = randn((3, SIZE, SIZE), g)
        expected = ddim_chain(EpsModel(eps_linear(1e-3), SCHED), x_T, 3, g, eta=eta)
        assert torch.allclose(res.images, expected, rtol=0, atol=1e-6), eta
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("ddim", "unconditional", 3, 3)
        assert res.info == {"ddim_steps": 3} and unet.timesteps == [999, 666, 332] * 2  # "trailing" spacing
    res = run(Context(eps_zero(), SCHED, batch_size=4), "generate", "unconditional", "ddim", Job((0,)))
    assert res.nfe == 110 and res.info == {"ddim_steps": 110}


# ------------------------------------------------------------------------------------------ metrics.py


def test_precision_recall_on_sets_with_known_radii() -> None:
    """Points on a line, k = 3: the radius of a point is the distance to its 3rd nearest other point. Real
    {0, 1, ..., 9}: radius 2 inside, 3 at the ends. A fake point at distance exactly the radius is inside (<=);
    integer (or float32) features are read as float64."""
    from tdpm_dip import metrics as M

    real = [[i] for i in range(10)]  # integers, as a list
    fake = np.array([[-3.0], [12.0], [4.5], [30.0], [-3.5]], dtype=np.float32)
    # -3: 3 from real point 0 (radius 3): inside; 12: 3 from 9 (radius 3): inside; 4.5: inside; 30, -3.5: outside.
    res = M.precision_recall(fake, real, k=3)
    assert res == {"precision": 3 / 5, "recall": pytest.approx(res["recall"]), "k": 3}
    # Recall: fake radii (k = 3 among 5 fake points): -3.5 -> 16.0 (to 12), -3 -> 15.0, 4.5 -> 16.5, 12 -> 15.5,
    # 30 -> 33.5; real points within a fake ball: all ten (within 15 of -3).
    assert res["recall"] == 1.0
    assert M.precision_recall(fake, real, k=1)["precision"] == 1 / 5  # radius 1: only 4.5 (0.5 from 4 and 5)
    with pytest.raises(ValueError, match="with k = 3 need more than 3 samples"):
        M.precision_recall(fake[:3], real, k=3)
    assert M.precision_recall(fake[:4], real[:4], k=3)["k"] == 3  # four samples of one feature each are enough


def test_copy_rate_counts_a_psnr_at_the_threshold_and_any_chunking() -> None:
    """A copy is an image whose PSNR to its nearest training image is >= the threshold: an image 1/32 away
    everywhere on the [0, 1] scale (MSE 2^-10, PSNR 10 log10(1024)) copies at that threshold. The chunk size only
    bounds memory."""
    from tdpm_dip import metrics as M

    train = torch.arange(30.0).view(10, 3, 1, 1) / 16 - 1  # dyadic values: the arithmetic below is exact
    images = train[[4, 1, 7]] + 1 / 16  # 1/32 on the [0, 1] scale; the next image is 3/16 away
    at = float(10 * torch.log10(torch.tensor(1024.0)))
    res = M.copy_rate(images, train, threshold_db=at)
    assert res == {
        "rate": 1.0,
        "copies": 3,
        "nearest": [4, 1, 7],
        "nearest_psnr": pytest.approx([at] * 3),
        "threshold_db": at,
    }
    many = torch.cat([images] * 4)  # 12 images of 3 pixels each, chunks of 5
    small = M.copy_rate(many, train, threshold_db=at + 0.1, chunk=5)
    assert small["nearest"] == [4, 1, 7] * 4 and small["copies"] == 0 and small["rate"] == 0.0


def test_kid_protocol_subsets_and_seed() -> None:
    """KID (Binkowski et al.): by default 100 subsets of min(1000, m, n) features of each set, drawn without
    replacement from a generator seeded with 0. Subsets of every feature are permutations of the sets, so every
    subset gives the unbiased MMD^2 of the full sets (std 0). Features are read as float64 whatever their dtype."""
    from tdpm_dip import metrics as M

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((30, 4)) + 0.3
    full = M.kid_from_features(x, y[:20], subsets=5, subset_size=1000)
    assert full["subset_size"] == 20 and full["subsets"] == 5
    assert full["kid"] == pytest.approx(M.polynomial_mmd2(x, y[:20]), rel=1e-12) and full["kid_std"] < 1e-12
    assert M.kid_from_features(x, y, subsets=2)["subset_size"] == 20  # the smaller set bounds the subsets
    assert M.kid_from_features(y, x, subsets=3, subset_size=25)["subset_size"] == 20
    d = M.kid_from_features(x, y)
    assert d["subsets"] == 100 and d == M.kid_from_features(x, y, 100, 1000, 0)
    assert M.kid_from_features(x, y, 4, 10) == M.kid_from_features(x, y, 4, 10, seed=0)
    assert M.kid_from_features(x, y, 4, 10, seed=1) != M.kid_from_features(x, y, 4, 10, seed=0)
    assert M.kid_from_features(x.astype(np.float32), y.astype(np.float32), 4, 10) == M.kid_from_features(
        x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64), 4, 10
    )
    big = rng.standard_normal((1001, 2))
    assert M.kid_from_features(big, big + 0.1, subsets=1)["subset_size"] == 1000
    # MMD^2 with two samples per set, by hand: k(a, b) = (a.b / D + 1)^3
    a, b = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [-1.0, 0.0]])
    k = lambda u, v: (u @ v / 2 + 1) ** 3
    by_hand = 2 * k(a[0], a[1]) / 2 + 2 * k(b[0], b[1]) / 2 - 2 * np.mean([k(u, v) for u in a for v in b])
    assert M.polynomial_mmd2(a, b) == pytest.approx(by_hand, rel=1e-12)
    for m, n in ((1, 2), (2, 1)):
        with pytest.raises(ValueError) as e:
            M.polynomial_mmd2(a[:m], b[:n])
        assert str(e.value) == "KID needs at least 2 images in each set"


def test_kid_of_images_passes_its_protocol_on() -> None:
    """metrics.kid: the images' features against the reference's, with the caller's subsets, size and seed."""
    from tdpm_dip import metrics as M

    class Flat:
        name = "flatten-test"

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(1)[:, :6].double()

    g = torch.Generator().manual_seed(0)
    imgs, ref = torch.rand(12, 3, 4, 4, generator=g), torch.rand(15, 3, 4, 4, generator=g)
    fx, fy = imgs.flatten(1)[:, :6].double().numpy(), ref.flatten(1)[:, :6].double().numpy()
    assert M.kid(imgs, ref, Flat(), subsets=3, subset_size=8, seed=5) == M.kid_from_features(fx, fy, 3, 8, 5)
    assert M.kid(imgs, ref, Flat()) == M.kid_from_features(fx, fy, 100, 1000, 0)


def test_psnr_of_identical_and_out_of_range_images() -> None:
    """Identical images: the MSE floor of 1e-12 gives 120 dB, not infinity; values outside [-1, 1] are clamped
    before the comparison (metrics are taken on displayable images)."""
    from tdpm_dip import metrics as M

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(M.psnr(x, x), torch.full((2,), 120.0))
    assert torch.allclose(M.psnr(x.clamp(-1, 1) * 3, (x * 3).clamp(-1, 1)), torch.full((2,), 120.0))
    ref = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(M.psnr(torch.full((1, 3, 8, 8), 5.0), ref), torch.tensor([10 * math.log10(4.0)]))
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(M.ssim(y, y), torch.ones(2), atol=1e-6)


# ------------------------------------------------------------------------------------------ dip.py


def test_dip_defaults_apply_the_preset_and_its_overrides() -> None:
    from tdpm_dip.dip import DIPConfig, dip_defaults

    cfg = dip_defaults("paper", "dip-tiny")
    assert cfg == DIPConfig(preset="dip-tiny", iters=100, lr=1e-3)  # defaults.DIP_PRESET_OVERRIDES
    assert dip_defaults("blind", "dip-tiny", iters=9, lr=0.5) == DIPConfig(
        preset="dip-tiny", iters=9, lr=0.5, input_noise=1.0, average=0.95
    )
    with pytest.raises(ValueError, match="unknown DIP use 'nope'"):
        dip_defaults("nope", "dip-tiny")


def test_dip_mean_curves_average_over_the_images() -> None:
    from tdpm_dip.dip import DIPResult

    loss = torch.tensor([[1.0, 3.0], [0.5, 1.5]])  # [iters, B]
    res = DIPResult(torch.zeros(2, 3, 4, 4), loss)
    assert res.mean_curves() == {"loss": [2.0, 1.0]}
    res = DIPResult(
        torch.zeros(2, 3, 4, 4),
        loss,
        psnr=torch.tensor([[10.0, 20.0], [12.0, 22.0]]),
        ssim=torch.tensor([[0.2, 0.4]]),
        ssim_iters=[1],
    )
    assert res.mean_curves() == {
        "loss": [2.0, 1.0],
        "psnr": [15.0, 17.0],
        "ssim_iters": [1],
        "ssim": [pytest.approx(0.3)],
    }


# ------------------------------------------------------------------------------------------ methods/observe.py


def test_blind_sigmas_given_or_estimated_per_image() -> None:
    from tdpm_dip.methods.observe import blind_sigmas
    from tdpm_dip.noise import add_noise

    grey = torch.zeros(1, 3, 64, 64)
    noisy = [add_noise(grey, s, [i], "float")[0] for i, s in enumerate((10.0, 40.0))]
    assert blind_sigmas(noisy, 25) == [25.0, 25.0]
    est = blind_sigmas(noisy, None)
    assert abs(est[0] - 10) < 1.5 and abs(est[1] - 40) < 4
    with pytest.raises(UserError) as e:
        blind_sigmas([noisy[0], grey[0]], None)
    assert str(e.value) == "the estimated noise level is ~0: these images look clean; give --sigma"
    with pytest.raises(UserError, match="--sigma must be in"):
        blind_sigmas(noisy, 0)
    assert blind_sigmas([], None) == []


def wavelet_sigma_by_hand(y: np.ndarray) -> tuple[int, float]:
    """Donoho's estimate by its definition: the median |d| / 0.6745 of the finest diagonal db2 coefficients whose
    support (pixels 2k-2 .. 2k+1 each way, clipped to the image) holds no pixel stored at 0 or 255. Returns how many
    coefficients it kept and the estimate."""
    import pywt

    h, w = y.shape[:2]
    kept = []
    for c in range(y.shape[2]):
        _, (_, _, d) = pywt.dwt2(y[..., c], "db2", mode="symmetric")
        bad = (y[..., c] == 0) | (y[..., c] == 255)
        for a in range(d.shape[0]):
            for b in range(d.shape[1]):
                rows = [min(max(r, 0), h - 1) for r in range(2 * a - 2, 2 * a + 2)]
                cols = [min(max(q, 0), w - 1) for q in range(2 * b - 2, 2 * b + 2)]
                if not bad[np.ix_(rows, cols)].any():
                    kept.append(abs(d[a, b]))
    return len(kept), (float(np.median(kept) / 0.6745) if kept else math.nan)


def test_wavelet_sigma_leaves_out_the_blocks_clipped_pixels_touch() -> None:
    """On an odd-sized, non-square image with clipped pixels inside and on its borders;
    pixels at 1 or 254 are not clipped. The support is checked on pywt."""
    import pywt

    from tdpm_dip.methods.observe import _wavelet_sigma

    rng = np.random.default_rng(0)
    y = np.clip(np.round(128 + rng.normal(0, 20, (33, 26, 3))), 1, 254)
    spots = [
        (0, 10),
        (32, 16),
        (12, 0),
        (20, 24),
        (4, 6),
        (10, 20),
        (16, 8),
        (24, 14),
        (26, 4),
        (6, 18),
        (32, 0),
        (0, 24),
    ]
    for value, (i, j) in zip((0, 255, 0, 255, 255, 0, 1, 254, 0, 255, 255, 0), spots):
        y[i, j, :] = value
    n, expected = wavelet_sigma_by_hand(y)
    assert n < 3 * 18 * 14
    assert _wavelet_sigma(y) == pytest.approx(expected, rel=1e-12)
    e = np.zeros((32, 32))
    e[11, 11] = 1.0
    touched = np.argwhere(np.abs(pywt.dwt2(e, "db2", mode="symmetric")[1][2]) > 1e-12)
    assert sorted(map(tuple, touched.tolist())) == [(5, 5), (5, 6), (6, 5), (6, 6)]


def test_wavelet_sigma_needs_200_coefficients_else_takes_them_all() -> None:
    """41 clipped pixels leave exactly 200 of the 17 x 17 coefficients untouched: enough. Clipped pixels everywhere
    leave none: the estimate falls back to all coefficients (an underestimate, but a number)."""
    import pywt

    from tdpm_dip.methods.observe import _wavelet_sigma

    rng = np.random.default_rng(3)
    y = np.clip(np.round(128 + rng.normal(0, 20, (32, 32, 1))), 1, 254)
    spots = [(i, j) for i in range(4, 27, 4) for j in range(4, 27, 2)][:40] + [(14, 12)]
    for i, j in spots:
        y[i, j, 0] = 255
    n, expected = wavelet_sigma_by_hand(y)
    assert n == 200 and _wavelet_sigma(y) == pytest.approx(expected, rel=1e-12)
    y = np.clip(np.round(128 + rng.normal(0, 20, (32, 32, 2))), 1, 254)
    y[::2, ::2, :] = 0
    assert wavelet_sigma_by_hand(y)[0] == 0
    d = np.concatenate([np.abs(pywt.dwt2(y[..., c], "db2", mode="symmetric")[1][2]).ravel() for c in range(2)])
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d) / 0.6745), rel=1e-12)


@pytest.mark.parametrize("sigma", [2.0, 3.0, 5.0])
def test_sigma_estimate_of_saturated_images_at_small_noise(sigma: float) -> None:
    """Where 8-bit rounding matters most (a pixel leaves the bound only when |n| > 0.5): within 4 % on white and
    black images; the estimate is the same from float32 or float64 pixels."""
    from tdpm_dip.methods.observe import estimate_sigma, sigma_255
    from tdpm_dip.noise import add_noise

    for clean, seed in ((torch.ones(1, 3, 128, 128), 0), (-torch.ones(1, 3, 128, 128), 1)):
        y = add_noise(clean, sigma, [seed], "clipped")
        (est,) = estimate_sigma(y)
        assert abs(est - sigma) < 0.04 * sigma, (sigma, est)
        a = ((y[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        assert sigma_255(a.astype(np.float64)) == est


def test_wavelet_sigma_leaves_out_every_coefficient_a_clipped_pixel_touches() -> None:
    """db2's diagonal coefficient (a, b) depends on pixels 2a-2 .. 2a+1 and 2b-2 .. 2b+1 (the test above checks it
    on pywt): one clipped pixel at (11, 11) reaches coefficients 5 and 6 each way, four in all, and none of them may
    enter the estimate."""
    import pywt

    from tdpm_dip.methods.observe import _wavelet_sigma

    rng = np.random.default_rng(1)
    y = np.round(128 + rng.normal(0, 20, (32, 32, 1)))
    y[11, 11, 0] = 255.0
    d = np.abs(pywt.dwt2(y[..., 0], "db2", mode="symmetric")[1][2])
    keep = np.ones_like(d, dtype=bool)
    keep[5:7, 5:7] = False
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d[keep]) / 0.6745), rel=1e-12)


# ------------------------------------------------------------------------------------------ DIP-based methods

PATTERN = torch.where(torch.arange(3 * SIZE * SIZE).view(3, SIZE, SIZE) % 2 == 0, 1.0, -1.0)


class FakeFit:
    """Algorithm 2 stand-in: G(z) = target + 0.1 * (+-1 pattern), a fit that took 100 s. Records its arguments."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.amplitude = 0.1

    def __call__(self, ctx, target, z, seeds, reference, cfg=None):
        from tdpm_dip.dip import DIPResult

        self.calls.append(
            {
                "target": target.clone(),
                "z": z.clone(),
                "seeds": list(seeds),
                "cfg": cfg,
                "reference": None if reference is None else reference.clone(),
            }
        )
        return DIPResult(target + self.amplitude * PATTERN, torch.zeros(3, target.shape[0]), seconds=100.0)


def test_generate_tdpm_dip_fits_the_reference_target_then_runs_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation under the paper protocol: x_T = sqrt(abar_T) x0_i + sqrt(1 - abar_T) z_i from reference image i
    and z_i (image i's first draw), G fitted to it (no reference curves), then T_trunc steps on the same generator;
    T_trunc = 0 returns G(z). Cost: DIP iterations + T_trunc."""
    from tdpm_dip.data import make_sprites
    from tdpm_dip.methods import Context, Job, generate, run

    fake = FakeFit()
    monkeypatch.setattr(generate, "fit", fake)
    reference = make_sprites(3, SIZE, seed=1).images
    seeds = [4, 5]
    unet = eps_linear()
    res = run(Context(unet, SCHED), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference))
    g = gens(seeds)
    z = draw((3, SIZE, SIZE), g)
    target = math.sqrt(abar(T0)) * reference[:2] + math.sqrt(1 - abar(T0)) * z
    call = fake.calls[0]
    assert call["seeds"] == seeds and call["reference"] is None and torch.equal(call["z"], z)
    assert torch.allclose(call["target"], target, rtol=0, atol=1e-6)
    expected = ddpm_chain_by_hand(eps_linear(), call["target"] + 0.1 * PATTERN, T0, g)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6) and unet.timesteps == list(range(T0 - 1, -1, -1))
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("tdpm-dip", "paper", 100 + T0, 100 + T0)
    assert res.seconds >= 100.0 and res.dip is not None and res.dip.seconds == 100.0
    assert set(res.info) == {"t_trunc", "dip_output"} and res.info["t_trunc"] == T0
    assert torch.equal(res.info["dip_output"], call["target"] + 0.1 * PATTERN)

    unet = eps_linear()
    res = run(Context(unet, SCHED), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference, t_trunc=0))
    assert torch.equal(res.images, fake.calls[-1]["target"] + 0.1 * PATTERN) and unet.timesteps == []
    assert res.reverse_steps == res.nfe == 100 and res.info["t_trunc"] == 0
    for ref in (None, reference[:1]):
        with pytest.raises(UserError) as e:
            run(Context(eps_zero(), SCHED), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=ref))
        assert str(e.value) == (
            "TDPM-DIP generation follows the paper protocol: it needs --reference-data with at "
            "least --n images (each output reconstructs one of them)"
        )
    run(Context(eps_zero(), SCHED), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference[:2]))


def test_paper_protocol_methods_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper protocol: z_i (image i's first draw) noises x0 to x_tn and is the DIP's input; the DIP fits
    sqrt(abar_T) x0 + sqrt(1 - abar_T) z with x0 as its reference; then T steps (none for the dip row). Every Result
    carries x_tn, the fit, its cost and the levels."""
    from tdpm_dip.data import make_sprites
    from tdpm_dip.methods import Context, Job, paper, run

    fake = FakeFit()
    monkeypatch.setattr(paper, "fit", fake)
    clean = make_sprites(2, SIZE, seed=2).images
    seeds = [6, 7]
    g = gens(seeds)
    z = draw((3, SIZE, SIZE), g)
    x_tn = math.sqrt(abar(30)) * clean + math.sqrt(1 - abar(30)) * z
    for method, t, job in (
        ("tdpm-dip", T0, Job(tuple(seeds), clean=clean, t_noisy=30)),
        ("tdpm-dip", 4, Job(tuple(seeds), clean=clean, t_noisy=30, t_trunc=4)),
        ("dip", 0, Job(tuple(seeds), clean=clean, t_noisy=30)),
    ):
        unet = eps_linear()
        res = run(Context(unet, SCHED), "denoise", "paper", method, job)
        call = fake.calls[-1]
        assert torch.equal(call["z"], z) and call["seeds"] == seeds and torch.equal(call["reference"], clean)
        assert torch.allclose(call["target"], math.sqrt(abar(t)) * clean + math.sqrt(1 - abar(t)) * z, atol=1e-6)
        g_out = call["target"] + 0.1 * PATTERN
        expected = ddpm_chain_by_hand(eps_linear(), g_out, t, _after_first_draw(seeds)) if t else g_out
        assert torch.allclose(res.images, expected, rtol=0, atol=1e-6), (method, t)
        assert unet.timesteps == list(range(t - 1, -1, -1))
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == (method, "paper", 100 + t, 100 + t)
        assert torch.allclose(res.inputs, x_tn, rtol=0, atol=1e-6) and res.dip.seconds == 100.0
        assert res.seconds >= 100.0 and res.info == {"t_noisy": 30, "t_trunc": t}
    res = run(Context(eps_zero(), SCHED), "denoise", "paper", "ddpm", Job(tuple(seeds), clean=clean, t_noisy=3))
    assert (res.method, res.protocol, res.reverse_steps, res.nfe, res.info) == ("ddpm", "paper", 3, 3, {"t_noisy": 3})
    with pytest.raises(UserError) as e:
        run(Context(eps_zero(), SCHED), "denoise", "paper", "ddpm", Job(tuple(seeds), clean=clean, t_noisy=1001))
    assert str(e.value) == "t_noisy must be an integer in [0, 1000], got 1001"
    with pytest.raises(UserError) as e:
        run(Context(eps_zero(), SCHED), "denoise", "paper", "ddpm", Job(tuple(seeds)))
    assert str(e.value) == "method paper denoising needs the clean images"


def _after_first_draw(seeds: list[int]) -> list[torch.Generator]:
    """Each image's generator after its first draw (z): where the chain's step noise continues."""
    g = gens(seeds)
    draw((3, SIZE, SIZE), g)
    return g


# ------------------------------------------------------------------------------------------ methods/dispatch.py


@pytest.mark.parametrize("h, w", [(16, 16), (15, 16), (16, 13), (13, 19)])
def test_run_native_always_hands_the_networks_a_multiple_and_crops_back(h: int, w: int) -> None:
    """Whatever needs padding (nothing, one side, both), every network call sees sides that are multiples of
    2^(levels - 1) of the deepest network (here the DIP presets': dip-tiny has 2 levels, paper-dip 4, so 8), and
    the output is the input's own pixels (eps = 0: the declipped observation, clamped, i.e. y)."""
    from tdpm_dip.dip import DIPConfig
    from tdpm_dip.methods import Context, Job, run_native

    y = noisy_8bit(h, w, seed=h + w, n=2)
    unet = eps_zero()
    ctx = Context(unet, SCHED, DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="paper-dip"))
    res = run_native(ctx, "tweedie", Job((0, 1), noisy=y, sigma=(25.0,), declip=False))
    assert res.images.shape == (2, 3, h, w) and torch.equal(res.images, y) and torch.equal(res.inputs, y)
    assert unet.shapes == [(2, 3, -(-h // 8) * 8, -(-w // 8) * 8)]
    assert (res.method, res.protocol, res.nfe) == ("tweedie", "blind", 1)


def test_run_native_pads_to_the_ddpms_multiple_when_it_is_the_deepest() -> None:
    """A six-level DDPM (sides multiple of 32) next to two-level DIPs: 20 x 40 is run at 32 x 64."""
    from tdpm_dip.dip import DIPConfig
    from tdpm_dip.methods import Context, Job, run_native

    net = eps_zero()
    net.config["block_out_channels"] = (8,) * 6
    ctx = Context(net, SCHED, DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="dip-tiny"))
    y = noisy_8bit(20, 40, seed=9)
    res = run_native(ctx, "tweedie", Job((0,), noisy=y, sigma=(25.0,), declip=False))
    assert net.shapes == [(1, 3, 32, 64)] and torch.equal(res.images, y)
    with pytest.raises(UserError) as e:
        run_native(ctx, "tweedie", Job((0,), sigma=(25.0,)))
    assert str(e.value) == "method tweedie needs the noisy images"


# ------------------------------------------------------------------------------------------ methods/blind.py


def test_blind_results_record_their_cost_and_settings() -> None:
    """What each blind method reports (bench tables and metrics.json read it): NFE and reverse steps per image, the
    noise level and t* (one value, or one per image), declip and the method's own settings; inputs are y."""
    from tdpm_dip.methods import Context, Job, run

    y = noisy_8bit(8, 8, seed=4, n=3)
    sig = (10.0, 25.0, 50.0)
    levels = [sigma_to_level(SCHED, s) for s in sig]

    def blind(method: str, **options: object):
        job = Job((0, 1, 2), noisy=y, sigma=sig, declip=False, **options)
        return run(Context(eps_zero(), SCHED, batch_size=2), "denoise", "blind", method, job)

    base = {"sigma": list(sig), "t_star": levels, "declip": False}
    for method, steps, nfe, extra in (
        ("tweedie", 1, 1, {}),
        ("ensemble", 8, 8, {}),
        ("ddpm", max(levels), 3 * max(levels), {"samples": 3}),
        ("ddim", 4, 4, {"ddim_steps": 4}),
    ):
        res = blind(method, samples=3, ddim_steps=4)
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == (method, "blind", steps, nfe), method
        assert res.info == base | extra and torch.equal(res.inputs, y) and res.seconds >= 0, method
    res = blind("ddim")
    assert res.nfe == res.reverse_steps == 10 and res.info["ddim_steps"] == 10  # defaults.BLIND_DDIM_STEPS
    res = run(Context(eps_zero(), SCHED), "denoise", "blind", "tweedie", Job((0, 1), noisy=y[:2], sigma=(25.0,)))
    assert res.info == {"sigma": 25.0, "t_star": T_STAR_25, "declip": True}


def test_blind_ddim_from_each_images_own_level_by_hand() -> None:
    """Images at different t* run in groups; a level below the step count takes one step per level (sigma 2:
    t* = 2 < 10 steps); eps = c x makes every step a known factor: ddim_between's closed form."""
    from tdpm_dip.methods import Context, Job, run

    y = noisy_8bit(8, 8, seed=5, n=3)
    sig = (2.0, 25.0, 2.0)
    levels = [sigma_to_level(SCHED, s) for s in sig]
    assert levels[0] < 10 < levels[1]
    unet = eps_linear()
    res = run(
        Context(unet, SCHED, batch_size=1), "denoise", "blind", "ddim", Job((0, 1, 2), noisy=y, sigma=sig, declip=False)
    )
    expected = []
    for i, t in enumerate(levels):
        steps = min(10, t)
        path = sorted({round(t * (steps - j) / steps) for j in range(steps + 1)}, reverse=True)
        f = math.sqrt(abar(t))
        for hi, lo in zip(path[:-1], path[1:]):
            c = unet.coef(hi - 1)
            a_hi, a_lo = abar(hi), abar(lo)
            f *= math.sqrt(a_lo) * (1 - math.sqrt(1 - a_hi) * c) / math.sqrt(a_hi) + math.sqrt(1 - a_lo) * c
        expected.append((f * y[i]).clamp(-1, 1))
    assert torch.allclose(res.images, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # eps = -0.5 x: every step scales x up, past the range; the output is clamped to [-1, 1]
    ramp = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)
    res = run(
        Context(StubUNet(base=-0.5), SCHED),
        "denoise",
        "blind",
        "ddim",
        Job((0,), noisy=ramp, sigma=(25.0,), declip=False, ddim_steps=1),
    )
    f = 1 + math.sqrt(1 - abar(T_STAR_25)) * 0.5  # one step to level 0: x0 = (1 + 0.5 sqrt(1 - abar)) y
    assert (f * ramp).max() > 1.05 and (f * ramp).min() < -1.05
    assert torch.allclose(res.images, (f * ramp).clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_blind_dip_and_tdpm_dip_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """dip fits G(z) to y itself with ctx.dip (z: each image's first draw, at the image's size) and returns G(z);
    tdpm-dip fits with the plugin settings and records its levels and fit errors. Costs: DIP iterations (+ the
    chain; + the 8 calls of the ensemble estimate for NFE)."""
    from tdpm_dip.dip import DIPConfig
    from tdpm_dip.methods import Context, Job, blind, run

    fake = FakeFit()
    monkeypatch.setattr(blind, "fit", fake)
    y = noisy_8bit(SIZE, SIZE, seed=6, n=2)
    clean = make_clean(2)
    cfg, plugin = DIPConfig(preset="dip-tiny", iters=7), DIPConfig(preset="dip-tiny", iters=5)
    ctx = Context(eps_zero(), SCHED, cfg, dip_plugin=plugin)
    res = run(ctx, "denoise", "blind", "dip", Job((3, 4), noisy=y, sigma=(25.0,), declip=False, clean=clean))
    call = fake.calls[-1]
    assert torch.equal(call["target"], y) and torch.equal(call["z"], draw((3, SIZE, SIZE), gens([3, 4])))
    assert call["seeds"] == [3, 4] and torch.equal(call["reference"], clean) and call["cfg"] is None
    assert torch.equal(res.images, y + 0.1 * PATTERN) and res.dip.seconds == 100.0 and res.seconds == 100.0
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("dip", "blind", 7, 7)
    assert res.info == {"sigma": 25.0, "t_star": T_STAR_25, "declip": False, "t_trunc": 0}
    assert torch.equal(res.inputs, y)
    run(ctx, "denoise", "blind", "dip", Job((3, 4), noisy=y, sigma=(25.0,)))
    assert fake.calls[-1]["reference"] is None

    fake.amplitude = 0.1234  # G(z) misses its target by 0.1234 everywhere: MSE 0.01522756, reported to 6 decimals
    res = run(
        ctx, "denoise", "blind", "tdpm-dip", Job((3, 4), noisy=y, sigma=(25.0,), declip=False, samples=2, t_trunc=3)
    )
    call = fake.calls[-1]
    assert call["cfg"] == plugin and call["reference"] is None
    assert res.info == {
        "sigma": 25.0,
        "t_star": T_STAR_25,
        "declip": False,
        "samples": 2,
        "dip_target_level": 3,
        "t_trunc": 3,
        "dip_fit_mse": [0.015228, 0.015228],
    }
    assert (res.method, res.protocol) == ("tdpm-dip", "blind")
    assert (res.reverse_steps, res.nfe) == (5 + 3, 8 + 5 + 3 * 2) and res.seconds >= 100.0
    assert torch.equal(res.inputs, y) and res.dip.seconds == 100.0
    res = run(ctx, "denoise", "blind", "tdpm-dip", Job((3, 4), noisy=y, sigma=(25.0,), samples=1, clean=clean))
    assert torch.equal(fake.calls[-1]["reference"], clean) and res.info["dip_target_level"] == T0


def make_clean(n: int) -> torch.Tensor:
    from tdpm_dip.data import make_sprites

    return make_sprites(n, SIZE, seed=11).images


# ------------------------------------------------------------------------------------------ dip.py (Algorithm 2)


def test_dip_config_accepts_exactly_its_ranges() -> None:
    from tdpm_dip.dip import DIPConfig

    for ok in ({"iters": 0}, {"lr": 1e-9}, {"lr": 5.0}, {"average": 0.0}, {"average": 0.999}, {"average": None}):
        DIPConfig(preset="dip-tiny", **ok)  # type: ignore[arg-type]
    for bad, message in (
        ({"iters": -1}, "DIP iterations must be >= 0, got -1"),
        ({"lr": 0.0}, "DIP learning rate must be > 0, got 0.0"),
        ({"average": 1.0}, "DIP output averaging must be in [0, 1), got 1.0"),
        ({"average": -0.1}, "DIP output averaging must be in [0, 1), got -0.1"),
    ):
        with pytest.raises(UserError) as e:
            DIPConfig(preset="dip-tiny", **bad)  # type: ignore[arg-type]
        assert str(e.value) == message


class Recorder:
    """Wraps dip._networks: the real networks, with every forward input and output recorded."""

    def __init__(self, real) -> None:
        self.real, self.inputs, self.outputs = real, [], []

    def __call__(self, *args):
        forward, params = self.real(*args)

        def recorded(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            self.inputs.append(x.detach().clone())
            self.outputs.append(out.detach().float().clone())
            return out

        return recorded, params


def test_dip_fit_records_its_curves_and_averages_its_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Algorithm 2 with the blind tricks, from what the networks saw and returned: each step feeds z plus fresh
    N(0, input_noise^2) noise (its own per image and step); loss[i] and psnr[i] are the MSE and PSNR of step i's output
    (before its update); SSIM at every ssim_every-th step and the last; the result is the exponential average of the
    outputs. Without averaging it is the fitted network on z itself, after the last update."""
    from tdpm_dip import dip
    from tdpm_dip.dip import DIPConfig, fit_dip

    rec = Recorder(dip._networks)
    monkeypatch.setattr(dip, "_networks", rec)
    g = torch.Generator().manual_seed(0)
    target, z = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(2, 3, SIZE, SIZE, generator=g)
    reference = (target + 0.1).clamp(-1, 1)
    cfg = DIPConfig(preset="dip-tiny", iters=4, lr=1e-2, input_noise=0.5, average=0.6, ssim_every=3)
    res = fit_dip(target, z, [1, 2], cfg, reference=reference, batch_size=2)
    assert len(rec.outputs) == 4  # no extra call: the average is the result
    noise = torch.stack([x - z for x in rec.inputs])  # [step, image, ...]
    assert abs(float(noise.std()) - 0.5) < 0.03 and abs(float(noise.mean())) < 0.03
    # reproducible from the seeds: image i's perturbations are the draws of seed i + 7919, step after step
    g_noise = gens([1 + 7919, 2 + 7919])
    for step in range(4):
        assert torch.allclose(noise[step], 0.5 * draw((3, SIZE, SIZE), g_noise), rtol=0, atol=1e-6), step
    avg = rec.outputs[0]
    for o in rec.outputs[1:]:
        avg = 0.6 * avg + 0.4 * o
    assert torch.allclose(res.output, avg, rtol=0, atol=1e-6)
    unit = lambda t: ((t + 1) / 2).clamp(0, 1)
    for i, o in enumerate(rec.outputs):
        assert torch.allclose(res.loss[i], ((o - target) ** 2).flatten(1).mean(1), rtol=1e-6, atol=0)
        mse = ((unit(o) - unit(reference)) ** 2).flatten(1).mean(1)
        assert torch.allclose(res.psnr[i], 10 * torch.log10(1 / mse), rtol=1e-5, atol=0)
    assert res.ssim_iters == [0, 3] and res.ssim.shape == (2, 2) and res.seconds > 0
    assert not torch.allclose(rec.outputs[0], rec.outputs[-1])  # the networks were updated

    rec = Recorder(rec.real)
    monkeypatch.setattr(dip, "_networks", rec)
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=7, lr=1e-2, ssim_every=3), reference=reference)
    assert len(rec.outputs) == 8 and torch.equal(rec.inputs[0], z) and torch.equal(rec.inputs[-1], z)
    assert torch.equal(res.output, rec.outputs[-1]) and res.ssim_iters == [0, 3, 6]
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=8, ssim_every=3), reference=reference)
    assert res.ssim_iters == [0, 3, 6, 7]
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=3, ssim_every=0), reference=reference)
    assert res.ssim is None and res.ssim_iters == [] and res.psnr.shape == (3, 2)
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=0))
    assert res.loss.shape == (0, 2) and res.psnr is None and res.ssim is None and res.output.shape == z.shape


def test_dip_fit_depends_on_its_learning_rate_and_seeds_only() -> None:
    """The same seeds give the same fit; another learning rate or seed another one."""
    from tdpm_dip.dip import DIPConfig, fit_dip

    g = torch.Generator().manual_seed(1)
    target, z = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(1, 3, SIZE, SIZE, generator=g)
    fit = lambda lr, seed: fit_dip(target, z, [seed], DIPConfig(preset="dip-tiny", iters=3, lr=lr)).output
    a = fit(2e-3, 0)
    assert torch.equal(a, fit(2e-3, 0))
    assert not torch.allclose(a, fit(1e-3, 0), atol=1e-5) and not torch.allclose(a, fit(2e-3, 1), atol=1e-5)


def test_dip_fit_checks_its_arguments_and_falls_back_when_vmap_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vmap error (layers without a batching rule) refits one image at a time, with a one-line warning; other
    errors propagate; curves and reference slices follow the images through the groups."""
    from tdpm_dip import dip
    from tdpm_dip.dip import DIPConfig, fit_dip

    g = torch.Generator().manual_seed(2)
    target, z = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(3, 3, SIZE, SIZE, generator=g)
    cfg = DIPConfig(preset="dip-tiny", iters=2, lr=1e-2)
    with pytest.raises(UserError) as e:
        fit_dip(target, z, [0, 1, 2], cfg, batch_size=0)
    assert str(e.value) == "batch size must be >= 1, got 0"
    for t, n, s in ((target[:2], z, [0, 1, 2]), (target, z[:2], [0, 1, 2]), (target, z, [0, 1])):
        with pytest.raises(ValueError, match="target, net_input and seeds must have the same length"):
            fit_dip(t, n, s, cfg)
    alone = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batched=False)
    grouped = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batch_size=1)
    assert torch.equal(alone.output, grouped.output) and torch.equal(alone.psnr, grouped.psnr)

    real = dip._fit_group

    def no_vmap(target, net_input, seeds, *rest):
        if len(seeds) > 1:
            raise RuntimeError("vmap: no batching rule for aten::some_op\nsecond line")
        return real(target, net_input, seeds, *rest)

    monkeypatch.setattr(dip, "_fit_group", no_vmap)
    with pytest.warns(UserWarning) as w:
        res = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batch_size=2)
    assert [str(x.message) for x in w] == [
        "vmap failed for preset dip-tiny (vmap: no batching rule for aten::some_op); fitting one image at a time"
    ]
    assert torch.equal(res.output, alone.output) and torch.equal(res.psnr, alone.psnr) and res.seconds > 0

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(dip, "_fit_group", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit_dip(target, z, [0, 1, 2], cfg)


def test_dip_result_concat_joins_images_and_adds_fit_times() -> None:
    from tdpm_dip.dip import DIPResult

    a = DIPResult(
        torch.zeros(1, 3, 2, 2),
        torch.tensor([[1.0], [2.0]]),
        torch.tensor([[5.0], [6.0]]),
        torch.tensor([[0.5]]),
        [0],
        2.0,
    )
    b = DIPResult(
        torch.ones(2, 3, 2, 2),
        torch.tensor([[3.0, 4.0], [5.0, 6.0]]),
        torch.tensor([[7.0, 8.0], [9.0, 1.0]]),
        torch.tensor([[0.6, 0.7]]),
        [0],
        3.0,
    )
    c = DIPResult.concat([a, b])
    assert torch.equal(c.output, torch.cat([a.output, b.output])) and c.seconds == 5.0 and c.ssim_iters == [0]
    assert torch.equal(c.loss, torch.tensor([[1.0, 3.0, 4.0], [2.0, 5.0, 6.0]]))
    assert torch.equal(c.psnr, torch.tensor([[5.0, 7.0, 8.0], [6.0, 9.0, 1.0]]))
    assert torch.equal(c.ssim, torch.tensor([[0.5, 0.6, 0.7]]))
    assert DIPResult.concat([a, b], seconds=1.5).seconds == 1.5
    d = DIPResult.concat([DIPResult(a.output, a.loss), DIPResult(b.output, b.loss)])
    assert d.psnr is None and d.ssim is None and d.seconds == 0.0


# ------------------------------------------------------------------------------------------ methods/common.py


def test_dip_fits_are_memoised_per_input_settings_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """common.fit fits once per (target, z, reference, seeds, DIP settings, amp dtype, device, batch size) when the
    context has a memo, and every time without one; it hands fit_dip the caller's settings (else ctx.dip) and the
    context's batch size, dtype and progress flag."""
    import dataclasses

    from tdpm_dip.dip import DIPConfig, DIPResult
    from tdpm_dip.methods import Context, common

    calls: list[dict] = []

    def fake_fit_dip(
        target, z, seeds, cfg, reference=None, batch_size=16, amp_dtype=None, progress=False, measure=None
    ):
        calls.append(
            {
                "cfg": cfg,
                "batch_size": batch_size,
                "amp_dtype": amp_dtype,
                "progress": progress,
                "reference": reference,
                "seeds": list(seeds),
            }
        )
        return DIPResult(target.clone(), torch.zeros(1, target.shape[0]))

    monkeypatch.setattr(common, "fit_dip", fake_fit_dip)
    cfg, other = DIPConfig(preset="dip-tiny", iters=3), DIPConfig(preset="dip-tiny", iters=4)
    ctx = Context(eps_zero(), SCHED, cfg, batch_size=3, progress=True)
    t, z, ref = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    first = common.fit(ctx, t, z, [1, 2], ref)
    assert calls == [
        {"cfg": cfg, "batch_size": 3, "amp_dtype": None, "progress": True, "reference": ref, "seeds": [1, 2]}
    ]
    assert common.fit(ctx, t.clone(), z.clone(), [1, 2], ref.clone()) is first and len(calls) == 1
    variants = [
        ((t + 1, z, [1, 2], ref), {}),
        ((t, z + 1, [1, 2], ref), {}),
        ((t, z, [1, 3], ref), {}),
        ((t, z, [1, 2], ref + 1), {}),
        ((t, z, [1, 2], None), {}),
        ((t, z, [1, 2], ref), {"cfg": other}),
    ]
    for args, kw in variants:
        common.fit(ctx, *args, **kw)
    assert len(calls) == 1 + len(variants) and calls[-1]["cfg"] == other and calls[-2]["reference"] is None
    for changed in ({"amp_dtype": torch.bfloat16}, {"batch_size": 2}, {"device": torch.device("cpu", 0)}):
        common.fit(dataclasses.replace(ctx, **changed), t, z, [1, 2], ref)  # same memo dict, another context
    assert len(calls) == 1 + len(variants) + 3 and calls[-3]["amp_dtype"] == torch.bfloat16
    assert calls[-2]["batch_size"] == 2
    n = len(calls)
    no_memo = dataclasses.replace(ctx, dip_memo=None)
    common.fit(no_memo, t, z, [1, 2], ref)
    common.fit(no_memo, t, z, [1, 2], ref)
    assert len(calls) == n + 2


class RecordingBar:
    """A tqdm stand-in that keeps what a progress bar was asked to show."""

    bars: list[RecordingBar] = []

    def __init__(self, total=None, desc=None, unit="it", leave=True) -> None:
        self.total, self.desc, self.unit, self.leave, self.n, self.closed = total, desc, unit, leave, 0, False
        RecordingBar.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_progress_bars_count_every_step_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ctx.progress, a chain shows one bar of t steps per batch (reaching its total), the DIP fit one of
    iterations x images; the amortized sampler its chain; without ctx.progress there is no bar."""
    from tdpm_dip import dip
    from tdpm_dip.dip import DIPConfig
    from tdpm_dip.generator import TDPMGenerator
    from tdpm_dip.methods import Context, Job, common, run

    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(dip, "tqdm", RecordingBar)
    RecordingBar.bars = []
    y = noisy_8bit(8, 8, seed=1, n=3)
    ctx = Context(
        eps_zero(),
        SCHED,
        DIPConfig(preset="dip-tiny", iters=2),
        batch_size=2,
        progress=True,
        dip_plugin=DIPConfig(preset="dip-tiny", iters=3),
    )
    run(ctx, "denoise", "blind", "ddpm", Job((0, 1, 2), noisy=y, sigma=(25.0,), samples=1))
    (bar,) = RecordingBar.bars
    assert (bar.total, bar.desc, bar.unit, bar.leave, bar.n, bar.closed) == (
        T_STAR_25 * 2,
        "DDPM reverse",
        "step",
        False,
        T_STAR_25 * 2,
        True,
    )
    RecordingBar.bars = []
    run(ctx, "denoise", "blind", "dip", Job((0, 1, 2), noisy=y, sigma=(25.0,)))
    (bar,) = RecordingBar.bars
    assert (bar.total, bar.desc, bar.unit, bar.leave, bar.n, bar.closed) == (
        2 * 3,
        "DIP fit (dip-tiny)",
        "img-it",
        False,
        2 * 3,
        True,
    )
    RecordingBar.bars = []
    run(ctx, "denoise", "blind", "tdpm-dip", Job((0, 1, 2), noisy=y, sigma=(25.0,), samples=1, t_trunc=3))
    assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == [
        ("DIP fit (dip-tiny)", 3 * 3, 3 * 3),
        ("TDPM reverse", 3 * 2, 3 * 2),
    ]
    RecordingBar.bars = []
    gen = TDPMGenerator(StubG(), 4, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    run(
        Context(eps_zero(), SCHED, batch_size=2, progress=True, generator=gen),
        "generate",
        "unconditional",
        "tdpm",
        Job((0, 1, 2)),
    )
    (bar,) = RecordingBar.bars
    assert (bar.total, bar.desc, bar.unit, bar.leave, bar.n, bar.closed) == (
        4 * 2,
        "TDPM reverse",
        "step",
        False,
        4 * 2,
        True,
    )
    RecordingBar.bars = []
    run(
        Context(eps_zero(), SCHED, DIPConfig(preset="dip-tiny", iters=2)),
        "denoise",
        "blind",
        "dip",
        Job((0,), noisy=y[:1], sigma=(25.0,)),
    )
    run(Context(eps_zero(), SCHED), "denoise", "blind", "ddpm", Job((0,), noisy=y[:1], sigma=(25.0,), samples=1))
    assert RecordingBar.bars == []


# ------------------------------------------------------------------------------------------ methods/observe.py (noise)


def test_add_noise_by_hand() -> None:
    """y = x0 + (2 sigma / 255) n on [-1, 1], n of image i drawn from seed i + 104729 (the bench's noisy files and
    published tables are reproducible from the seeds); "clipped" (the default) stores it in 8 bits:
    round(127.5 (y + 1)), clipped to 0..255."""
    from tdpm_dip.noise import add_noise

    clean = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    n = draw((3, 8, 8), gens([5 + 104729, 9 + 104729]))
    y = clean + (2 * 30.0 / 255) * n
    assert torch.allclose(add_noise(clean, 30.0, [5, 9], "float"), y, rtol=0, atol=1e-6)
    stored = torch.round((y + 1) * 127.5).clamp(0, 255)
    assert stored.min() == 0 and stored.max() == 255  # both bounds are reached here
    assert torch.allclose(add_noise(clean, 30.0, [5, 9]), stored / 127.5 - 1, rtol=0, atol=1e-6)
    assert add_noise(clean.double(), 30.0, [5, 9], "float").dtype == torch.float64
    with pytest.raises(UserError) as e:
        add_noise(clean, 30.0, [5, 9], "poisson")
    assert str(e.value) == "noise model must be one of clipped, float, got 'poisson'"
    with pytest.raises(UserError) as e:
        add_noise(clean, 300.0, [5, 9])
    assert str(e.value) == "sigma must be in [0, 255] (noise std on the 0..255 scale), got 300.0"


def test_declip_keeps_the_observations_precision_and_blind_methods_need_y() -> None:
    """A float64 observation is declipped in float64 (the excess scale is not rounded to float32); a blind method
    without noisy images says so in one line."""
    from tdpm_dip.methods import Context, Job, run
    from tdpm_dip.methods.observe import declip

    y = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    excess = torch.randn((3, 4, 4), generator=gens([2 + 15485863])[0], dtype=torch.float64).abs() * (2 * 7.0 / 255)
    got = declip(y, [7.0], [2])
    assert got.dtype == torch.float64 and torch.allclose(got, 1.0 + excess, rtol=1e-12, atol=0)
    with pytest.raises(UserError) as e:
        run(Context(eps_zero(), SCHED), "denoise", "blind", "tweedie", Job((0,), sigma=(25.0,)))
    assert str(e.value) == "method blind denoising needs the noisy images"
    with pytest.raises(ValueError, match="one sigma, or one per image"):
        run(
            Context(eps_zero(), SCHED),
            "denoise",
            "blind",
            "tweedie",
            Job((0, 1, 2), noisy=torch.zeros(3, 3, 8, 8), sigma=(25.0, 20.0)),
        )


# ------------------------------------------------------------------------------------------ autocast (--dtype)


def test_bf16_autocast_reaches_the_networks() -> None:
    """amp_dtype bf16 (`--dtype bf16`) runs the DDPM and the DIP under autocast: their results move by bf16
    rounding (about 1e-2 relative), not more, and not at all in fp32."""
    from tdpm_dip.dip import DIPConfig, fit_dip
    from tdpm_dip.models import build_unet

    unet = build_unet("tiny", seed=0, sample_size=8).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    e32 = EpsModel(unet, SCHED).eps(x, 10)
    e16 = EpsModel(unet, SCHED, torch.bfloat16).eps(x, 10)
    assert e16.dtype == torch.float32 and torch.equal(EpsModel(unet, SCHED, torch.float32).eps(x, 10), e32)
    gap = float((e16 - e32).abs().max() / e32.abs().max())
    assert 1e-4 < gap < 0.1, gap
    # A seeded target: the bf16 gap of two DIP steps ranges 0.035 to 0.11 over targets, so the global RNG's state
    # (what earlier tests drew) decided whether the bound held.
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = DIPConfig(preset="dip-tiny", iters=2, lr=1e-2)
    a, b = fit_dip(target, z, [0], cfg), fit_dip(target, z, [0], cfg, amp_dtype=torch.bfloat16)
    gap = float((a.output - b.output).abs().max() / a.output.abs().max())
    assert 1e-4 < gap < 0.1 and not torch.equal(a.loss, b.loss), gap


# ------------------------------------------------------------------------------------------ more of the same paths


class FakeShard:
    """A one-process Shard stand-in: records that the dispatch handed it the method, then runs it whole."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def run(self, fn, ctx, job, desc):
        self.calls.append((desc, tuple(job.noisy.shape[-2:])))
        return fn(ctx, job)


def test_run_native_hands_the_shard_every_job() -> None:
    """Under `accelerate launch` each process runs its share: run_native passes the shard on, padded or not."""
    from tdpm_dip.dip import DIPConfig
    from tdpm_dip.methods import Context, Job, run_native

    ctx = Context(eps_zero(), SCHED, DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="dip-tiny"))
    shard = FakeShard()
    for h, w in ((16, 16), (13, 19)):
        y = noisy_8bit(h, w, seed=3)
        res = run_native(ctx, "tweedie", Job((0,), noisy=y, sigma=(25.0,), declip=False), shard)  # type: ignore[arg-type]
        assert torch.equal(res.images, y)
    assert shard.calls == [("denoise tweedie", (16, 16)), ("denoise tweedie", (14, 20))]  # networks of 2 levels


def test_amortized_sampler_clamps_a_chain_of_no_steps_and_casts_to_the_networks_dtype() -> None:
    """T_trunc = 0: the sample is G(z) itself, clamped to [-1, 1] (with steps, the last DDPM step already returns a
    clipped x0). A generator network in bf16 gets its latents in bf16 and returns float32."""
    from tdpm_dip.generator import TDPMGenerator
    from tdpm_dip.models import build_unet

    net = StubG()
    gen = TDPMGenerator(net, 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    g = gens([1, 2])
    z = draw((3, 8, 8), g)
    big = TDPMGenerator(StubG(), 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    big.unet.forward = lambda z, t, class_labels=None: SimpleNamespace(sample=6 * z)  # type: ignore[method-assign]
    out = big.sample(EpsModel(eps_zero(), SCHED), image_generators([1, 2]))
    assert torch.equal(out, (6 * z).clamp(-1, 1)) and (6 * z).abs().max() > 2
    assert torch.equal(gen.sample(EpsModel(eps_zero(), SCHED), image_generators([1, 2])), (0.5 * z).clamp(-1, 1))
    unet = build_unet("generator-small", seed=0, sample_size=8).to(torch.bfloat16).eval()
    bf = TDPMGenerator(unet, 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    assert bf.w_dim > 0
    x = bf.x_t(EpsModel(eps_zero(), SCHED), image_generators([1, 2]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_progress_labels_of_the_paper_and_generation_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chain's bar says what it runs: paper ddpm "DDPM reverse", TDPM-DIP "TDPM reverse", generation ddpm
    "DDPM 1000 steps"; every Result carries the seconds it took."""
    from tdpm_dip.data import make_sprites
    from tdpm_dip.methods import Context, Job, common, generate, paper, run

    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(paper, "fit", FakeFit())
    monkeypatch.setattr(generate, "fit", FakeFit())
    ctx = Context(eps_zero(), SCHED, progress=True)
    clean = make_sprites(2, SIZE, seed=2).images
    for task, protocol, method, job, desc, total in (
        ("denoise", "paper", "ddpm", Job((0, 1), clean=clean, t_noisy=7), "DDPM reverse", 7),
        ("denoise", "paper", "tdpm-dip", Job((0, 1), clean=clean, t_noisy=7, t_trunc=3), "TDPM reverse", 3),
        ("generate", "paper", "tdpm-dip", Job((0, 1), reference=clean, t_trunc=4), "TDPM reverse", 4),
        ("generate", "unconditional", "ddpm", Job((0, 1)), "DDPM 1000 steps", 1000),
        ("generate", "unconditional", "ddim", Job((0, 1), ddim_steps=2), None, None),
    ):
        RecordingBar.bars = []
        res = run(ctx, task, protocol, method, job)
        assert isinstance(res.seconds, float) and res.seconds >= 0, method
        assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == ([] if desc is None else [(desc, total, total)])


def test_start_level_by_hand_where_abar_is_far_from_one() -> None:
    """At T0 = 300 (abar 0.40) the rule's ratio ((1 - abar_T0) + e) / abar_T0 differs from any other reading of
    it; a ratio beyond the schedule gives T - 1 (the largest truncation level), a tiny one level 1."""
    from tdpm_dip.methods.blind import start_level
    from tdpm_dip.noise import level_for_ratio

    ac = linear_abar()
    ratio = ((1 - ac) / ac).tolist()
    a0 = float(SCHED.alphas_cumprod[299])
    for e, cap in ((0.05, 1000), (0.3, 1000), (0.3, 320)):
        need = ((1 - a0) + e) / a0
        expected = min(max(next(i + 1 for i, r in enumerate(ratio) if r >= need), 300), cap)
        assert start_level(SCHED, 300, e, cap) == expected, (e, cap)
    assert start_level(SCHED, 300, 0.05, 1000) > 300
    assert level_for_ratio(SCHED, 1e9) == 999 and level_for_ratio(SCHED, 0.0) == 1


def test_blind_sigmas_accepts_low_noise() -> None:
    """An estimate of 1 (noise std 1 on 0..255) is low, not absent: it is used, not refused."""
    from tdpm_dip.methods.observe import blind_sigmas
    from tdpm_dip.noise import add_noise

    (est,) = blind_sigmas([add_noise(torch.zeros(1, 3, 64, 64), 1.0, [0], "float")[0]], None)
    assert 0.8 < est < 1.2


# ------------------------------------------------------------------------------------------ further kills


def test_make_scheduler_config_is_the_shipped_checkpoints() -> None:
    """What training writes into a checkpoint's scheduler/ (a DDPMPipeline folder that diffusers reads) is the
    configuration of the shipped DDPMs, key for key: variance_type "fixed_small", clip_sample, epsilon, linear betas."""
    import json
    from pathlib import Path

    import tdpm_dip

    config = dict(make_scheduler().config)
    paths = sorted((Path(tdpm_dip.__file__).parent / "weights").glob("*/scheduler/scheduler_config.json"))
    assert "ddpm-sprites32" in [p.parts[-3] for p in paths]
    for path in paths:
        shipped = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        assert {k: config[k] for k in shipped} == shipped, path
    assert config["variance_type"] == "fixed_small"


def half_normal_root(m: float) -> float:
    """sigma solving 2 Phi(m / sigma) - 1 = Phi(0.5 / sigma) (Brent's method, not the code's bisection)."""
    from scipy import optimize, special

    return float(optimize.brentq(lambda s: 2 * special.ndtr(m / s) - 1 - special.ndtr(0.5 / s), 0.3, 100, xtol=1e-13))


def test_sigma_255_takes_the_half_normal_from_200_tail_pixels_and_below_one() -> None:
    """A white image (every pixel stored at 255) with n pixels at 254: each is a tail sample |n| = 1 (their 9 x 9
    neighbourhoods are mostly at the bound). n = 200 is enough for the half-normal estimate, the root of
    2 Phi(1 / sigma) - 1 = Phi(0.5 / sigma), sigma = 0.9717 (below 1: the bisection starts below it); n = 199 is not,
    and the wavelet estimate of an all-clipped image is 0."""
    from tdpm_dip.methods.observe import sigma_255

    spots = [(i, j) for i in range(1, 64, 3) for j in range(1, 64, 3)]
    assert len(spots) >= 200
    root = half_normal_root(1.0)
    assert root == pytest.approx(0.97172629, abs=1e-7)
    for n, expected in ((200, root), (199, 0.0), (250, root)):
        y = np.full((64, 64, 3), 255.0)
        for i, j in spots[:n]:
            y[i, j, 1] = 254.0
        assert sigma_255(y) == pytest.approx(expected, abs=1e-9), n


def test_sigma_255_reads_saturation_in_a_9_pixel_window() -> None:
    """Alternate columns stored at 255 and 250: every 9 x 9 window around a 250 pixel holds 4 stored columns of 9
    (0.444 < 0.45), so no pixel counts as a saturated region's tail and the estimate is the wavelet one
    (a 3 x 3 window would see 2 of 3 and read 5-level tails everywhere)."""
    from tdpm_dip.methods.observe import _wavelet_sigma, sigma_255

    y = np.full((32, 33, 3), 250.0)
    y[:, 1::2, :] = 255.0
    assert sigma_255(y) == _wavelet_sigma(y)
    assert sigma_255(y) < 1  # not a half-normal reading of |n| = 5 tails (sigma ~ 7)
    y[:, :, :] = 255.0
    y[1::3, 1::3, :] = 250.0  # 1 pixel in 9 off the bound: a saturated region, its tails are |n| = 5
    assert sigma_255(y) == pytest.approx(half_normal_root(5.0), abs=1e-9)


def test_sigma_255_computes_in_double_precision() -> None:
    """float32 and float64 pixels give the same estimate to 1e-12, on the wavelet path too (a photo-like image
    without saturated regions)."""
    from tdpm_dip.methods.observe import sigma_255

    rng = np.random.default_rng(5)
    y = np.clip(np.round(128 + 30 * np.sin(np.arange(48)[:, None, None] / 5) + rng.normal(0, 12, (48, 40, 3))), 0, 255)
    est = sigma_255(y)
    assert 9 < est < 15
    assert sigma_255(y.astype(np.float32)) == pytest.approx(est, rel=1e-12)


def test_wavelet_sigma_at_the_far_border_of_odd_sizes() -> None:
    """On a 33 x 31 image the last diagonal coefficient each way reads pixels N-1, N-2 and N-3 through the
    symmetric extension: with row 30 and column 28 clipped, the last row and column of coefficients stay out of the
    estimate. Which coefficients a pixel reaches is read off pywt (the impulse response), not from the code under
    test."""
    import pywt

    from tdpm_dip.methods.observe import _wavelet_sigma

    rng = np.random.default_rng(2)
    y = np.clip(np.round(128 + rng.normal(0, 20, (33, 31, 1))), 1, 254)
    y[30, :, 0] = 255.0
    y[:, 28, 0] = 0.0
    d = np.abs(pywt.dwt2(y[..., 0], "db2", mode="symmetric")[1][2])
    keep = np.ones_like(d, dtype=bool)
    for i, j in np.argwhere((y[..., 0] == 0) | (y[..., 0] == 255)):
        e = np.zeros((33, 31))
        e[i, j] = 1.0
        keep &= np.abs(pywt.dwt2(e, "db2", mode="symmetric")[1][2]) < 1e-12
    assert d.shape == (18, 17) and not keep[15:, :].any() and not keep[:, 14:].any() and keep[:15, :14].all()
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d[keep]) / 0.6745), rel=1e-12)


def test_ensemble_averages_its_own_declip_draw_per_symmetry() -> None:
    """Symmetry j of the ensemble sees declip's draw j (seeds + 1000003 j): with eps = c x every symmetry's estimate
    is k y_j, so the ensemble is k times the mean of 8 independent declipped observations, clamped (k < 1 keeps
    many declipped pixels inside [-1, 1], where one draw used 8 times would differ)."""
    from test_exact import declip_by_hand, tweedie_factor

    from tdpm_dip.methods import Context, Job, run

    y = noisy_8bit(SIZE, SIZE, seed=7, n=2)
    seeds = [3, 9]
    unet = eps_linear()
    res = run(Context(unet, SCHED), "denoise", "blind", "ensemble", Job(tuple(seeds), noisy=y, sigma=(25.0,)))
    k = tweedie_factor(unet, T_STAR_25)
    assert 0.5 < k < 0.9
    draws = [declip_by_hand(y, [25.0, 25.0], [s + 1_000_003 * j for s in seeds]) for j in range(8)]
    expected = (k * torch.stack(draws).mean(0)).clamp(-1, 1)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6)
    one_draw = (k * draws[0]).clamp(-1, 1)
    assert ((one_draw - expected).abs() > 1e-3).float().mean() > 0.05  # not vacuous


def test_blind_tdpm_dip_progress_bar_says_tdpm_reverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blind TDPM-DIP chain's bar is labelled "TDPM reverse" and counts its steps from the start level."""
    from tdpm_dip.methods import Context, Job, blind, common, run

    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(blind, "fit", FakeFit())
    RecordingBar.bars = []
    y = noisy_8bit(SIZE, SIZE, seed=6, n=2)
    run(
        Context(eps_zero(), SCHED, progress=True),
        "denoise",
        "blind",
        "tdpm-dip",
        Job((3, 4), noisy=y, sigma=(25.0,), samples=1, t_trunc=3),
    )
    assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == [("TDPM reverse", 3, 3)]


def test_add_noise_draws_in_the_images_dtype() -> None:
    """A float64 clean image gets noise drawn as float64 from seed + 104729 (not float32 noise widened)."""
    from tdpm_dip.noise import add_noise

    clean = torch.linspace(-0.5, 0.5, 3 * 4 * 4, dtype=torch.float64).view(1, 3, 4, 4)
    n = torch.randn((3, 4, 4), generator=gens([5 + 104729])[0], dtype=torch.float64)
    got = add_noise(clean, 10.0, [5], "float")
    assert got.dtype == torch.float64 and torch.allclose(got[0], clean[0] + (20 / 255) * n, rtol=0, atol=1e-15)


def test_sigma_to_level_and_job_sigmas_messages() -> None:
    """The exact one-line messages: a noise std outside (0, 255] names "sigma"; a job with neither one sigma nor one
    per image says so."""
    from tdpm_dip.methods import Job
    from tdpm_dip.methods.blind import job_sigmas

    for bad in (0, 256.0):
        with pytest.raises(UserError) as e:
            sigma_to_level(SCHED, bad)
        assert str(e.value) == f"sigma must be in (0, 255] (noise std on the 0..255 scale), got {bad}"
    with pytest.raises(ValueError) as v:
        job_sigmas(Job((0, 1, 2), sigma=(25.0, 20.0)), 3)
    assert str(v.value) == "one sigma, or one per image"


def test_eps_model_hands_the_network_its_own_dtype() -> None:
    """x reaches the network in the network's dtype (without autocast a bf16 or float64 network needs its own
    dtype), whatever the chain's; eps comes back in float32."""
    unet = eps_linear()
    unet.dtype = torch.float64
    seen: list[torch.dtype] = []
    forward = unet.forward
    unet.forward = lambda x, t, class_labels=None: (seen.append(x.dtype), forward(x, t))[1]  # type: ignore[method-assign]
    e = EpsModel(unet, SCHED).eps(torch.ones(1, 3, 4, 4), 3)
    assert seen == [torch.float64] and e.dtype == torch.float32 and torch.equal(e, torch.full((1, 3, 4, 4), 0.06))

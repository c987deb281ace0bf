"""The samplers (sampling.py): EpsModel's x0 and eps, the DDPM reverse chain (full and strided), DDIM between two
levels and from pure noise. Each is compared with its closed form (tests/by_hand.py) on stub noise predictors whose
eps is known by hand (tests/stubs.py), or, for one posterior step, on a real tiny UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from by_hand import AC, SCHED, abar, ddim_by_hand, ddpm_chain_by_hand, draw, gens, noisy_8bit
from stubs import eps_linear, eps_zero, tiny_unet

from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, run
from tdpm_dip.models import build_unet
from tdpm_dip.noise import image_generators, make_scheduler, randn
from tdpm_dip.sampling import EpsModel, ddim_between, ddim_chain, ddim_step, diffpir_step, reverse_chain, sample

# ------------------------------------------------------------------------------------------ EpsModel


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


# ------------------------------------------------------------------------------------------ the DDPM reverse chain


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


def test_reverse_chain_reports_each_step_and_refuses_bad_levels() -> None:
    seen: list[int] = []
    x = torch.zeros(1, 3, 4, 4)
    reverse_chain(EpsModel(tiny_unet(), SCHED), x, 3, image_generators([0]), callback=seen.append)
    assert seen == [2, 1, 0]
    for t in (-1, 1001):
        with pytest.raises(UserError):
            reverse_chain(EpsModel(tiny_unet(), SCHED), x, t, image_generators([0]))


def test_reverse_chain_takes_exactly_t_steps_with_the_posterior_step() -> None:
    unet = build_unet("tiny", seed=0, sample_size=8)
    s = make_scheduler("linear")
    seen: list[int] = []
    x = randn((3, 8, 8), image_generators([0]))
    out = reverse_chain(EpsModel(unet, s), x, 5, image_generators([1]), callback=seen.append)
    assert seen == [4, 3, 2, 1, 0] and out.shape == x.shape
    # One step by hand: the DDPM posterior mean through x0 (clipped) plus sigma_t z (Ho et al. Alg. 2).
    t = 3
    g1, g2 = image_generators([9]), image_generators([9])
    with torch.no_grad():
        eps = unet(x, t).sample
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[t - 1]
    beta = 1 - a_t / a_prev
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
    var = (1 - a_prev) / (1 - a_t) * beta
    z = torch.randn(x.shape, generator=g2[0])
    expected = mean + var.sqrt() * z
    got = s.step(eps, t, x, generator=g1).prev_sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_t_trunc_zero_returns_the_dip_output() -> None:
    unet = build_unet("tiny", seed=0, sample_size=8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(reverse_chain(EpsModel(unet, make_scheduler("linear")), x, 0, image_generators([0, 1])), x)


# ------------------------------------------------------------------------------------------ DDIM


def test_ddim_between_equals_its_closed_form(make_ctx: Callable[..., Context]) -> None:
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
    res = run(
        make_ctx(unet), "denoise", "blind", "ddim", Job((0, 1), noisy=y, sigma=(25.0,), ddim_steps=5, declip=False)
    )
    assert torch.allclose(res.images, (factor * math.sqrt(abar(57)) * y).clamp(-1, 1), rtol=1e-5, atol=1e-6)


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


def x0_rounding(x: torch.Tensor, eps: torch.Tensor, a: float, ops: int = 4) -> torch.Tensor:
    """How far float32 may put x0 = (x - sqrt(1 - a) eps) / sqrt(a) from its exact value, per element: each of the
    few float32 operations (eps, the product, the difference, the quotient) rounds by at most the unit roundoff
    relative to |x| + sqrt(1 - a) |eps|, and the division by sqrt(a) multiplies that error by 1 / sqrt(a) (156 at
    abar_1000 of the linear schedule). Clamping to [-1, 1] never widens it. Which kernels a CPU runs (AVX2,
    AVX-512) decides where inside this bound the result lands, so a fixed atol is right on one machine only."""
    u = torch.finfo(torch.float32).eps / 2
    return ops * u * (x.abs() + math.sqrt(1 - a) * eps.abs()) / math.sqrt(a) + 1e-12


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


# ------------------------------------------------------------------------------------------ the sampler's data step


def test_sample_applies_the_x0_step_at_each_level_and_diffpir_renoises_by_hand() -> None:
    """`x0_step(x0, t)` sees each level's clipped x0 and its output is what the rule uses; DiffPIR's rule
    (Zhu et al. 2023): x_s = sqrt(abar_s) x0' + sqrt(1 - abar_s) (sqrt(1 - zeta) eps^ + sqrt(zeta) z), eps^ the noise
    x0' implies in x_t, z from the image's generator; the last step (s = 0) returns x0'."""
    unet = eps_linear(1e-3)
    model = EpsModel(unet, SCHED)
    x = 0.3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    seen: list[int] = []

    def halve(x0: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        return 0.5 * x0

    zeta = 0.3
    got = sample(model, x, [40, 20, 0], gens([7, 8]), rule=diffpir_step(zeta), x0_step=halve)
    assert seen == [40, 20]
    g, want = gens([7, 8]), x.double()
    for hi, lo in ((40, 20), (20, 0)):
        eps = unet.coef(hi - 1) * want
        x0 = 0.5 * ((want - math.sqrt(1 - abar(hi)) * eps) / math.sqrt(abar(hi))).clamp(-1, 1)
        if lo == 0:
            want = x0
            break
        eps_hat = (want - math.sqrt(abar(hi)) * x0) / math.sqrt(1 - abar(hi))
        z = draw((3, 4, 4), g).double()
        want = math.sqrt(abar(lo)) * x0 + math.sqrt(1 - abar(lo)) * (
            math.sqrt(1 - zeta) * eps_hat + math.sqrt(zeta) * z
        )
    assert torch.allclose(got.double(), want, atol=1e-5)
    # zeta = 1: fresh noise only (annealed denoising), whatever x_t was
    a = sample(model, x, [40, 20], gens([7, 8]), rule=diffpir_step(1.0), x0_step=lambda x0, t: torch.zeros_like(x0))
    assert torch.allclose(a, math.sqrt(1 - abar(20)) * draw((3, 4, 4), gens([7, 8])), atol=1e-6)


def test_ddim_step_is_deterministic_by_default() -> None:
    """ddim_step() is DDIM with eta = 0: no noise is drawn and x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps."""
    x, x0, eps = torch.full((1, 3, 2, 2), 0.2), torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -0.1)

    def no_noise() -> torch.Tensor:
        raise AssertionError("eta 0 draws no noise")

    got = ddim_step()(x, x0, eps, abar(30), abar(10), no_noise)
    assert torch.allclose(got, math.sqrt(abar(10)) * x0 + math.sqrt(1 - abar(10)) * eps, atol=1e-6)

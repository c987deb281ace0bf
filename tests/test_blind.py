"""Blind denoising (methods/blind.py) and the method registry: each estimator against its closed form on stub noise
predictors (tests/stubs.py, tests/by_hand.py) and on tiny networks, the start level of blind TDPM-DIP, what the
Results record, every registered method's seeds and batch sizes, and the user's path through the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from by_hand import (
    AC,
    SCHED,
    T0,
    T_STAR_25,
    abar,
    ddpm_chain_by_hand,
    declip_by_hand,
    draw,
    gens,
    level_of_sigma,
    linear_abar,
    noisy_8bit,
    tweedie_factor,
)
from cli_helpers import run as run_cli
from jobs import denoise_alone, denoise_blind, denoise_paper, png_tensor
from PIL import Image
from stubs import PATTERN, SIZE, FakeFit, StubUNet, eps_linear, eps_zero, tiny_unet

from tdpm_dip import registry
from tdpm_dip.api import Denoiser
from tdpm_dip.cli import cli
from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig, DIPResult
from tdpm_dip.embedded import default_ddpm
from tdpm_dip.errors import UserError
from tdpm_dip.generator import TDPMGenerator as Generator
from tdpm_dip.images import to_uint8
from tdpm_dip.methods import Context, Job, blind, common, observe, paper, run
from tdpm_dip.methods.blind import ensemble_estimate as ensemble_tweedie
from tdpm_dip.methods.blind import ensemble_size, start_level
from tdpm_dip.methods.blind import tweedie_estimate as tweedie
from tdpm_dip.metrics import psnr
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import abar as level_abar
from tdpm_dip.noise import add_noise, level_for_ratio, make_scheduler, sigma_to_level


@pytest.fixture(scope="module")
def ctx(make_ctx: Callable[..., Context]) -> Context:
    cfg = DIPConfig(preset="dip-tiny", iters=3, lr=1e-3, input_noise=1.0, average=0.9)
    # An untrained G_psi at T_trunc 2 (the T_trunc of _job_for), so amortized `tdpm` runs like every method.
    gen = Generator(build_unet("generator-small", seed=1, sample_size=SIZE).eval(), 2, (3, SIZE, SIZE), {}, "random")
    return make_ctx(
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


@pytest.fixture(scope="module")
def trained_tiny() -> tuple[torch.nn.Module, object]:
    """A tiny 32 px DDPM trained briefly on sprites at small noise levels, where short chains work."""
    data = make_sprites(32, 32, seed=11).images
    sched = make_scheduler("linear")
    unet = build_unet("tiny", seed=0, sample_size=32)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        x0 = data[torch.randint(0, len(data), (16,), generator=g)]
        t = torch.randint(0, 100, (16,), generator=g)  # the blind chains here start below level 100
        eps = torch.randn(x0.shape, generator=g)
        loss = ((unet(sched.add_noise(x0, eps, t), t).sample - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), sched


# ------------------------------------------------------------------------------------------ Tweedie


def test_identity_denoiser_returns_the_clamped_observation(make_ctx: Callable[..., Context]) -> None:
    """eps = 0: Tweedie's posterior mean is y itself; the method returns the (declipped) observation clamped to
    [-1, 1], i.e. y.clamp(-1, 1) (declipped pixels go past +-1 and are clamped back); the ensemble too."""
    y = 1.3 * torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y[:, :, :3] = 1.0  # stored on the bounds: what declip acts on
    y[:, :, -3:] = -1.0
    for method, calls in (("tweedie", 1), ("ensemble", 8)):
        for declip in (False, True):
            unet = tiny_unet(zero=True)
            res = run(make_ctx(unet), "denoise", "blind", method, Job((0, 1, 2), noisy=y, sigma=(25.0,), declip=declip))
            if method == "tweedie":
                assert torch.equal(res.images, y.clamp(-1, 1)), declip
            else:  # the mean of 8 equal terms may round by an ulp
                assert torch.allclose(res.images, y.clamp(-1, 1), rtol=0, atol=1e-6), declip
            assert unet.timesteps == [T_STAR_25 - 1] * calls  # t* = 57: timestep 56, one batch of 3
            assert res.nfe == calls


def test_tweedie_with_a_linear_eps_per_image_sigma_and_declip(make_ctx: Callable[..., Context]) -> None:
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
            make_ctx(unet),
            "denoise",
            "blind",
            "tweedie",
            Job(tuple(seeds), noisy=y, sigma=tuple(sigmas), declip=declip),
        )
        obs = declip_by_hand(y, sigmas, seeds) if declip else y
        k = torch.tensor([tweedie_factor(unet, t) for t in levels]).view(-1, 1, 1, 1)
        assert torch.allclose(res.images, (k * obs).clamp(-1, 1), rtol=0, atol=1e-6), declip
        assert sorted(unet.timesteps) == sorted(t - 1 for t in levels)
        outputs[declip] = res.images
    # Not vacuous: the declipped draws survive the clamp in many pixels (|k| < 1), so they are compared.
    assert ((outputs[True] - outputs[False]).abs() > 1e-3).float().mean() > 0.1


def test_tweedie_equals_its_closed_form(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    t = sigma_to_level(ctx.scheduler, 25)
    a = level_abar(ctx.scheduler, t)
    with torch.no_grad():
        eps = ctx.unet(math.sqrt(a) * y, t - 1).sample
    expected = (math.sqrt(a) * y - math.sqrt(1 - a) * eps) / math.sqrt(a)
    assert torch.allclose(tweedie(ctx, y, [t] * 4), expected, atol=1e-5)
    res = denoise_blind(ctx, y, "tweedie", [0, 1, 2, 3], 25)
    assert res.nfe == 1 and torch.allclose(res.images, expected.clamp(-1, 1), atol=1e-5)


# ------------------------------------------------------------------------------------------ the ensemble


def test_ensemble_is_the_mean_over_the_symmetries_and_equivariant(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    t = [sigma_to_level(ctx.scheduler, 25)] * 4
    e = ensemble_tweedie(ctx, [y] * 8, t)
    assert torch.allclose(ensemble_tweedie(ctx, [y], t), tweedie(ctx, y, t), atol=1e-6)
    # Averaging over the whole group makes the estimator equivariant: flipping y flips the output.
    assert torch.allclose(ensemble_tweedie(ctx, [y.flip(-1)] * 8, t), e.flip(-1), atol=1e-5)
    assert torch.allclose(ensemble_tweedie(ctx, [y.transpose(-1, -2)] * 8, t), e.transpose(-1, -2), atol=1e-5)


def test_ensemble_averages_fewer_symmetries_on_large_images(make_ctx: Callable[..., Context]) -> None:
    """8 symmetries up to 256 x 256 px, then in proportion to the pixels (at least 1); --symmetries overrides.
    A 368 x 368 image averages 3 (8 * 65536 // 135424): 3 network calls at t*, the identity's output still y."""
    sizes = [(64, 64), (256, 256), (257, 256), (300, 300), (512, 512), (1024, 1024)]
    assert [ensemble_size(None, h, w) for h, w in sizes] == [8, 8, 7, 5, 2, 1]
    assert ensemble_size(3, 512, 512) == 3 and ensemble_size(8, 1024, 1024) == 8
    for bad in (0, 9):
        with pytest.raises(UserError, match="1 to 8"):
            ensemble_size(bad, 64, 64)
    y = 0.5 * torch.randn(1, 3, 368, 368, generator=torch.Generator().manual_seed(0))
    for symmetries, calls in ((None, 3), (1, 1), (2, 2)):
        unet = eps_zero()  # the stub: a real UNet takes ~0.5 s a call at 368 px
        job = Job((0,), noisy=y, sigma=(25.0,), declip=False, symmetries=symmetries)
        res = run(make_ctx(unet), "denoise", "blind", "ensemble", job)
        assert res.nfe == calls and unet.timesteps == [T_STAR_25 - 1] * calls, symmetries
        assert torch.allclose(res.images, y.clamp(-1, 1), rtol=0, atol=1e-6)


def test_ensemble_averages_its_own_declip_draw_per_symmetry(make_ctx: Callable[..., Context]) -> None:
    """Symmetry j of the ensemble sees declip's draw j (seeds + 1000003 j): with eps = c x every symmetry's estimate
    is k y_j, so the ensemble is k times the mean of 8 independent declipped observations, clamped (k < 1 keeps
    many declipped pixels inside [-1, 1], where one draw used 8 times would differ)."""
    y = noisy_8bit(SIZE, SIZE, seed=7, n=2)
    seeds = [3, 9]
    unet = eps_linear()
    res = run(make_ctx(unet), "denoise", "blind", "ensemble", Job(tuple(seeds), noisy=y, sigma=(25.0,)))
    k = tweedie_factor(unet, T_STAR_25)
    assert 0.5 < k < 0.9
    draws = [declip_by_hand(y, [25.0, 25.0], [s + 1_000_003 * j for s in seeds]) for j in range(8)]
    expected = (k * torch.stack(draws).mean(0)).clamp(-1, 1)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6)
    one_draw = (k * draws[0]).clamp(-1, 1)
    assert ((one_draw - expected).abs() > 1e-3).float().mean() > 0.05  # not vacuous


# ------------------------------------------------------------------------------------------ chains: ddpm and ddim


def test_blind_and_paper_ddpm_are_the_chain_by_hand(make_ctx: Callable[..., Context]) -> None:
    """The whole path of the ddpm methods: blind scales y to x_t* = sqrt(abar_t*) y and averages K chains
    that continue the same generators; paper draws z first, x_tn = sqrt(abar) x0 + sqrt(1 - abar) z, then
    runs t_noisy steps on the same generators."""
    y = noisy_8bit(8, 8, seed=2, n=3)
    unet = eps_linear(0.005)
    res = run(
        make_ctx(unet, batch_size=2),
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
    res = run(make_ctx(unet), "denoise", "paper", "ddpm", Job((9, 10), clean=clean, t_noisy=20))
    g = gens([9, 10])
    x_tn = math.sqrt(abar(20)) * clean + math.sqrt(1 - abar(20)) * draw((3, SIZE, SIZE), g)
    assert torch.allclose(res.inputs, x_tn, rtol=0, atol=1e-6)
    assert torch.allclose(res.images, ddpm_chain_by_hand(unet, x_tn, 20, g), rtol=0, atol=1e-6)
    assert unet.timesteps == list(range(19, -1, -1))


def test_mean_of_k_chains_has_lower_variance_than_one(ctx: Context, sprites: torch.Tensor) -> None:
    y = add_noise(sprites[:1].repeat(6, 1, 1, 1), 10, [0] * 6, "float")  # one observation, six seeds
    seeds = list(range(10, 16))
    one = denoise_blind(ctx, y, "ddpm", seeds, 10, samples=1).images
    four = denoise_blind(ctx, y, "ddpm", seeds, 10, samples=4).images
    assert four.var(0).mean() < 0.5 * one.var(0).mean()
    assert denoise_blind(ctx, y[:1], "ddpm", [0], 10, samples=4).nfe == 4 * sigma_to_level(ctx.scheduler, 10)


def test_blind_ddim_from_each_images_own_level_by_hand(make_ctx: Callable[..., Context]) -> None:
    """Images at different t* run in groups; a level below the step count takes one step per level (sigma 2:
    t* = 2 < 10 steps); eps = c x makes every step a known factor: ddim_between's closed form."""
    y = noisy_8bit(8, 8, seed=5, n=3)
    sig = (2.0, 25.0, 2.0)
    levels = [sigma_to_level(SCHED, s) for s in sig]
    assert levels[0] < 10 < levels[1]
    unet = eps_linear()
    res = run(
        make_ctx(unet, batch_size=1), "denoise", "blind", "ddim", Job((0, 1, 2), noisy=y, sigma=sig, declip=False)
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
        make_ctx(StubUNet(base=-0.5)),
        "denoise",
        "blind",
        "ddim",
        Job((0,), noisy=ramp, sigma=(25.0,), declip=False, ddim_steps=1),
    )
    f = 1 + math.sqrt(1 - abar(T_STAR_25)) * 0.5  # one step to level 0: x0 = (1 + 0.5 sqrt(1 - abar)) y
    assert (f * ramp).max() > 1.05 and (f * ramp).min() < -1.05
    assert torch.allclose(res.images, (f * ramp).clamp(-1, 1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ DIP and TDPM-DIP


def test_start_level_rule_matches_a_known_fit_error() -> None:
    """A DIP that misses its x_T0 target by a known mean square error starts the chain where the noise
    variance covers target noise plus that error; a perfect fit starts at T0; never above t*."""
    sched = make_scheduler("linear")
    a0 = level_abar(sched, 10)
    assert start_level(sched, 10, 0.0, cap=57) == 10
    for std in (0.05, 0.1):  # the DIP's error, on [-1, 1] images
        t = start_level(sched, 10, std**2, cap=1000)
        ratio = (1 - level_abar(sched, t)) / level_abar(sched, t)
        expected = ((1 - a0) + std**2) / a0
        below = (1 - level_abar(sched, t - 1)) / level_abar(sched, t - 1)
        assert below < expected <= ratio  # the first level that covers it
    assert start_level(sched, 10, 0.5, cap=57) == 57
    # The error of a real fit is what the rule reads: the blind estimate's level is that of its DIP.
    rng = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 32, 32)
    g = x + 0.1 * torch.randn(x.shape, generator=rng)
    mse = float(((g - x) ** 2).mean())
    assert abs(mse - 0.01) < 0.001 and start_level(sched, 10, mse, 1000) == start_level(sched, 10, 0.01, 1000)


def test_start_level_by_hand_where_abar_is_far_from_one() -> None:
    """At T0 = 300 (abar 0.40) the rule's ratio ((1 - abar_T0) + e) / abar_T0 differs from any other reading of
    it; a ratio beyond the schedule gives T - 1 (the largest truncation level), a tiny one level 1."""
    ac = linear_abar()
    ratio = ((1 - ac) / ac).tolist()
    a0 = float(SCHED.alphas_cumprod[299])
    for e, cap in ((0.05, 1000), (0.3, 1000), (0.3, 320)):
        need = ((1 - a0) + e) / a0
        expected = min(max(next(i + 1 for i, r in enumerate(ratio) if r >= need), 300), cap)
        assert start_level(SCHED, 300, e, cap) == expected, (e, cap)
    assert start_level(SCHED, 300, 0.05, 1000) > 300
    assert level_for_ratio(SCHED, 1e9) == 999 and level_for_ratio(SCHED, 0.0) == 1


def test_blind_tdpm_dip_starts_each_chain_from_the_rescaled_dip_output(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """job.t_trunc None: the DIP is fitted to x_T0 = sqrt(abar_T0) x_hat + sqrt(1 - abar_T0) z (T0 = 10, z the
    image's first draw) and G(z) misses it by a known mean square error e; the chain of that image starts at
    the first level t with (1 - abar_t) / abar_t >= ((1 - abar_T0) + e) / abar_T0, kept in [T0, t*], from
    sqrt(abar_t / abar_T0) G(z), once per sample, with the image's own generator."""
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
        make_ctx(tiny_unet(zero=True)),
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
        make_ctx(tiny_unet(zero=True)),
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


def test_blind_dip_and_tdpm_dip_results(monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]) -> None:
    """dip fits G(z) to y itself with ctx.dip (z: each image's first draw, at the image's size) and returns G(z);
    tdpm-dip fits with the plugin settings and records its levels and fit errors. Costs: DIP iterations (+ the
    chain; + the 8 calls of the ensemble estimate for NFE)."""
    fake = FakeFit()
    monkeypatch.setattr(blind, "fit", fake)
    y = noisy_8bit(SIZE, SIZE, seed=6, n=2)
    clean = make_sprites(2, SIZE, seed=11).images
    cfg, plugin = DIPConfig(preset="dip-tiny", iters=7), DIPConfig(preset="dip-tiny", iters=5)
    ctx = make_ctx(dip=cfg, dip_plugin=plugin)
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


def test_blind_dip_and_tdpm_dip_raise_psnr_at_sigma_25(trained_tiny, make_ctx: Callable[..., Context]) -> None:
    unet, sched = trained_tiny
    clean = make_sprites(2, 32, seed=3).images
    seeds = [0, 1]
    noisy = add_noise(clean, 25, seeds, "float")
    base = float(psnr(noisy, clean).mean())
    cfg = DIPConfig(preset="dip-tiny", iters=200, lr=3e-3, input_noise=1.0, average=0.95)
    ctx = make_ctx(unet, sched, cfg, batch_size=2)
    dip = denoise_blind(ctx, noisy, "dip", seeds, 25, clean=clean)
    tdpm = denoise_blind(ctx, noisy, "tdpm-dip", seeds, 25, samples=2, clean=clean)
    assert dip.protocol == tdpm.protocol == "blind"
    p_dip, p_tdpm = float(psnr(dip.images, clean).mean()), float(psnr(tdpm.images, clean).mean())
    assert p_dip > base + 1.0, (base, p_dip)
    assert p_tdpm > base + 1.0, (base, p_tdpm)
    # Each chain starts at the level the blind rule gives for its DIP's fit error e (by hand): the first level t
    # with (1 - abar_t) / abar_t >= ((1 - abar_T0) + e) / abar_T0, T0 = 10, kept in [T0, t*]: a shorter chain
    # than blind DDPM's.
    levels = tdpm.info["t_trunc"] if isinstance(tdpm.info["t_trunc"], list) else [tdpm.info["t_trunc"]] * 2
    t_star, a0 = sigma_to_level(sched, 25), float(sched.alphas_cumprod[10 - 1])
    ratio = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).tolist()
    expected = []
    for e in tdpm.info["dip_fit_mse"]:
        need = ((1 - a0) + e) / a0
        expected.append(min(max(next(i + 1 for i, r in enumerate(ratio) if r >= need), 10), t_star))
    assert levels == expected, (levels, expected, tdpm.info["dip_fit_mse"])
    assert tdpm.info["dip_target_level"] == 10 and tdpm.reverse_steps == ctx.plugin_dip.iters + max(expected)
    assert math.isfinite(p_tdpm)


# ------------------------------------------------------------------------------------------ what the results record


def test_blind_results_record_their_cost_and_settings(make_ctx: Callable[..., Context]) -> None:
    """What each blind method reports (bench tables and metrics.json read it): NFE and reverse steps per image, the
    noise level and t* (one value, or one per image), declip and the method's own settings; inputs are y."""
    y = noisy_8bit(8, 8, seed=4, n=3)
    sig = (10.0, 25.0, 50.0)
    levels = [sigma_to_level(SCHED, s) for s in sig]

    def run_blind(method: str, **options: object):
        job = Job((0, 1, 2), noisy=y, sigma=sig, declip=False, **options)
        # the stub: the ddpm row runs three chains of up to ~120 steps per image
        return run(make_ctx(eps_zero(), batch_size=2), "denoise", "blind", method, job)

    base = {"sigma": list(sig), "t_star": levels, "declip": False}
    for method, steps, nfe, extra in (
        ("tweedie", 1, 1, {}),
        ("ensemble", 8, 8, {}),
        ("ddpm", max(levels), 3 * max(levels), {"samples": 3}),
        ("ddim", 4, 4, {"ddim_steps": 4}),
    ):
        res = run_blind(method, samples=3, ddim_steps=4)
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == (method, "blind", steps, nfe), method
        assert res.info == base | extra and torch.equal(res.inputs, y) and res.seconds >= 0, method
    res = run_blind("ddim")
    assert res.nfe == res.reverse_steps == 10 and res.info["ddim_steps"] == 10  # defaults.BLIND_DDIM_STEPS
    res = run(make_ctx(), "denoise", "blind", "tweedie", Job((0, 1), noisy=y[:2], sigma=(25.0,)))
    assert res.info == {"sigma": 25.0, "t_star": T_STAR_25, "declip": True}


# ------------------------------------------------------------------------------------------ external baselines


def test_bm3d_baseline_when_installed(make_ctx: Callable[..., Context]) -> None:
    pytest.importorskip("bm3d")
    sprites = make_sprites(4, SIZE, seed=3).images
    unet = build_unet("tiny", seed=0, sample_size=SIZE)
    ctx = make_ctx(unet, make_scheduler("linear"))
    noisy = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    res = denoise_blind(ctx, noisy, "bm3d", [0, 1, 2, 3], 25)
    assert res.protocol == "blind"
    assert float(psnr(res.images, sprites).mean()) > float(psnr(noisy, sprites).mean())


# ------------------------------------------------------------------------------------------ the registry


def test_every_blind_method_depends_only_on_its_own_seed(ctx: Context, sprites: torch.Tensor) -> None:
    """Image i's output is the same alone, in a batch, with another batch size."""
    y = add_noise(sprites, 25, [7, 8, 9, 10], "clipped")

    for m in registry.methods("denoise", "blind"):
        if m.extra:
            continue
        full = denoise_blind(ctx, y, m.name, [7, 8, 9, 10], 25, samples=2).images
        small = denoise_blind(
            dataclasses.replace(ctx, batch_size=1, dip_memo={}), y[2:3], m.name, [9], 25, samples=2
        ).images
        # DIP fits: vmapped (batch) and plain (alone) networks round differently, as in test_dip.py's batched fit
        assert torch.allclose(full[2], small[0], atol=1e-4 if m.uses_dip else 1e-5), m.name


def test_cli_choices_are_the_registry() -> None:
    den = {p.name: p for p in cli.commands["denoise"].params}
    assert set(den["methods"].type.choices) == set(registry.names("denoise"))
    gen = {p.name: p for p in cli.commands["generate"].params}
    assert set(gen["method"].type.choices) == set(registry.names("generate"))
    assert registry.names("denoise", "blind")[0] == "ensemble"  # the recommended method comes first
    with pytest.raises(UserError, match="paper protocol"):
        registry.get("generate", "blind", "tdpm-dip")  # it exists, under another protocol: the error says which


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
    for m in registry.methods(task, protocol):
        full = run(ctx, task, protocol, m.name, _job_for(m, sprites, (3, 4, 5, 6))).images
        alone = run(
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
    seen = []
    real = common.fit

    def spy(c, target, z, seeds, reference, cfg=None):
        seen.append((target.clone(), z.clone()))
        return real(c, target, z, seeds, reference, cfg)

    monkeypatch.setattr(paper, "fit", spy)
    monkeypatch.setattr(blind, "fit", spy)
    denoise_paper(ctx, sprites[:2], "tdpm-dip", [0, 1], t_noisy=20, t_trunc=5)
    target, z = seen[-1]
    a = level_abar(ctx.scheduler, 5)
    assert torch.allclose(target, math.sqrt(a) * sprites[:2] + math.sqrt(1 - a) * z, atol=1e-6)
    y = add_noise(sprites[:2], 25, [0, 1], "clipped")
    denoise_blind(ctx, y, "tdpm-dip", [0, 1], 25, samples=1)
    target, z = seen[-1]
    observed = observe.declip(y, [25.0, 25.0], [0, 1])
    x_hat = ensemble_tweedie(ctx, [observed] * 8, [sigma_to_level(ctx.scheduler, 25)] * 2)
    a = level_abar(ctx.scheduler, 10)
    assert torch.allclose(target, math.sqrt(a) * x_hat + math.sqrt(1 - a) * z, atol=1e-5)


# ------------------------------------------------------------------------------------------ the user's path (CLI)


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

    out = tmp_path / "den"
    code, stdout, err = run_cli(
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
    code, stdout, err = run_cli(
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


def test_cli_input_folder_maps_each_file_to_its_own_output(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`denoise --input DIR` on files of two sizes (two of them the same size, so they share a batch): the output
    file of image i (sorted names) equals the method run in-process on that image alone with seed SEED + i.
    A mix-up between files, between seeds or between the images of one batch fails."""
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
            model,
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
    den = Denoiser.from_pretrained(str(model), device="cpu")  # the context the CLI builds
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
    code, _, err = run_cli(["denoise", "--model", model, "--clean", sprite_dir, *args, "--out", tmp_path / "x"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_denoise_clean_reports_the_noise_model(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for noise in ("clipped", "float"):
        out = tmp_path / noise
        code, _, err = run_cli(
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

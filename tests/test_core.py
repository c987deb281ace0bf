"""Algorithms 2 and 3 and the protocols, on tiny networks (seconds on a CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from jobs import denoise_blind, denoise_paper, generate

from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig, fit_dip
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context
from tdpm_dip.metrics import psnr
from tdpm_dip.models import build_unet
from tdpm_dip.noise import abar, add_noise, image_generators, make_scheduler, q_sample, randn, rescale, sigma_to_level
from tdpm_dip.sampling import EpsModel, ddim_chain, reverse_chain

SIZE = 16


@pytest.fixture(scope="module")
def sprites() -> torch.Tensor:
    return make_sprites(4, SIZE, seed=3).images


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


# ------------------------------------------------------------------------------ noise convention


def test_noise_levels_follow_the_report_convention() -> None:
    s = make_scheduler("linear")
    assert abar(s, 0) == 1.0
    assert abar(s, 1) == pytest.approx(float(s.alphas_cumprod[0]))
    assert abar(s, 600) == pytest.approx(float(s.alphas_cumprod[599]))
    y = torch.full((1, 3, 2, 2), 0.5)
    assert torch.equal(rescale(s, y, 600), math.sqrt(float(s.alphas_cumprod[599])) * y)
    assert torch.allclose(rescale(s, rescale(s, y, 10), 600, 10), rescale(s, y, 600), atol=1e-7)
    assert torch.equal(rescale(s, y, 0), y)
    x0, eps = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(q_sample(s, x0, 0, eps), x0)


def test_sigma_maps_to_matching_noise_to_signal_ratio() -> None:
    for name in ("linear", "cosine"):
        s = make_scheduler(name)
        levels = [sigma_to_level(s, sig) for sig in (15, 25, 50)]
        assert levels == sorted(levels) and len(set(levels)) == 3
        for sig, t in zip((15, 25, 50), levels):
            a = abar(s, t)
            assert (1 - a) / a == pytest.approx((2 * sig / 255) ** 2, rel=0.1)
    # anchors.md: sigma 25 -> t 56 in 0-based indexing, i.e. level 57 in the report's.
    assert sigma_to_level(make_scheduler("linear"), 25) == 57
    with pytest.raises(UserError):
        sigma_to_level(make_scheduler("linear"), 0)
    with pytest.raises(UserError):
        sigma_to_level(make_scheduler("linear"), 1000)


# ------------------------------------------------------------------------------ Algorithm 2


def test_dip_loss_falls_and_psnr_rises(sprites: torch.Tensor) -> None:
    x = sprites[:2]
    z = randn((3, SIZE, SIZE), image_generators([0, 1]))
    res = fit_dip(x, z, [0, 1], DIPConfig(preset="dip-tiny", iters=40, lr=2e-3, ssim_every=10), reference=x)
    assert res.loss.shape == (40, 2) and res.psnr.shape == (40, 2)
    assert (res.loss[-1] < 0.5 * res.loss[0]).all()
    assert (res.psnr[-1] > res.psnr[0] + 3).all()
    assert res.ssim is not None and res.ssim_iters[0] == 0 and res.ssim_iters[-1] == 39
    assert (res.ssim[-1] > res.ssim[0]).all()


def test_batched_fit_equals_one_by_one(sprites: torch.Tensor) -> None:
    seeds = [5, 6, 7]
    z = randn((3, SIZE, SIZE), image_generators(seeds))
    cfg = DIPConfig(preset="dip-tiny", iters=8, lr=1e-3)
    a = fit_dip(sprites[:3], z, seeds, cfg, batch_size=3, batched=True)
    b = fit_dip(sprites[:3], z, seeds, cfg, batched=False)
    c = fit_dip(sprites[:3], z, seeds, cfg, batch_size=2, batched=True)  # uneven groups
    # fp32 sums are reordered between grouped and plain convolutions: agreement to ~1e-5, not bitwise.
    assert torch.allclose(a.output, b.output, atol=1e-4)
    assert torch.allclose(a.output, c.output, atol=1e-4)
    assert torch.allclose(a.loss, b.loss, rtol=1e-4, atol=1e-6)


def test_batched_fit_works_with_attention_presets(sprites: torch.Tensor) -> None:
    seeds = [0, 1]
    z = randn((3, SIZE, SIZE), image_generators(seeds))
    cfg = DIPConfig(preset="tiny", iters=3, lr=1e-3)  # "tiny" has attention blocks
    a = fit_dip(sprites[:2], z, seeds, cfg, batch_size=2)
    b = fit_dip(sprites[:2], z, seeds, cfg, batched=False)
    assert torch.allclose(a.output, b.output, atol=1e-4)


def test_dip_config_validates() -> None:
    with pytest.raises(UserError):
        DIPConfig(lr=0)
    with pytest.raises(UserError):
        DIPConfig(preset="nope")
    with pytest.raises(UserError):
        DIPConfig(average=1.5)


# ------------------------------------------------------------------------------ Algorithm 3


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


def test_image_i_depends_only_on_seed_i() -> None:
    unet = build_unet("tiny", seed=0, sample_size=8)
    s = make_scheduler("cosine")
    ctx1 = Context(unet, s, batch_size=1)
    ctx3 = Context(unet, s, batch_size=3)
    a = generate(ctx1, "ddim", [10, 11, 12], ddim_steps=4)
    b = generate(ctx3, "ddim", [10, 11, 12], ddim_steps=4)
    c = generate(ctx3, "ddim", [11], ddim_steps=4)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert torch.allclose(c.images[0], a.images[1], atol=1e-5)
    x_T = randn((3, 8, 8), image_generators([10]))
    d = ddim_chain(EpsModel(unet, s), x_T, 4, image_generators([10]))
    assert d.shape == (1, 3, 8, 8)


# ------------------------------------------------------------------------------ protocols


def test_paper_protocol_dip_target_is_built_from_the_clean_image(sprites: torch.Tensor) -> None:
    unet = build_unet("tiny", seed=0, sample_size=SIZE)
    s = make_scheduler("linear")
    ctx = Context(unet, s, DIPConfig(preset="dip-tiny", iters=30, lr=2e-3), batch_size=4)
    seeds = [0, 1]
    r0 = denoise_paper(ctx, sprites[:2], "tdpm-dip", seeds, t_noisy=20, t_trunc=0)
    rd = denoise_paper(ctx, sprites[:2], "dip", seeds, t_noisy=20)
    assert torch.allclose(r0.images, rd.images)  # T_trunc = 0 is the DIP row
    assert r0.protocol == "paper" and r0.reverse_steps == 30
    r5 = denoise_paper(ctx, sprites[:2], "tdpm-dip", seeds, t_noisy=20, t_trunc=5)
    assert r5.reverse_steps == 35 and r5.info["t_trunc"] == 5
    # The DIP fitted the oracle target: its PSNR against the clean image rises while fitting.
    assert (r0.dip.psnr[-1] > r0.dip.psnr[0]).all()
    rd = denoise_paper(ctx, sprites[:2], "ddpm", seeds, t_noisy=20)
    assert rd.reverse_steps == 20 and rd.inputs.shape == rd.images.shape
    with pytest.raises(UserError):
        denoise_paper(ctx, sprites[:2], "tdpm-dip", seeds, t_trunc=1000)


def test_blind_dip_and_tdpm_dip_raise_psnr_at_sigma_25(trained_tiny) -> None:
    unet, sched = trained_tiny
    clean = make_sprites(2, 32, seed=3).images
    seeds = [0, 1]
    noisy = add_noise(clean, 25, seeds, "float")
    base = float(psnr(noisy, clean).mean())
    cfg = DIPConfig(preset="dip-tiny", iters=200, lr=3e-3, input_noise=1.0, average=0.95)
    ctx = Context(unet, sched, cfg, batch_size=2)
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


def test_bm3d_baseline_when_installed(sprites: torch.Tensor) -> None:
    pytest.importorskip("bm3d")
    unet = build_unet("tiny", seed=0, sample_size=SIZE)
    ctx = Context(unet, make_scheduler("linear"))
    noisy = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    res = denoise_blind(ctx, noisy, "bm3d", [0, 1, 2, 3], 25)
    assert res.protocol == "blind"
    assert float(psnr(res.images, sprites).mean()) > float(psnr(noisy, sprites).mean())

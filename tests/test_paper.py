"""Denoising under the paper protocol (methods/paper.py): x_tn from the clean image and z, the DIP fitted to its
oracle target, the chain of T_trunc steps, and what every Result carries."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from by_hand import T0, abar, after_first_draw, ddpm_chain_by_hand, draw, gens
from jobs import denoise_paper
from stubs import PATTERN, SIZE, FakeFit, eps_linear

from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, paper, run
from tdpm_dip.models import build_unet
from tdpm_dip.noise import make_scheduler


@pytest.fixture(scope="module")
def sprites() -> torch.Tensor:
    return make_sprites(4, SIZE, seed=3).images


def test_paper_protocol_methods_by_hand(monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]) -> None:
    """The paper protocol: z_i (image i's first draw) noises x0 to x_tn and is the DIP's input; the DIP fits
    sqrt(abar_T) x0 + sqrt(1 - abar_T) z with x0 as its reference; then T steps (none for the dip row). Every Result
    carries x_tn, the fit, its cost and the levels."""
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
        res = run(make_ctx(unet), "denoise", "paper", method, job)
        call = fake.calls[-1]
        assert torch.equal(call["z"], z) and call["seeds"] == seeds and torch.equal(call["reference"], clean)
        assert torch.allclose(call["target"], math.sqrt(abar(t)) * clean + math.sqrt(1 - abar(t)) * z, atol=1e-6)
        g_out = call["target"] + 0.1 * PATTERN
        expected = ddpm_chain_by_hand(eps_linear(), g_out, t, after_first_draw(seeds)) if t else g_out
        assert torch.allclose(res.images, expected, rtol=0, atol=1e-6), (method, t)
        assert unet.timesteps == list(range(t - 1, -1, -1))
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == (method, "paper", 100 + t, 100 + t)
        assert torch.allclose(res.inputs, x_tn, rtol=0, atol=1e-6) and res.dip.seconds == 100.0
        assert res.seconds >= 100.0 and res.info == {"t_noisy": 30, "t_trunc": t}
    res = run(make_ctx(), "denoise", "paper", "ddpm", Job(tuple(seeds), clean=clean, t_noisy=3))
    assert (res.method, res.protocol, res.reverse_steps, res.nfe, res.info) == ("ddpm", "paper", 3, 3, {"t_noisy": 3})
    with pytest.raises(UserError) as e:
        run(make_ctx(), "denoise", "paper", "ddpm", Job(tuple(seeds), clean=clean, t_noisy=1001))
    assert str(e.value) == "t_noisy must be an integer in [0, 1000], got 1001"
    with pytest.raises(UserError) as e:
        run(make_ctx(), "denoise", "paper", "ddpm", Job(tuple(seeds)))
    assert str(e.value) == "method paper denoising needs the clean images"


def test_paper_protocol_dip_target_is_built_from_the_clean_image(
    sprites: torch.Tensor, make_ctx: Callable[..., Context]
) -> None:
    unet = build_unet("tiny", seed=0, sample_size=SIZE)
    s = make_scheduler("linear")
    ctx = make_ctx(unet, s, DIPConfig(preset="dip-tiny", iters=30, lr=2e-3), batch_size=4)
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

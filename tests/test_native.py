"""Denoising at the images' own size (methods/dispatch.run_native): every network call sees sides the networks
accept, the output is cropped back to the input's own pixels, and a shard is handed every job."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from by_hand import T_STAR_25, declip_by_hand, noisy_8bit, tweedie_factor
from stubs import eps_linear, tiny_unet

from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig, DIPResult
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, blind, run_native
from tdpm_dip.models import build_unet
from tdpm_dip.noise import add_noise, make_scheduler


@pytest.fixture(scope="module")
def ctx(make_ctx: Callable[..., Context]) -> Context:
    """A tiny DDPM and tiny DIPs: blind methods at a few steps."""
    return make_ctx(
        build_unet("tiny", seed=0, sample_size=16),
        make_scheduler("linear"),
        DIPConfig(preset="dip-tiny", iters=3, lr=1e-3, input_noise=1.0, average=0.9),
        batch_size=4,
        dip_plugin=DIPConfig(preset="dip-tiny", iters=3, lr=1e-3),
    )


def test_run_native_maps_every_pixel_back_to_its_place(make_ctx: Callable[..., Context]) -> None:
    """An odd-sized observation (13 x 19) is reflect-padded to a side the networks accept and cropped back:
    with the identity denoiser the output is the declipped observation, clamped, i.e. y itself, pixel for
    pixel; with eps = c x it is k y, clamped. A crop from the wrong corner or a shifted pad moves the
    pixels and fails."""
    y = noisy_8bit(13, 19, seed=7, n=2)
    seeds = (11, 12)
    unet = tiny_unet(zero=True)
    res = run_native(make_ctx(unet), "tweedie", Job(seeds, noisy=y, sigma=(25.0,)))
    assert res.images.shape == (2, 3, 13, 19)
    assert unet.shapes == [(2, 3, 16, 24)]  # padded to a multiple of 8 (the default DIP preset's 4 levels)
    expected = declip_by_hand(y, [25.0, 25.0], list(seeds)).clamp(-1, 1)
    assert torch.equal(expected, y) and torch.equal(res.images, expected)
    assert torch.equal(res.inputs, y)
    for method in ("tweedie", "ensemble"):
        unet = eps_linear()
        res = run_native(make_ctx(unet), method, Job(seeds, noisy=y, sigma=(25.0,), declip=False))
        k = tweedie_factor(unet, T_STAR_25)
        assert torch.allclose(res.images, (k * y).clamp(-1, 1), rtol=0, atol=1e-6), method


@pytest.mark.parametrize("h, w", [(16, 16), (15, 16), (16, 13), (13, 19)])
def test_run_native_always_hands_the_networks_a_multiple_and_crops_back(
    h: int, w: int, make_ctx: Callable[..., Context]
) -> None:
    """Whatever needs padding (nothing, one side, both), every network call sees sides that are multiples of
    2^(levels - 1) of the deepest network (here the DIP presets': dip-tiny has 2 levels, paper-dip 4, so 8), and
    the output is the input's own pixels (eps = 0: the declipped observation, clamped, i.e. y)."""
    y = noisy_8bit(h, w, seed=h + w, n=2)
    unet = tiny_unet(zero=True)
    ctx = make_ctx(unet, dip=DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="paper-dip"))
    res = run_native(ctx, "tweedie", Job((0, 1), noisy=y, sigma=(25.0,), declip=False))
    assert res.images.shape == (2, 3, h, w) and torch.equal(res.images, y) and torch.equal(res.inputs, y)
    assert unet.shapes == [(2, 3, -(-h // 8) * 8, -(-w // 8) * 8)]
    assert (res.method, res.protocol, res.nfe) == ("tweedie", "blind", 1)


def test_run_native_pads_to_the_ddpms_multiple_when_it_is_the_deepest(make_ctx: Callable[..., Context]) -> None:
    """A six-level DDPM (sides multiple of 32) next to two-level DIPs: 20 x 40 is run at 32 x 64."""
    net = tiny_unet(levels=6, zero=True)
    ctx = make_ctx(net, dip=DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="dip-tiny"))
    y = noisy_8bit(20, 40, seed=9)
    res = run_native(ctx, "tweedie", Job((0,), noisy=y, sigma=(25.0,), declip=False))
    assert net.shapes == [(1, 3, 32, 64)] and torch.equal(res.images, y)
    with pytest.raises(UserError) as e:
        run_native(ctx, "tweedie", Job((0,), sigma=(25.0,)))
    assert str(e.value) == "method tweedie needs the noisy images"


def test_run_native_pads_an_image_smaller_than_the_networks_multiple(make_ctx: Callable[..., Context]) -> None:
    """A 9x9 image for networks whose sides must be multiples of 32 (six levels, as the report's DDPM):
    reflection pads in passes; the crop gives back the 9x9 observation exactly (eps = 0)."""
    net = tiny_unet(levels=6, zero=True)
    ctx = make_ctx(net, make_scheduler("linear"), batch_size=2)
    y = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    res = run_native(ctx, "tweedie", Job((0, 1), noisy=y, sigma=(25.0,), declip=False))
    assert res.images.shape == (2, 3, 9, 9) and torch.equal(res.images, y)


def test_native_size_keeps_the_exact_size_and_aspect(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    y = add_noise(make_sprites(1, 20, seed=1).images[:, :, :, :13].contiguous(), 25, [0], "clipped")
    for method in ("ensemble", "tdpm-dip"):
        res = run_native(ctx, method, Job((0,), noisy=y, sigma=(25.0,)))
        assert res.images.shape == y.shape == (1, 3, 20, 13)
        assert torch.isfinite(res.images).all()
    # Content: every output pixel comes from its own input pixel (the crop undoes the reflect pad, 13 -> 14
    # columns here). With the identity denoiser (a UNet whose eps is 0, tests/stubs.py) the ensemble returns the
    # declipped y clamped, i.e. y itself.
    ident = dataclasses.replace(ctx, unet=tiny_unet(zero=True), dip_memo={})
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


class FakeShard:
    """A one-process Shard stand-in: records that the dispatch handed it the method, then runs it whole."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def run(self, fn, ctx, job, desc):
        self.calls.append((desc, tuple(job.noisy.shape[-2:])))
        return fn(ctx, job)


def test_run_native_hands_the_shard_every_job(make_ctx: Callable[..., Context]) -> None:
    """Under `accelerate launch` each process runs its share: run_native passes the shard on, padded or not."""
    ctx = make_ctx(tiny_unet(zero=True), dip=DIPConfig(preset="dip-tiny"), dip_plugin=DIPConfig(preset="dip-tiny"))
    shard = FakeShard()
    for h, w in ((16, 16), (13, 19)):
        y = noisy_8bit(h, w, seed=3)
        res = run_native(ctx, "tweedie", Job((0,), noisy=y, sigma=(25.0,), declip=False), shard)  # type: ignore[arg-type]
        assert torch.equal(res.images, y)
    assert shard.calls == [("denoise tweedie", (16, 16)), ("denoise tweedie", (14, 20))]  # networks of 2 levels

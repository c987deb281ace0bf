"""Tiled inference (methods/tiles.py, dispatch.run_native): weights that sum to one, tiles that cover the image,
results that do not depend on the batch size, and cost that grows with the pixels, not their square."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tdpm_dip.methods import Context, Job, run_native
from tdpm_dip.methods.dispatch import TILE_FACTOR, tile_side
from tdpm_dip.methods.tiles import Tiling, tiled
from tdpm_dip.models import build_unet
from tdpm_dip.noise import make_scheduler


@pytest.mark.parametrize("length", [8, 16, 17, 40, 100, 129])
def test_tiles_cover_every_pixel_with_weights_summing_to_one(length: int) -> None:
    t = Tiling(16, 4)
    starts = t.starts(length)
    assert starts[0] == 0 and starts[-1] + min(16, length) == length
    assert all(b - a <= 16 - 4 for a, b in zip(starts, starts[1:]))  # neighbours share at least the overlap
    h, w = length, max(8, length // 2)
    covered = torch.zeros(h, w)
    for y, x, th, tw in t.boxes(h, w):
        covered[y : y + th, x : x + tw] += t.window(th, tw)
    assert covered.min() > 0
    ones = tiled(lambda tiles, which: torch.ones_like(tiles), torch.zeros(2, 3, h, w), t, batch_size=3)
    assert torch.allclose(ones, torch.ones(2, 3, h, w), atol=1e-6)  # normalised weights sum to one


def test_a_pixelwise_function_tiled_equals_it_untiled() -> None:
    x = torch.randn(2, 3, 50, 37, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, int]] = []

    def fn(tiles: torch.Tensor, which: list[tuple[int, int]]) -> torch.Tensor:
        assert tiles.shape[0] <= 5 and tiles.shape[-2:] == (16, 16)
        seen.extend(which)
        return torch.tanh(2 * tiles) + 1

    got = tiled(fn, x, Tiling(16, 4), batch_size=5)
    assert torch.allclose(got, torch.tanh(2 * x) + 1, atol=1e-6)
    n = Tiling(16, 4).count(50, 37)
    assert sorted(seen) == [(i, k) for i in range(2) for k in range(n)]


@pytest.fixture(scope="module")
def ctx(make_ctx: Callable[..., Context]) -> Context:
    unet = build_unet("tiny", seed=0, sample_size=16).eval()
    return make_ctx(unet, make_scheduler("linear"), batch_size=4)


def test_large_images_run_in_tiles_whatever_the_batch_size(ctx: Context, make_ctx: Callable[..., Context]) -> None:
    """A 40x56 image over 32 px tiles: tiled (the info says how), the input's size, and the same images at batch
    size 1 and 4 (tile k of image i uses its own seed)."""
    y = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    job = Job((3, 4), noisy=y, sigma=(25.0,))
    res = run_native(ctx, "ensemble", job, tile=32)
    assert res.images.shape == y.shape and res.info["tiles"] == Tiling(32, 8).count(40, 56)
    one = run_native(make_ctx(ctx.unet, ctx.scheduler, batch_size=1), "ensemble", job, tile=32)
    assert torch.allclose(res.images, one.images, atol=1e-5)
    assert tile_side(ctx) == TILE_FACTOR * 16  # a few times the trained size
    small = run_native(ctx, "ensemble", Job((3,), noisy=y[:1, :, :24, :24], sigma=(25.0,)))
    assert "tiles" not in small.info  # fits in a tile: run whole
    exact = run_native(ctx, "ensemble", Job((3,), noisy=y[:1, :, :32, :24], sigma=(25.0,)), tile=32)
    assert "tiles" not in exact.info  # a side of exactly one tile: whole too


def test_tiled_ensemble_keeps_the_whole_images_symmetries(ctx: Context) -> None:
    """The ensemble's symmetries follow the whole image's pixels (ensemble_size), not each tile's."""
    y = torch.zeros(1, 3, 40, 40)
    res = run_native(ctx, "ensemble", Job((0,), noisy=y, sigma=(25.0,), symmetries=3), tile=32)
    assert res.nfe == 3


def test_thin_tiles_share_a_call(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles are batched by their own area: the 8 px high tiles of a long thin image go many to a call (at most the
    batch size), where square tiles of the same side go two."""
    from tdpm_dip.methods import dispatch

    calls: list[int] = []
    real = dispatch._run_padded

    def counting(c: Context, method: str, job: Job, shard: object = None):  # type: ignore[no-untyped-def]
        calls.append(len(job.seeds))
        return real(c, method, job, shard)

    monkeypatch.setattr(dispatch, "_run_padded", counting)
    monkeypatch.setattr(dispatch, "TILE_BATCH_PIXELS", 2 * 32 * 32)
    y = torch.zeros(1, 3, 8, 200)
    res = run_native(ctx, "tweedie", Job((0,), noisy=y, sigma=(25.0,)), tile=32)
    n = res.info["tiles"]
    assert n > 4 and calls == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    calls.clear()
    run_native(ctx, "tweedie", Job((0,), noisy=torch.zeros(1, 3, 64, 64), sigma=(25.0,)), tile=32)
    assert calls == [2, 2, 2, 2, 1]  # 9 square tiles, two a call

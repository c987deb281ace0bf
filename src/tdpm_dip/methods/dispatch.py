"""The one dispatch: look a method up in the registry and run it, on one process or split over several."""

from __future__ import annotations

import dataclasses

import torch

from .. import registry
from ..config import get_preset
from ..images import pad_bottom_right
from ..models import unet_size
from .common import need
from .shard import Shard, images_per_step
from .tiles import TILE_SEED_STRIDE, Tiling, tiled
from .types import Context, Job, Result

# Large images run in tiles of TILE_FACTOR x the DDPM's trained size (a 64 px model: 192 px tiles), neighbours
# sharing a TILE_OVERLAP_DIVISOR-th of a tile (48 px), blended over that overlap. Smaller tiles are faster but see
# too little of an upsampled image to match it whole; larger ones cost more and come no closer to the whole image
# (benchmarks/tiles.py; the figures are in docs/results.md).
TILE_FACTOR = 3
TILE_OVERLAP_DIVISOR = 4
# Tiles per batch: at most this many pixels (two 192 px tiles), whatever --batch-size. The UNet's attention over a
# 192 px tile holds ~150-200 MB (bf16 autocast on a CPU), so 16 at once would take ~3 GB for no gain in speed.
TILE_BATCH_PIXELS = 2 * 192 * 192


def run(ctx: Context, task: str, protocol: str, method: str, job: Job, shard: Shard | None = None) -> Result:
    """Run `method` of the registry on `job` (the CLI, the app, bench and the demo all call this).

    With `shard` (several launched processes) each process runs its own batches of the images and
    every process gets the whole Result (`shard.Shard.run`)."""
    fn = registry.get(task, protocol, method).load()
    if shard is not None:
        return shard.run(fn, ctx, job, f"{task} {method}")
    return fn(ctx, job)


def size_multiple(ctx: Context) -> int:
    """Sides the networks accept: each UNet halves the image once per block but the last."""
    blocks = [len(ctx.unet.config.block_out_channels)]
    blocks += [len(get_preset(c.preset).block_out_channels) for c in (ctx.dip, ctx.dip_plugin) if c is not None]
    if ctx.restorer is not None:
        blocks.append(len(ctx.restorer.config.block_out_channels))
    return 2 ** (max(blocks) - 1)


def tile_side(ctx: Context) -> int:
    """Side of the tiles of a large image: TILE_FACTOR times the DDPM's trained size, rounded up to a side the UNets
    accept, and at least two of those multiples (a deep UNet's tile is not all padding)."""
    m = size_multiple(ctx)
    return max(2 * m, -(-TILE_FACTOR * unet_size(ctx.unet.config) // m) * m)


def run_native(ctx: Context, method: str, job: Job, shard: Shard | None = None, tile: int | None = None) -> Result:
    """Blind denoising at the images' own size. An image with a side over `tile` px (None: `tile_side`) runs in
    overlapping tiles (`run_tiled`); a smaller one runs whole. Either way y is reflect-padded to a side the UNets
    accept (the networks are convolutional; reflection keeps the noise statistics at the border) and the
    outputs are cropped back, so the result has exactly the input's size and aspect."""
    noisy = need(job.noisy, "the noisy images", method)
    side = tile or tile_side(ctx)
    if max(noisy.shape[-2:]) > side:
        return run_tiled(ctx, method, job, Tiling(side, side // TILE_OVERLAP_DIVISOR), shard)
    return _run_padded(ctx, method, job, shard)


def run_tiled(ctx: Context, method: str, job: Job, tiling: Tiling, shard: Shard | None = None) -> Result:
    """`method` on overlapping tiles of the images, blended (`tiles.tiled`): tile k of image i uses seed
    seeds[i] + k * TILE_SEED_STRIDE and the image's sigma. The ensemble's number of symmetries is the whole
    image's (`blind.ensemble_size`), so an image costs what its pixels cost whole."""
    from .blind import ensemble_size  # deferred: dispatch imports no method family at import time

    noisy = need(job.noisy, "the noisy images", method)
    h, w = noisy.shape[-2:]
    sigmas = job.sigma if len(job.sigma) == noisy.shape[0] else job.sigma * noisy.shape[0]
    symmetries = ensemble_size(job.symmetries, h, w)
    results: list[Result] = []
    clean = job.clean
    quiet = dataclasses.replace(ctx, progress=False)  # one bar, over the tiles, not one per batch of them

    def one_batch(tiles: torch.Tensor, which: list[tuple[int, int]]) -> torch.Tensor:
        part = dataclasses.replace(
            job,
            seeds=tuple(job.seeds[i] + k * TILE_SEED_STRIDE for i, k in which),
            noisy=tiles,
            sigma=tuple(sigmas[i] for i, _ in which),
            clean=None if clean is None else torch.stack([_tile_of(clean[i], tiling, k, h, w) for i, k in which]),
            symmetries=symmetries,
        )
        res = _run_padded(quiet, method, part, shard)
        results.append(res)
        return res.images

    # By the tiles' own area: a long thin image's tiles are thin too, and many of them fit in one call.
    per_batch = max(1, min(ctx.batch_size, TILE_BATCH_PIXELS // (min(tiling.tile, h) * min(tiling.tile, w))))
    batch = images_per_step(per_batch, shard)
    out = tiled(one_batch, noisy, tiling, batch, ctx.progress, ctx.interrupt)
    first = results[0]
    info = dict(first.info) | {"tiles": tiling.count(h, w), "tile": f"{min(tiling.tile, w)}x{min(tiling.tile, h)}"}
    return Result(
        first.method,
        first.protocol,
        out,
        sum(r.seconds for r in results),
        first.reverse_steps,
        first.nfe,
        noisy.cpu(),
        None,  # one DIP per tile: no one fit to report
        info,
    )


def _tile_of(x: torch.Tensor, tiling: Tiling, k: int, h: int, w: int) -> torch.Tensor:
    y, xx, th, tw = tiling.boxes(h, w)[k]
    return x[..., y : y + th, xx : xx + tw]


def _run_padded(ctx: Context, method: str, job: Job, shard: Shard | None = None) -> Result:
    """The images whole, reflect-padded to a side the UNets accept and cropped back."""
    noisy = need(job.noisy, "the noisy images", method)
    h, w = noisy.shape[-2:]
    m = size_multiple(ctx)
    ph, pw = -h % m, -w % m
    if ph == 0 and pw == 0:
        return run(ctx, "denoise", "blind", method, job, shard)

    def pad(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else pad_bottom_right(x, ph, pw)

    res = run(ctx, "denoise", "blind", method, dataclasses.replace(job, noisy=pad(noisy), clean=pad(job.clean)), shard)
    return _cropped(res, h, w, noisy.cpu())


def _cropped(res: Result, h: int, w: int, inputs: torch.Tensor) -> Result:
    """A result of padded images cropped back to h x w (the top-left corner, where the images are)."""
    res.images = res.images[..., :h, :w]
    res.inputs = inputs
    if res.dip is not None:  # a copy: the memoised fit stays as it was
        res.dip = dataclasses.replace(res.dip, output=res.dip.output[..., :h, :w])
    return res


def run_restore(ctx: Context, method: str, job: Job, shard: Shard | None = None) -> Result:
    """Restoration at the images' own size: the observation (and a mask) is padded so that the restored image
    has a side the UNets accept (replicated edges for a low-resolution image; reflection for inpainting), and
    the outputs are cropped back to the exact size the operator gives."""
    y = need(job.observed, "the observed images", method)
    op = job.operator
    assert op is not None  # the workflow and the API build restoration jobs with their operator
    h, w = op.out_size(*y.shape[-2:])
    m = size_multiple(ctx)
    f = h // y.shape[-2]  # the scale (1 for inpainting)
    # Pad the observation by whole pixels of its own grid until the output side is a multiple of m.
    ph = next(p for p in range(m) if (y.shape[-2] + p) * f % m == 0)
    pw = next(p for p in range(m) if (y.shape[-1] + p) * f % m == 0)
    if ph or pw:
        mode = "replicate" if f > 1 else "reflect"
        y = pad_bottom_right(y, ph, pw, mode)
        op = op.padded(ph, pw)
        job = dataclasses.replace(job, observed=y, operator=op)
    res = run(ctx, "restore", "blind", method, job, shard)
    return _cropped(res, h, w, y.cpu()[..., : h // f, : w // f])

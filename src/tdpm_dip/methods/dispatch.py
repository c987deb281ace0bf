"""The one dispatch: look a method up in the registry and run it, on one process or split over several."""

from __future__ import annotations

import dataclasses

import torch

from .. import registry
from ..config import get_preset
from .common import need
from .shard import Shard
from .types import Context, Job, Result


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
    return 2 ** (max(blocks) - 1)


def run_native(ctx: Context, method: str, job: Job, shard: Shard | None = None) -> Result:
    """Blind denoising at the images' own size: y is reflect-padded to a side the UNets accept (the
    networks are convolutional; reflection keeps the noise statistics at the border) and the
    outputs are cropped back, so the result has exactly the input's size and aspect."""
    noisy = need(job.noisy, "the noisy images", method)
    h, w = noisy.shape[-2:]
    m = size_multiple(ctx)
    ph, pw = -h % m, -w % m
    if ph == 0 and pw == 0:
        return run(ctx, "denoise", "blind", method, job, shard)

    def pad(x: torch.Tensor | None) -> torch.Tensor | None:
        # Reflection pads less than the side it reflects: a small image (side < m) is padded in passes.
        while x is not None and (x.shape[-2] < h + ph or x.shape[-1] < w + pw):
            dh, dw = min(h + ph - x.shape[-2], x.shape[-2] - 1), min(w + pw - x.shape[-1], x.shape[-1] - 1)
            x = torch.nn.functional.pad(x, (0, dw, 0, dh), mode="reflect")
        return x

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
        y = _pad(y, ph, pw, mode)
        op = op.padded(ph, pw)
        job = dataclasses.replace(job, observed=y, operator=op)
    res = run(ctx, "restore", "blind", method, job, shard)
    return _cropped(res, h, w, y.cpu()[..., : h // f, : w // f])


def _pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """x padded at the bottom and right; reflection in passes when a side is shorter than its padding."""
    while ph > 0 or pw > 0:
        dh = ph if mode == "replicate" else min(ph, x.shape[-2] - 1)
        dw = pw if mode == "replicate" else min(pw, x.shape[-1] - 1)
        x = torch.nn.functional.pad(x, (0, dw, 0, dh), mode=mode)
        ph, pw = ph - dh, pw - dw
    return x

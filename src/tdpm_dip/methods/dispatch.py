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
    res.images = res.images[..., :h, :w]
    res.inputs = noisy.cpu()
    if res.dip is not None:  # a copy: the memoised fit stays as it was
        res.dip = dataclasses.replace(res.dip, output=res.dip.output[..., :h, :w])
    return res

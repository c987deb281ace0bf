"""Shorthands the tests use to run one registry method (imported as a plain module: pytest puts tests/ on
sys.path). Each builds the method's Job and calls the one dispatch, `methods.run`."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from tdpm_dip import registry
from tdpm_dip.images import to_uint8
from tdpm_dip.methods import Context, Job, Result, run, run_native


def denoise_blind(
    ctx: Context, noisy: torch.Tensor, method: str, seeds: list[int], sigma: float | list[float], **options: object
) -> Result:
    sig = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    return run(ctx, "denoise", "blind", method, Job(tuple(seeds), noisy=noisy, sigma=sig, **options))


def denoise_paper(ctx: Context, clean: torch.Tensor, method: str, seeds: list[int], **options: object) -> Result:
    return run(ctx, "denoise", "paper", method, Job(tuple(seeds), clean=clean, **options))


def generate(ctx: Context, method: str, seeds: list[int], **options: object) -> Result:
    return run(ctx, "generate", registry.find("generate", method).protocol, method, Job(tuple(seeds), **options))


def denoise_alone(ctx: Context, x: torch.Tensor, method: str, seed: int, sigma: float, **options: object) -> np.ndarray:
    """One [3, H, W] image denoised at its own size (`run_native`), alone, with its own seed: the 8-bit image a
    command writes for it (HWC uint8)."""
    job = Job((seed,), noisy=x[None], sigma=(float(sigma),), **options)
    return to_uint8(run_native(ctx, method, job).images[0])


def png_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An 8-bit RGB file as [3, H, W] in [-1, 1], read here with PIL alone."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1

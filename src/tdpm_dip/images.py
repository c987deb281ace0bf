"""Images as files: [-1, 1] tensors to 8-bit PNGs and grids a person can look at (written atomically)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .outputs import atomic_path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensor [3, H, W] or [N, 3, H, W] -> uint8 HWC / NHWC array."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a.permute(*range(a.dim() - 3), -2, -1, -3).numpy()


def save_png(x: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save one image ([-1,1] CHW tensor or uint8 HWC array) as PNG, atomically."""
    a = to_uint8(x) if isinstance(x, torch.Tensor) else x
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def save_set(images: torch.Tensor, names: list[str], folder: str | os.PathLike) -> None:
    """Write an image set as PNGs named `{index:05d}_{name}.png` (lossless: the tensors come from 8-bit
    images, so reading the folder back gives the same tensors)."""
    for i, (x, name) in enumerate(zip(images, names)):
        save_png(x, Path(folder) / f"{i:05d}_{name}.png")


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> one uint8 HWC grid with white padding."""
    n, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    a = to_uint8(images)
    if upscale > 1:
        a = a.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = a[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    save_png(make_grid(images, nrow=nrow, upscale=upscale), path)

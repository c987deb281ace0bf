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


def pad_bottom_right(x: torch.Tensor, ph: int, pw: int, mode: str = "reflect") -> torch.Tensor:
    """x padded by ph rows at the bottom and pw columns at the right. Reflection pads less than the side it
    reflects, so a small image is padded in passes."""
    while ph > 0 or pw > 0:
        dh = ph if mode != "reflect" else min(ph, x.shape[-2] - 1)
        dw = pw if mode != "reflect" else min(pw, x.shape[-1] - 1)
        x = torch.nn.functional.pad(x, (0, dw, 0, dh), mode=mode)
        ph, pw = ph - dh, pw - dw
    return x


def save_png(x: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save one image ([-1,1] CHW tensor or uint8 HWC array) as PNG, atomically."""
    a = to_uint8(x) if isinstance(x, torch.Tensor) else x
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def like(x: torch.Tensor, gray: bool = False, bits: int = 8, alpha: np.ndarray | None = None) -> Image.Image:
    """A [-1, 1] tensor [3, H, W] as a PIL image of a given kind (`data.ImageKind`): grey (the mean of the
    channels: a grey input's channels differ only by the denoiser's errors) or RGB, 8 or 16 bits (grey only: PIL
    writes no 16-bit RGB), with the input's alpha channel attached unchanged."""
    v = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if gray:
        g = v.mean(0).numpy()
        if bits == 16 and alpha is None:
            return Image.fromarray((g * 65535.0).round().astype(np.uint16))
        img = Image.fromarray((g * 255.0).round().astype(np.uint8), "L")
    else:
        img = Image.fromarray(to_uint8(x), "RGB")
    if alpha is not None:
        a = alpha if alpha.dtype == np.uint8 else (alpha.astype(np.float64) / 257.0).round().astype(np.uint8)
        img.putalpha(Image.fromarray(a, "L"))
    return img


def as_written(x: torch.Tensor, gray: bool) -> torch.Tensor:
    """A result as its file will hold it (before rounding): a grey image's channels averaged into one (`like`)."""
    return x.mean(0, keepdim=True).expand_as(x) if gray else x


def upscale_alpha(alpha: np.ndarray | None, factor: int) -> np.ndarray | None:
    """An alpha channel (H, W) resized to (factor H, factor W) with PIL's bicubic, in its own dtype: the alpha of a
    super-resolved image, whose colours the restoration upscales."""
    if alpha is None or factor == 1:
        return alpha
    h, w = alpha.shape
    size = (w * factor, h * factor)
    if alpha.dtype == np.uint8:
        return np.asarray(Image.fromarray(alpha, "L").resize(size, Image.Resampling.BICUBIC))
    big = Image.fromarray(alpha.astype(np.float32), "F").resize(size, Image.Resampling.BICUBIC)
    top = float(np.iinfo(alpha.dtype).max) if alpha.dtype.kind in "ui" else 1.0
    return np.clip(np.asarray(big).round(), 0, top).astype(alpha.dtype)


def save_like(
    x: torch.Tensor, path: str | os.PathLike, gray: bool = False, bits: int = 8, alpha: np.ndarray | None = None
) -> None:
    """Save one result as a PNG of its input's kind (`like`), atomically."""
    img = like(x, gray, bits, alpha)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_set(images: torch.Tensor, names: list[str], folder: str | os.PathLike) -> None:
    """Write an image set as PNGs named `{index:05d}_{name}.png` (lossless: the tensors come from 8-bit
    images, so reading the folder back gives the same tensors)."""
    for i, (x, name) in enumerate(zip(images, names)):
        save_png(x, Path(folder) / f"{i:05d}_{name.replace('/', '_')}.png")  # one folder: the index keeps names apart


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

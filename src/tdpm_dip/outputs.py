"""Writing results: atomic files, PNGs, grids, run folders. Nothing is left half-written."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensor [3, H, W] or [N, 3, H, W] -> uint8 HWC / NHWC array."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a.permute(*range(a.dim() - 3), -2, -1, -3).numpy()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600; results get the permissions of an ordinary new file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def save_png(x: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save one image ([-1,1] CHW tensor or uint8 HWC array) as PNG, atomically."""
    a = to_uint8(x) if isinstance(x, torch.Tensor) else x
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


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
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1) -> None:
    save_png(make_grid(images, nrow=nrow, upscale=upscale), path)


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create an output folder; refuse a non-empty one unless `overwrite` (then files are replaced,
    never the folder deleted: we do not remove what we did not write)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to write into it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tdpm-dip-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror or e})") from None
    return out


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build results in a temporary folder beside `final`; move them into `final` only on success.

    An interrupted command leaves `final` as it was: no partial files, earlier outputs intact.
    Files already in `final` that the command did not produce are left alone.
    """
    final = Path(final)
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial.", dir=final.parent))
    try:
        yield tmp
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = final / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts -> a GitHub Markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

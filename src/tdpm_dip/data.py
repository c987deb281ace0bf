"""Images in, [-1, 1] tensors out: image folders, hub datasets and procedural sprites.

Preprocessing (what the reference models were trained with): convert any mode to RGB over a white
background, pad to a square with `fill`, resize to `size` x `size` with Lanczos (antialiased).
Random horizontal flips are a training-time augmentation and live in `train.py`.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import WHITE, parse_fill
from .errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_SIDE = 8


class BadImage(Exception):
    """An unreadable, truncated or degenerate image; carries the path in its message."""


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited over `background`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer greyscale: rescale to 0..255 rather than clipping (PIL's convert clips).
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if a.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def square_resize(img: Image.Image, size: int, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Pad to a centred square with `fill`, then resize to size x size with Lanczos."""
    w, h = img.size
    side = max(w, h)
    if (w, h) != (side, side):
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0 if side > 4 * size else None)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1.0


def load_image(path: str | os.PathLike, size: int | None, fill: tuple[int, int, int] = WHITE) -> torch.Tensor:
    """Read one image file as [3, size, size] in [-1, 1] (size None: as it is, [3, H, W]); raises
    BadImage naming the path."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG" and max(im.size) > 4 * size:
                im.draft("RGB", (2 * size, 2 * size))  # decode huge JPEGs at reduced scale
            im.load()
            upright: Image.Image = ImageOps.exif_transpose(im)
            if min(upright.size) < MIN_SIDE:
                raise BadImage(f"{path}: image is {upright.size[0]}x{upright.size[1]} px, smaller than {MIN_SIDE} px")
            rgb = to_rgb(upright, fill)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = "not an image" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0] or type(e).__name__
        if path.stat().st_size == 0 if path.exists() else False:
            reason = "empty file"
        raise BadImage(f"{path}: {reason}") from None
    return pil_to_tensor(rgb if size is None else square_resize(rgb, size, fill))


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive), in a deterministic (sorted relative path) order."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    if root.is_file():
        return [root]
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise UserError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def file_names(root: str | os.PathLike, files: list[Path]) -> list[str]:
    """The output name of each input file: its path under `root` without the extension (`x/p` for root/x/p.png),
    so that files of two sub-folders never meet. Files that would share a name (a.png and a.jpg) keep their
    extension instead (`a.png`, `a.jpg`); names compare case-insensitively (as macOS and Windows folders do), and
    two that still meet are a one-line UserError naming both files."""
    root = Path(root)
    rel = [f.name if root.is_file() else f.relative_to(root).as_posix() for f in files]
    stems = [r[: -len(Path(r).suffix)] if Path(r).suffix else r for r in rel]
    count: dict[str, int] = {}
    for s in stems:
        count[s.casefold()] = count.get(s.casefold(), 0) + 1
    names = [s if count[s.casefold()] == 1 else r for s, r in zip(stems, rel)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        j = seen.setdefault(n.casefold(), i)
        if j != i:
            raise UserError(f"{files[j]} and {files[i]} would write the same output {n!r}: rename one of them")
    return names


@dataclass
class ImageSet:
    """A stack of preprocessed images and their names (`file_names`, or dataset indices)."""

    images: torch.Tensor  # [N, 3, size, size] in [-1, 1]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def load_folder(
    root: str | os.PathLike,
    size: int = 64,
    fill: str | tuple[int, int, int] = "white",
    skip_bad: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Load an image folder (imagefolder layout; metadata.csv is optional and not needed)."""
    fill_rgb = parse_fill(fill)
    files = list_images(root)
    file_name = dict(zip(files, file_names(root, files)))
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    it = files
    if progress:
        it = tqdm(files, desc="loading images", unit="img", leave=False)
    for f in it:
        if limit is not None and len(tensors) >= limit:
            break
        try:
            tensors.append(load_image(f, size, fill_rgb))
        except BadImage as e:
            if not skip_bad:
                raise UserError(f"{e} (use --skip-bad to skip such files)") from None
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        names.append(file_name[f])
    if not tensors:
        raise UserError(f"{root}: no readable images")
    return ImageSet(torch.stack(tensors), names)


def load_hub(
    dataset_id: str,
    size: int = 64,
    fill: str | tuple[int, int, int] = "white",
    split: str = "train",
    limit: int | None = None,
) -> ImageSet:
    """Load a hub image dataset such as `huggan/pokemon` (extra `hub`: needs `datasets` and a network)."""
    try:
        import datasets  # the optional `hub` extra: imported only when a hub id is given
    except ImportError:
        raise UserError(f"{dataset_id}: loading hub datasets needs `pip install 'tdpm-dip[hub]'`") from None
    fill_rgb = parse_fill(fill)
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, bad split: one line, not a traceback
        raise UserError(f"{dataset_id}: cannot load hub dataset ({str(e).splitlines()[0]})") from None
    col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if col is None:
        raise UserError(f"{dataset_id}: no image column in {list(ds.features)}")
    n = len(ds) if limit is None else min(limit, len(ds))
    tensors = [pil_to_tensor(square_resize(to_rgb(ds[i][col], fill_rgb), size, fill_rgb)) for i in range(n)]
    return ImageSet(torch.stack(tensors), [f"{i:06d}" for i in range(n)])


def load_images(
    source: str | os.PathLike,
    size: int = 64,
    fill: str = "white",
    skip_bad: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """A local path (folder or single file) or, when no such path exists, a hub dataset id."""
    if limit is not None and limit <= 0:
        raise UserError(f"the number of images must be positive, got {limit}")
    if Path(source).exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        return load_folder(source, size, fill, skip_bad, limit, progress)
    return load_hub(str(source), size, fill, limit=limit)


def load_native(
    source: str | os.PathLike, limit: int | None = None, progress: bool = False, skip_bad: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Image files at their own size and aspect: (name, [3, H, W] in [-1, 1]) pairs (blind denoising
    of a user's files returns images of exactly their size). `skip_bad`: an unreadable file is skipped with a
    warning instead of stopping; the first `limit` readable files are returned."""
    files = list_images(source)
    file_name = dict(zip(files, file_names(source, files)))
    it = tqdm(files, desc="loading images", unit="img", leave=False) if progress else files
    out: list[tuple[str, torch.Tensor]] = []
    for f in it:
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append((file_name[f], load_image(f, None)))
        except BadImage as e:
            if not skip_bad:
                raise UserError(f"{e} (use --skip-bad to skip such files)") from None
            warnings.warn(f"skipping {e}", stacklevel=2)
    if not out:
        raise UserError(f"{source}: no readable images")
    return out


def hash_split(names: list[str], holdout: float, salt: str = "tdpm-dip") -> tuple[list[int], list[int]]:
    """Deterministic split by a hash of each name: (kept indices, held-out indices)."""
    keep: list[int] = []
    held: list[int] = []
    for i, n in enumerate(names):
        h = int(hashlib.sha1(f"{salt}:{n}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < holdout else keep).append(i)
    return keep, held


# ---------------------------------------------------------------- procedural sprites (the demo data)

_PALETTE = [
    (230, 57, 70),
    (241, 143, 1),
    (255, 209, 102),
    (6, 214, 160),
    (17, 138, 178),
    (7, 59, 76),
    (131, 56, 236),
    (255, 0, 110),
    (58, 134, 255),
    (251, 86, 7),
    (139, 201, 38),
    (120, 72, 40),
]


def make_sprite(seed: int, size: int = 64) -> torch.Tensor:
    """One deterministic sprite-like creature: coloured body, belly, eyes and limbs on white, [3,S,S]."""
    rng = np.random.default_rng(seed)
    s = 4 * size  # draw at 4x, then downsample with antialiasing
    img = Image.new("RGB", (s, s), WHITE)
    d = ImageDraw.Draw(img)
    body = _PALETTE[rng.integers(len(_PALETTE))]
    accent = _PALETTE[rng.integers(len(_PALETTE))]
    outline = tuple(int(c * 0.35) for c in body)
    cx, cy = s * rng.uniform(0.42, 0.58), s * rng.uniform(0.45, 0.6)
    rx, ry = s * rng.uniform(0.18, 0.3), s * rng.uniform(0.18, 0.3)
    lw = max(2, s // 64)
    # ears / spikes / limbs: a few triangles or ellipses around the body
    for _ in range(int(rng.integers(2, 5))):
        ang = rng.uniform(0, 2 * math.pi)
        px, py = cx + 1.1 * rx * math.cos(ang), cy + 1.1 * ry * math.sin(ang)
        r = s * rng.uniform(0.05, 0.11)
        if rng.random() < 0.5:
            tip = (cx + 1.6 * rx * math.cos(ang), cy + 1.6 * ry * math.sin(ang))
            side = (-math.sin(ang) * r, math.cos(ang) * r)
            d.polygon(
                [(px + side[0], py + side[1]), (px - side[0], py - side[1]), tip],
                fill=accent,
                outline=outline,
                width=lw,
            )
        else:
            d.ellipse([px - r, py - r, px + r, py + r], fill=accent, outline=outline, width=lw)
    if rng.random() < 0.5:
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=body, outline=outline, width=lw)
    else:
        d.rounded_rectangle(
            [cx - rx, cy - ry, cx + rx, cy + ry], radius=int(min(rx, ry) * 0.6), fill=body, outline=outline, width=lw
        )
    belly = tuple(min(255, int(c + (255 - c) * 0.55)) for c in body)
    d.ellipse([cx - 0.55 * rx, cy - 0.1 * ry, cx + 0.55 * rx, cy + 0.8 * ry], fill=belly)
    ey, ex = cy - 0.35 * ry, 0.4 * rx
    er = max(3, int(s * rng.uniform(0.025, 0.045)))
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - er, ey - er, x + er, ey + er], fill=WHITE, outline=(20, 20, 20), width=lw)
        d.ellipse([x - er / 2, ey - er / 2, x + er / 2, ey + er / 2], fill=(20, 20, 20))
    return pil_to_tensor(img.resize((size, size), Image.Resampling.LANCZOS))


def make_sprites(n: int, size: int = 64, seed: int = 0) -> ImageSet:
    """n procedural sprites; sprite i depends only on (seed, i)."""
    if n <= 0:
        raise UserError(f"the number of sprites must be positive, got {n}")
    return ImageSet(
        torch.stack([make_sprite(seed * 1_000_003 + i, size) for i in range(n)]), [f"sprite{i:05d}" for i in range(n)]
    )


# A user's image, as the Python API and the app take it: a file path, a PIL image, or a uint8 HWC / HW array.
ImageInput = str | os.PathLike | Image.Image | np.ndarray


def read_user_image(image: ImageInput, what: str = "image") -> torch.Tensor:
    """One user image -> [3, H, W] in [-1, 1] at its own size; a bad file is a one-line `UserError` that names
    the file (not a temporary upload path)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{what}: no such file: {path.name}")
        try:
            return load_image(path, None)
        except BadImage as e:
            reason = str(e).removeprefix(f"{path}: ")
            if reason not in ("not an image", "empty file") and "smaller than" not in reason:
                reason = f"not a readable image ({reason})"
            raise UserError(f"{what} {path.name}: {reason}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(
                f"{what}: expected an 8-bit image array (H, W) or (H, W, C), got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserError(f"{what}: not an image ({type(image).__name__})")
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{what}: image is {image.size[0]}x{image.size[1]} px, smaller than {MIN_SIDE} px")
    return pil_to_tensor(to_rgb(image))

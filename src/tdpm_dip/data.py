"""Images in, [-1, 1] tensors out: image folders, hub datasets and procedural sprites.

Preprocessing (what the reference models were trained with): convert any mode to RGB over a white
background, pad to a square with `fill`, resize to `size` x `size` with Lanczos (antialiased).
Random horizontal flips are a training-time augmentation and live in `train.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import WHITE, parse_fill
from .errors import UserError, check_pixels

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


def to_rgb_own_colours(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """8-bit RGB of a user's image whose alpha is kept aside and put back on its result (`ImageKind.alpha`): each
    pixel keeps its own colour, and only the fully transparent ones, whose colour nothing shows, become
    `background` (what the models saw around the artwork). Compositing every pixel would wash the colours of
    semi-transparent ones toward the background, and the alpha put back would not undo it."""
    if not (img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)):
        return to_rgb(img, background)
    rgba = np.asarray(img.convert("RGBA")).copy()
    rgba[rgba[..., 3] == 0, :3] = background
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")


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


GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True, eq=False)  # eq=False: it holds an array (no tuple equality, no hash)
class ImageKind:
    """How a user's image stores its pixels, so that its result is handed back the same way (`images.like`):
    one channel or three, an alpha channel (passed through unchanged), 8 or 16 bits per sample."""

    gray: bool = False
    bits: int = 8
    alpha: np.ndarray | None = None  # the input's alpha channel (H, W), as stored
    reduced: bool = False  # 16 bits per sample that PIL reads as 8 (16-bit RGB): the result has 8

    @classmethod
    def of(cls, img: Image.Image) -> ImageKind:
        """The kind of an opened image (before or after `load`: the header tells the 16-bit RGB case)."""
        rawmode = next((t[3] for t in getattr(img, "tile", None) or [] if isinstance(t[3], str)), "")
        reduced = img.mode in ("RGB", "RGBA") and ";16" in rawmode
        gray = img.mode in GRAY_MODES or (img.mode == "P" and _gray_palette(img))
        bits = 16 if img.mode in ("I;16", "I;16B", "I;16L", "I") else 8
        return cls(gray, bits, None, reduced)

    def with_alpha(self, img: Image.Image) -> ImageKind:
        """This kind with the alpha channel of the loaded `img`, when it has one."""
        if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
            a = img if img.mode in ALPHA_MODES else img.convert("RGBA")
            return dataclasses.replace(self, alpha=np.asarray(a.getchannel("A")).copy())
        return self


def _gray_palette(img: Image.Image) -> bool:
    pal = img.getpalette() or []
    return bool(pal) and all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))


def gray_levels(img: Image.Image) -> tuple[np.ndarray, int] | None:
    """A 16-bit (or 32-bit, float) grey image as (levels [H, W] in 0..1, float64; the bits to write it back with),
    without passing through 8 bits; None for other modes. 16-bit files span 0..65535; 32-bit integer ones hold a
    16-bit PNG, or 8-bit values (written back as 8-bit); float ones 0..1, or 0..255 when larger (written as
    16-bit). Values outside the range read are a ValueError: clipping them would lose the image without a word.
    Images and masks are read by it alike."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return None
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top, bits = (1.0 if a.max() <= 1.0 else 255.0), 16
    else:
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        bits = 16 if top > 255 else 8
    if a.size and (a.min() < 0 or a.max() > top or not np.isfinite(a).all()):
        raise ValueError(
            f"values from {a.min():g} to {a.max():g}, outside 0..1, 0..255 and 0..65535: save it as an 8- or 16-bit "
            "image"
        )
    return a / top, bits


def _pixels(img: Image.Image, kind: ImageKind) -> tuple[torch.Tensor, ImageKind]:
    """An upright image as [3, H, W] in [-1, 1] and the kind its result is written back with: a 16-bit, 32-bit or
    float grey image without passing through 8 bits (`gray_levels`, whose ValueError the callers report), any
    other as 8-bit RGB with its own colours (`to_rgb_own_colours`)."""
    gray = gray_levels(img)
    if gray is None:
        return pil_to_tensor(to_rgb_own_colours(img)), kind
    x = torch.from_numpy(gray[0]).float() * 2 - 1
    return x[None].expand(3, -1, -1).contiguous(), dataclasses.replace(kind, bits=gray[1])


# What PIL raises on a file it cannot read as an image (a decompression bomb is no OSError).
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: Path, e: Exception) -> BadImage:
    """The one-line BadImage for a file PIL could not read: "not an image", "empty file" or PIL's first line."""
    reason = "not an image" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0] or type(e).__name__
    if path.exists() and path.stat().st_size == 0:
        reason = "empty file"
    return BadImage(f"{path}: {reason}")


def read_native(
    path: str | os.PathLike,
    max_pixels: int | None = None,
    what: str | None = None,
    advice: str = "give --max-megapixels to raise it",
) -> tuple[torch.Tensor, ImageKind]:
    """One file at its own size and kind: ([3, H, W] in [-1, 1], ImageKind). 16-bit grey stays 16-bit on the way
    in; fully transparent pixels are shown as white (what the models saw), the others keep their own colours, and
    the alpha is kept in the kind (`to_rgb_own_colours`). Raises
    BadImage naming the path; above `max_pixels` a UserError, from the header, before any pixel is decoded."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if max_pixels is not None:
                check_pixels(*im.size, max_pixels, what or str(path), advice)
            kind = ImageKind.of(im)
            frames = getattr(im, "n_frames", 1)
            if frames > 1:  # an animation or a multi-page TIFF: said, not silently cut to its first frame
                # stacklevel 1, one location: Python shows it once per file, though the file is read twice
                warnings.warn(f"{path}: {frames} frames; only the first is used", stacklevel=1)
            im.load()
            upright: Image.Image = ImageOps.exif_transpose(im)
            if min(upright.size) < MIN_SIDE:
                raise BadImage(f"{path}: image is {upright.size[0]}x{upright.size[1]} px, smaller than {MIN_SIDE} px")
            x, kind = _pixels(upright, kind.with_alpha(upright))
    except (BadImage, UserError):
        raise
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    return x, kind


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
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    return pil_to_tensor(rgb if size is None else square_resize(rgb, size, fill))


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive, through linked folders, each real folder once), in a deterministic
    (sorted relative path) order. Hidden files and folders (a leading dot: macOS's ._ twins, .thumbnails/) are
    left out, as they are from a file browser's view."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    if root.is_file():
        return [root]
    files = sorted(_image_files(root), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    return files


def _image_files(root: Path) -> Iterator[Path]:
    seen: set[str] = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree (or a second link to one folder): walked once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in names:
            p = Path(folder) / n
            if not n.startswith(".") and p.suffix.lower() in IMAGE_EXTS and p.is_file():
                yield p


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


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` names a hub dataset (`owner/name`, no such local path) rather than a local path."""
    text = str(source)
    return not Path(source).exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


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
    if not is_hub_id(source):
        return load_folder(source, size, fill, skip_bad, limit, progress)
    return load_hub(str(source), size, fill, limit=limit)


@dataclass(frozen=True, eq=False)
class NativeFile:
    """A user's file to denoise at its own size: its output name (`file_names`), path, size (w, h) and kind."""

    name: str
    path: Path
    size: tuple[int, int]
    kind: ImageKind

    def load(self) -> torch.Tensor:
        """[3, H, W] in [-1, 1] (`read_native`)."""
        return read_native(self.path)[0]


def scan_native(
    source: str | os.PathLike,
    limit: int | None = None,
    progress: bool = False,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    wanted: set[str] | None = None,
) -> list[NativeFile]:
    """Every file of `source` checked (decoded once, then let go, so that memory holds one image at a time) before
    any work: its size against `max_pixels` from the header first, then its pixels. `skip_bad`: an unreadable file
    is skipped with a warning instead of stopping; the first `limit` readable files are returned. `wanted`: only
    the files of these output names are read (a folder of references, of which a run needs some)."""
    files = list_images(source)
    file_name = dict(zip(files, file_names(source, files)))
    if wanted is not None:
        files = [f for f in files if file_name[f] in wanted]
    it = tqdm(files, desc="reading images", unit="img", leave=False) if progress else files
    out: list[NativeFile] = []
    for f in it:
        if limit is not None and len(out) >= limit:
            break
        try:
            x, kind = read_native(f, max_pixels, str(f))
        except BadImage as e:
            if not skip_bad:
                raise UserError(f"{e} (use --skip-bad to skip such files)") from None
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        if kind.reduced:
            warnings.warn(f"{f}: 16 bits per sample, read and written with 8 (16-bit RGB)", stacklevel=2)
        out.append(NativeFile(file_name[f], f, (x.shape[-1], x.shape[-2]), kind))
    if not out and wanted is None:
        raise UserError(f"{source}: no readable images")
    return out


def load_native(
    source: str | os.PathLike, limit: int | None = None, progress: bool = False, skip_bad: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """Image files at their own size and aspect: (name, [3, H, W] in [-1, 1]) pairs, all in memory
    (`scan_native` then loads one at a time)."""
    return [(f.name, f.load()) for f in scan_native(source, limit, progress, skip_bad)]


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


def read_user_image(image: ImageInput, what: str = "image", max_pixels: int | None = None) -> torch.Tensor:
    """One user image -> [3, H, W] in [-1, 1] at its own size; a bad file is a one-line `UserError` that names
    the file (not a temporary upload path)."""
    return read_user_image_kind(image, what, max_pixels)[0]


def read_user_image_kind(
    image: ImageInput, what: str = "image", max_pixels: int | None = None, advice: str = ""
) -> tuple[torch.Tensor, ImageKind]:
    """`read_user_image` with the image's kind (grey, alpha, bits), so that its result comes back alike; over
    `max_pixels` a one-line UserError ending with `advice` (how to raise the limit, where there is a way)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{what}: no such file: {path.name}")
        try:
            return read_native(path, max_pixels, f"{what} {path.name}", advice)
        except BadImage as e:
            reason = str(e).removeprefix(f"{path}: ")
            if reason not in ("not an image", "empty file") and "smaller than" not in reason:
                reason = f"not a readable image ({reason})"
            raise UserError(f"{what} {path.name}: {reason}") from None
    if isinstance(image, np.ndarray):
        grey16 = image.dtype == np.uint16 and image.ndim == 2  # 16-bit grey, as a 16-bit PNG reads
        if not grey16 and (
            image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] > 4)
        ):
            raise UserError(
                f"{what}: expected an 8-bit image array (H, W) or (H, W, C), or 16-bit grey (H, W), got "
                f"{image.dtype} {image.shape}"
            )
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise UserError(f"{what}: not an image ({type(image).__name__})")
    if max_pixels is not None:
        check_pixels(*image.size, max_pixels, what, advice)
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{what}: image is {image.size[0]}x{image.size[1]} px, smaller than {MIN_SIDE} px")
    try:
        return _pixels(image, ImageKind.of(image).with_alpha(image))
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None

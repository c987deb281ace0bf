"""Data for the report's domain, made by commands: a deterministic train/test split of named images, and noisy
8-bit test files (`tdpm-dip prepare-data`, `tdpm-dip add-noise`)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data import MIN_SIDE, BadImage, is_hub_id, list_images, load_folder, load_hub, load_image
from ..errors import UserError, check_positive, check_sigma
from ..images import save_png, to_uint8
from ..noise import add_noise
from ..outputs import is_within, prepare_out_dir, refuse_inputs_inside, refuse_out_dir, staged_dir, write_text

# add-noise's and prepare-data's largest --size: one image of this side is ~100 MB as floats, and denoise refuses
# larger ones by default (its --max-megapixels, 16).
MAX_NOISE_SIDE = 4000


def name_rank(name: str) -> int:
    """A name's place in the split: the first 8 hex digits of its SHA-1 (image order and count do not matter)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


def split_names(names: list[str], test: int) -> tuple[list[str], list[str]]:
    """(train, test): the `test` names of lowest `name_rank` are the test set, the rest the training set; a
    name keeps its side whatever other images the folder holds (sorted by name within each side)."""
    if not 0 < test < len(names):
        raise UserError(f"--test must be in 1..{len(names) - 1} for {len(names)} images, got {test}")
    ranked = sorted(names, key=lambda n: (name_rank(n), n))
    return sorted(ranked[test:]), sorted(ranked[:test])


def prepare_data(source: str, out: str, test: int = 200, size: int = 0, overwrite: bool = False) -> Path:
    """OUT/train and OUT/test from a folder of named images (one per species, say) or a hub dataset id (extra
    `hub`; its images are named by index). size 0 copies the files unchanged; else PNGs of size x size, padded to
    a square with white and resized with Lanczos (the preprocessing of the models)."""
    check_positive("--test", test)
    if not (size == 0 or MIN_SIDE <= size <= MAX_NOISE_SIDE):
        raise UserError(
            f"--size must be 0 (files copied as they are) or in {MIN_SIDE}..{MAX_NOISE_SIDE} px, got {size}"
        )
    if not is_hub_id(source):  # a local path (a missing one is a one-line error in list_images)
        if Path(source).is_dir() and is_within(out, source):
            raise UserError(f"--out {out} is inside --source {source}: its images would become part of the source")
        files: dict[str, Path] = {}
        for p in list_images(source):  # the split is by name: two files of one name are one image twice
            if p.stem in files:
                raise UserError(f"{files[p.stem]} and {p} share the name {p.stem!r} (their stems must differ)")
            files[p.stem] = p
        images = None
    else:
        hub = load_hub(source, size or 64)
        files, images = {}, dict(zip(hub.names, hub.images))  # files: a folder's only
    train, held = split_names(sorted(files if images is None else images), test)
    out_dir = prepare_out_dir(out, overwrite)
    with staged_dir(out_dir) as tmp:
        for side, names in (("train", train), ("test", held)):
            for n in names:
                if images is not None:
                    save_png(images[n], tmp / side / f"{n}.png")
                elif size == 0:
                    (tmp / side).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(files[n], tmp / side / files[n].name)
                else:
                    try:
                        save_png(_square(files[n], size), tmp / side / f"{n}.png")
                    except BadImage as e:
                        raise UserError(str(e)) from None
        write_text(
            tmp / "split.txt",
            f"source: {source}\ntest: the {test} names of lowest SHA-1 "
            f"(first 8 hex digits)\ntrain: {len(train)} images\ntest: {len(held)} images\n",
        )
    return out_dir


def _square(path: Path, size: int) -> np.ndarray:
    """One file as the models and the bench see it (`data.load_image`: upright, square-padded, resized), 8-bit;
    raises BadImage naming the file."""
    return to_uint8(load_image(path, size))


def add_noise_files(
    source: str,
    out: str,
    sigma: float,
    n: int | None = None,
    size: int = 64,
    seed: int = 1234,
    overwrite: bool = False,
    skip_bad: bool = False,
) -> Path:
    """OUT/clean and OUT/noisy: the first n images of `source` (sorted by name) at size x size, and the same with
    Gaussian noise of std sigma on 0..255, rounded and clipped to 8 bits, as a saved noisy file holds.

    Image i's noise comes from seed + i alone (`noise.add_noise`, the model the bench and the tests share).
    `skip_bad`: an unreadable file is skipped with a warning (the first n readable ones are written)."""
    check_sigma(sigma)
    check_positive("--n", n)
    if not MIN_SIDE <= size <= MAX_NOISE_SIDE:
        raise UserError(f"--size must be in {MIN_SIDE}..{MAX_NOISE_SIDE} px (what denoise reads), got {size}")
    list_images(source)  # a missing path: one line before the checks of --out
    refuse_out_dir(out, overwrite)  # before any image is read
    refuse_inputs_inside(out, {"--input": source})
    # every file read (size x size each) before the folder is made, as training and the bench read it
    images = load_folder(source, size, skip_bad=skip_bad, limit=n)
    clean, names = list(to_uint8(images.images)), images.names
    out_dir = prepare_out_dir(out, overwrite)
    with staged_dir(out_dir) as tmp:
        for i, (a, name) in enumerate(zip(clean, names)):
            x = torch.from_numpy(a).permute(2, 0, 1).float()[None] / 127.5 - 1
            y = add_noise(x, sigma, [seed + i])[0]
            save_png(a, tmp / "clean" / f"{name}.png")
            save_png(to_uint8(y), tmp / "noisy" / f"{name}.png")
    return out_dir

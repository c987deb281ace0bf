"""`tdpm-dip sprites`, `prepare-data` and `add-noise`: the data the other commands read (procedural sprites, a
deterministic train/test split, noisy 8-bit test files)."""

from __future__ import annotations

import click

from .. import defaults
from ..errors import UserError, check_positive, check_seed
from ..outputs import prepare_out_dir, staged_dir
from .common import CONTEXT, cli, first_n_option, out_option, overwrite_option

# ------------------------------------------------------------------------------------------ sprites


@cli.command("sprites", context_settings=CONTEXT)
@click.option("--n", "n", type=int, default=4096, help="Number of sprites.")
@click.option("--size", type=int, default=32, help="Image side in pixels.")
@click.option(
    "--seed", type=int, default=0, help="Sprite i depends only on (SEED, i); use another seed for a held-out set."
)
@out_option("Output folder of PNGs.")
@overwrite_option()
def sprites_cmd(n: int, size: int, seed: int, out: str, overwrite: bool) -> None:
    """Write procedural sprites (the demo's data and the embedded default's training set) as PNGs.

    \b
    Examples:
      tdpm-dip sprites --n 4096 --size 32 --seed 0 --out data/sprites/train
      tdpm-dip sprites --n 512 --size 32 --seed 1 --out data/sprites/test
    """
    from ..data import make_sprites  # deferred: --help loads no network library
    from ..images import save_set  # deferred: --help loads no network library

    check_positive("--n", n)
    if size < 8:
        raise UserError(f"--size must be >= 8, got {size}")
    check_seed(seed)
    out_dir = prepare_out_dir(out, overwrite)
    sprites = make_sprites(n, size, seed)
    with staged_dir(out_dir) as tmp:
        save_set(sprites.images, sprites.names, tmp)
    click.echo(str(out_dir))


# ------------------------------------------------------------------------------------------ data


@cli.command("prepare-data", context_settings=CONTEXT)
@click.option(
    "--source",
    required=True,
    help="A folder of named images (one file per image; its name decides its side of the split) or a hub "
    "dataset id (extra hub; e.g. huggan/pokemon, whose images are named by index).",
)
@click.option(
    "--test", type=int, default=defaults.N_IMAGES, help="Images in the test set: those of lowest SHA-1 of their name."
)
@click.option(
    "--size",
    type=int,
    default=0,
    help="0: copy the files unchanged; else write size x size PNGs (padded to a square with white), 8..4000.",
)
@out_option("Output folder: train/ and test/.")
@overwrite_option()
def prepare_data_cmd(source: str, test: int, size: int, out: str, overwrite: bool) -> None:
    """Split images into train/ and test/ deterministically, by a hash of each name.

    \b
    A name keeps its side whatever else the folder holds. With the 800 Pokemon species artworks (one file
    per species, named by species) and --test 200, the split is the one every Pokemon figure here uses.
    \b
    Example:
      tdpm-dip prepare-data --source pokemon_artwork/ --out data/pokemon
    """
    from ..workflows.datasets import prepare_data  # deferred: --help loads no network library

    click.echo(str(prepare_data(source, out, test, size, overwrite)))


@cli.command("add-noise", context_settings=CONTEXT)
@click.option("--input", "source", required=True, help="Clean images (folder or file), taken in name order.")
@click.option("--sigma", type=float, required=True, help="Gaussian noise std on the 0..255 scale.")
@first_n_option()
@click.option("--size", type=int, default=64, help="Side in pixels (padded to a square with white, Lanczos).")
@click.option(
    "--seed",
    type=int,
    default=1234,
    help="Image i's noise is drawn from seed SEED+i alone, as denoise --clean draws it (whose --seed defaults to "
    "0: give --seed 0 here for the same noise).",
)
@click.option("--skip-bad", is_flag=True, help="Skip unreadable files with a warning instead of stopping.")
@out_option("Output folder: clean/ and noisy/.")
@overwrite_option()
def add_noise_cmd(
    source: str, sigma: float, n: int | None, size: int, seed: int, skip_bad: bool, out: str, overwrite: bool
) -> None:
    """Write noisy 8-bit test files and their clean twins, as a user's noisy files would be.

    \b
    The noise is added on 0..255, rounded and clipped to 8 bits (white backgrounds clip half of it).
    `tdpm-dip denoise --input OUT/noisy --reference OUT/clean` then scores a method on them.
    \b
    Example:
      tdpm-dip add-noise --input data/pokemon/test --sigma 25 --n 32 --out noisy25
    """
    from ..workflows.datasets import add_noise_files  # deferred: --help loads no network library

    click.echo(str(add_noise_files(source, out, sigma, n, size, seed, overwrite, skip_bad)))

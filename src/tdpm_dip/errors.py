"""One exception type for every problem the user can fix; the CLI prints it as one line."""

from __future__ import annotations

SECONDS_PER_MEGAPIXEL = 70  # blind denoising, one network call, one CPU core (docs/results.md, tiled inference)


class UserError(Exception):
    """Bad input (path, image, model, number): reported as a one-line message, exit code 2."""


# One validator per user-facing number: the CLI, the demo and the library raise the same message.


def check_positive(name: str, value: float | None) -> None:
    """value > 0 (None: not given, nothing to check)."""
    if value is not None and not value > 0:
        raise UserError(f"{name} must be > 0, got {value}")


SEED_MAX = 2**62  # image i uses seed SEED + i: well inside the 64-bit integers that torch's generators take


def check_seed(value: int, name: str = "--seed", n: int = 1) -> None:
    """A command's seed: 0 to SEED_MAX - n (image i uses SEED + i; file names carry it, so it is not negative)."""
    if not 0 <= value <= SEED_MAX - n:
        raise UserError(f"{name} must be in 0..2^62 - {n} (image i uses SEED+i), got {value}")


def check_sigma(value: float | None, name: str = "--sigma") -> None:
    """A noise std on the 0..255 scale: in (0, 255]."""
    if value is not None and not 0 < value <= 255:
        raise UserError(f"{name} must be in (0, 255] (noise std on the 0..255 scale), got {value}")


def check_reverse_steps(value: int | None, t_trunc: int, name: str = "--reverse-steps") -> None:
    """A TDPM generator's posterior steps from T_trunc to 0: 1 to T_trunc (1 when T_trunc is 0)."""
    if value is not None and not 1 <= value <= max(t_trunc, 1):
        raise UserError(f"{name} must be in 1..T_trunc ({t_trunc}), got {value}")


def check_symmetries(value: int | None, name: str = "--symmetries") -> None:
    """The ensemble's number of symmetries of the square: 1 to 8."""
    if value is not None and not 1 <= value <= 8:
        raise UserError(f"{name} must be 1 to 8 (the symmetries of the square), got {value}")


def check_pixels(
    width: int, height: int, limit: int, what: str, advice: str = "give --max-megapixels to raise it"
) -> None:
    """An image to denoise within the pixel limit (its cost grows with its pixels: tiles at ~70 s per megapixel and
    network call on one CPU core)."""
    if width * height > limit:
        raise UserError(
            f"{what} is {width}x{height} px ({width * height / 1e6:.1f} Mpx), over the limit of "
            f"{limit / 1e6:g} Mpx (it would take about {width * height / 1e6 * SECONDS_PER_MEGAPIXEL / 60:.0f} min "
            f"on one CPU core){f': {advice}' if advice else ''}"
        )

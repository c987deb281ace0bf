"""The embedded default models: small pretrained networks shipped inside the package.

A new user runs `generate` and `denoise` without `--model`; these resolve to the folders below,
read through the package's resources (never from ../shared). `recipes/embedded_default.sh`
rebuilds them with the project's own commands.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UserError

DDPM_NAME = "ddpm-sprites32"
GENERATOR_NAME = "tdpm-generator-sprites32"


def _weights_dir() -> Path:
    return Path(str(resources.files("tdpm_dip") / "weights"))


def default_ddpm() -> Path:
    """The shipped DDPM folder (diffusers layout: unet/ + scheduler/)."""
    path = _weights_dir() / DDPM_NAME
    if not (path / "unet" / "config.json").is_file():
        raise UserError(f"the embedded default DDPM is missing from this installation ({path}); pass --model")
    return path


def default_generator() -> Path | None:
    """The shipped TDPM generator folder for `default_ddpm()`, or None when this build ships none."""
    path = _weights_dir() / GENERATOR_NAME
    return path if (path / "generator.json").is_file() else None


def resolve_model(model: str | None) -> str:
    """`--model` as given, or the embedded default DDPM when it is omitted."""
    return str(default_ddpm()) if model is None else model

"""What a `tdpm-dip demo` run is made of: its options (`DemoConfig`, defaults from `defaults`), its data
(procedural sprites or `--data`), the phases' timer and the record the phases fill in (`DemoRun`), which the
report (`demo_report`) reads."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..config import get_preset
from ..data import load_images, make_sprites
from ..embedded import default_size
from ..errors import UserError, check_seed
from ..images import save_set
from ..methods import Context, Result

# The DIP presets the demo offers; their settings come from defaults.DIP (paper and blind rows).
DIP_PRESETS = defaults.DIP_PRESETS


@dataclass(frozen=True)
class DemoConfig:
    """Options of `tdpm-dip demo` (the CLI documents each one)."""

    out: str
    data: str | None = None  # None: procedural sprites
    model: str | None = None  # None: train the demo DDPM first
    n: int = defaults.DEMO_N  # test images (denoising) and generated images
    steps: int = defaults.DEMO_STEPS  # training steps
    size: int = defaults.DEMO_SIZE  # image side when training (a --model fixes its own)
    seed: int = 0
    train_images: int = defaults.DEMO_TRAIN_IMAGES  # sprites in the training set (without --data)
    train_batch: int = defaults.DEMO_TRAIN_BATCH
    train_lr: float = 2e-3
    preset: str = defaults.DEMO_PRESET  # DDPM preset when training
    sigma: float = defaults.SIGMA  # blind protocol noise (0..255)
    t_noisy: int | None = None  # paper protocol noise level; None: the report's 600, or the DDPM's top trained level
    t_trunc: int = defaults.T_TRUNC  # TDPM-DIP T_trunc (generation and paper denoising)
    ddpm_steps: int = defaults.DDPM_STEPS  # generation DDPM steps (< 1000: strided ancestral sampler)
    dip_preset: str = defaults.DEMO_DIP_PRESET
    dip_iters: int = defaults.DIP["paper"]["iters"]  # paper protocol and generation (the report's 100)
    blind_dip_iters: int = defaults.DEMO_BLIND_DIP_ITERS
    samples: int = defaults.SAMPLES  # blind TDPM-DIP chains averaged per image
    batch_size: int = defaults.BATCH_SIZE  # images processed (DIPs fitted) at once
    overwrite: bool = False
    embedded: bool = True  # sprites without --model: generate and denoise with the shipped DDPM

    @property
    def uses_embedded(self) -> bool:
        """Generation and denoising use the embedded default DDPM; the run still trains (Algorithm 1)."""
        return self.embedded and self.model is None and self.data is None

    def validate(self) -> None:
        check_seed(self.seed)
        for name in (
            "n",
            "steps",
            "train_images",
            "train_batch",
            "dip_iters",
            "blind_dip_iters",
            "samples",
            "batch_size",
            "ddpm_steps",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if not self.train_lr > 0:
            raise UserError(f"--train-lr must be > 0, got {self.train_lr}")
        if not 0 < self.sigma <= 255:
            raise UserError(f"--sigma must be in (0, 255], got {self.sigma}")
        if self.ddpm_steps > 1000:
            raise UserError(f"--ddpm-steps must be <= 1000, got {self.ddpm_steps}")
        if self.t_noisy is not None and not 1 <= self.t_noisy <= 1000:
            raise UserError(f"--t-noisy must be in [1, 1000], got {self.t_noisy}")
        if not 0 <= self.t_trunc < 1000:
            raise UserError(f"--t-trunc must be in [0, 999], got {self.t_trunc}")
        if self.dip_preset not in DIP_PRESETS:
            raise UserError(f"--dip-preset must be one of {', '.join(DIP_PRESETS)}, got {self.dip_preset!r}")
        if self.uses_embedded:
            if self.size != default_size():
                raise UserError(
                    f"--size {self.size}: the embedded default model is {default_size()} px; pass "
                    "--no-embedded to generate and denoise with the model trained here at another size"
                )
        if self.model is None:
            factor = 2 ** (len(get_preset(self.preset).block_out_channels) - 1)
            if self.size < 8 or self.size % factor:
                raise UserError(f"--size must be >= 8 and a multiple of {factor}, got {self.size}")
            if self.data is None and self.train_batch > self.train_images:
                raise UserError(
                    f"--train-images {self.train_images} is fewer than the demo's training batch of {self.train_batch} "
                    "sprites"
                )


# ---------------------------------------------------------------------------------------------- phases


class Phases:
    """Wall time of each phase; echoed as it ends and listed in the report."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.times: list[tuple[str, float, str]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict]:
        note: dict = {"note": ""}
        self.echo(f"[{len(self.times) + 1}] {name} ...")
        t0 = time.perf_counter()
        yield note
        dt = time.perf_counter() - t0
        self.times.append((name, dt, note["note"]))
        self.echo(f"[{len(self.times)}] {name}: {dt:.1f} s" + (f" ({note['note']})" if note["note"] else ""))

    @property
    def total(self) -> float:
        return sum(t for _, t, _ in self.times)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DemoData:
    test: torch.Tensor  # [n, 3, S, S]: the images to denoise
    reference: torch.Tensor  # what TDPM-DIP generation reconstructs (paper protocol)
    train: torch.Tensor | None  # the training set (copy-rate reference); None with --model
    source: str


def make_data(cfg: DemoConfig, size: int, run: Path) -> DemoData:
    """The test images and the training / reference set (procedural sprites or --data), saved under RUN/data."""
    if cfg.data is None:
        test_set = make_sprites(cfg.n, size, seed=cfg.seed + 1)  # another seed: held out, never trained on
        if cfg.model is None:
            train = make_sprites(cfg.train_images, size, seed=cfg.seed)
            ref, src = train.images[: cfg.n], f"{cfg.train_images} procedural sprites (seed {cfg.seed})"
        else:
            train, ref, src = None, make_sprites(cfg.n, size, seed=cfg.seed).images, "procedural sprites"
        save_set(test_set.images, test_set.names, run / "data" / "test")
        if train is not None:
            save_set(train.images, train.names, run / "data" / "train")
        return DemoData(test_set.images, ref, train.images if train is not None else None, src)

    allset = load_images(cfg.data, size, progress=True)
    n_all = len(allset)
    if n_all <= cfg.n:
        raise UserError(
            f"{cfg.data}: {n_all} images; the demo needs more than --n {cfg.n} "
            "(the first n are the test images, the rest the training / reference set)"
        )
    test, rest = allset.images[: cfg.n], allset.images[cfg.n :]
    save_set(test, allset.names[: cfg.n], run / "data" / "test")
    if cfg.model is None:
        if rest.shape[0] < cfg.train_batch:
            raise UserError(
                f"{cfg.data}: {rest.shape[0]} training images (after {cfg.n} test images), fewer "
                f"than the demo's training batch of {cfg.train_batch}"
            )
        save_set(rest, allset.names[cfg.n :], run / "data" / "train")
    ref = rest[: cfg.n] if rest.shape[0] >= cfg.n else test
    return DemoData(test, ref, rest if cfg.model is None else None, f"{n_all} images from {cfg.data}")


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class DemoRun:
    """What the phases hand on: the run folder being built, the model, the data, and every result."""

    cfg: DemoConfig
    stage: Path  # the staged run folder (moved to `final` when complete)
    final: Path
    phases: Phases
    device: str
    threads: int
    load_start: str
    ctx: Context | None = None
    size: int = defaults.DEMO_SIZE
    data: DemoData | None = None
    model_label: str = ""
    train_info: dict = field(default_factory=dict)
    short_model: str | None = None  # the model trained here, when the embedded default does the rest
    gen: list[tuple[str, Result]] = field(default_factory=list)  # (figure label, generation result)
    # Generation rows left out of generation.png (label -> why): they stay in the table and the report says why.
    off_figure: dict[str, str] = field(default_factory=dict)
    paper: list[Result] = field(default_factory=list)
    blind: list[Result] = field(default_factory=list)
    noisy: torch.Tensor | None = None
    t_noisy: int = defaults.T_NOISY  # the paper protocol's level, resolved against the DDPM (demo._settings)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.cfg.seed, self.cfg.seed + self.cfg.n))


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as the report prints them ("n/a" where the OS has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"

"""The options of `tdpm-dip train` (Algorithm 1), `train-generator` and `train-restorer`, as typed, validated data.

No torch here: the CLI builds both commands' options (and their --help) from these fields without loading a
network library. Every number and name is checked up front: a bad option is a one-line UserError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PRESETS, STYLE_PRESETS, get_preset, parse_fill
from ..errors import UserError, check_reverse_steps, check_seed
from ..outputs import is_within

NUM_TRAIN_TIMESTEPS = 1000  # T of every scheduler this project trains (the report's, and diffusers' default)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
AUGMENTS = ("flip", "d4")
OBJECTIVES = ("gan", "distill")
GAN_AUGMENTS = ("none", "diffaug")
GAN_PREDICTS = ("x_T", "x0")


def check_out_outside_data(data: str | None, out: str) -> None:
    """A run folder inside the training images' folder would add its own sample grids to the data of every later
    run there: a one-line UserError."""
    if data is not None and Path(data).is_dir() and is_within(out, data):
        raise UserError(f"--out {out} is inside --data {data}: its sample grids would become training images")


def option(text: str, choices: tuple[str, ...] | None = None) -> dict:
    """A config field's metadata: its --help text (and its choices), read by the CLI to build the option."""
    return {"help": text, **({"choices": choices} if choices else {})}


def positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value}")


@dataclass
class TrainConfig:
    """Every option of Algorithm 1 (`tdpm-dip train` builds its command-line options from these fields)."""

    data: str = field(metadata=option("image folder, single image or hub dataset id (e.g. huggan/pokemon)"))
    out: str = field(metadata=option("run folder: config.json, metrics.jsonl, samples/, checkpoints/, model/"))
    preset: str = field(
        default="small",
        metadata=option(
            "UNet preset (not used with --init, whose network is trained on): "
            + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items())
        ),
    )
    init: str | None = field(
        default=None,
        metadata=option(
            "start from this DDPM's weights (diffusers folder or hub id) instead of a fresh --preset network: "
            "fine-tuning; its scheduler must be --schedule's and its size --size"
        ),
    )
    schedule: str = field(default="linear", metadata=option("noise schedule: linear or cosine"))
    t_max: int | None = field(
        default=None,
        metadata=option("train only noise levels 1..t_max (the report's T_trunc variant); default: all T=1000"),
    )
    t_min: int = field(
        default=1,
        metadata=option(
            "train only noise levels t_min.. (with --t-max: a band, e.g. a denoiser's levels); default: from 1"
        ),
    )
    size: int = field(default=64, metadata=option("image side in pixels (square-padded, Lanczos-resized)"))
    fill: str = field(default="white", metadata=option("padding / transparency colour: white, black, #rrggbb"))
    skip_bad: bool = field(default=False, metadata=option("skip unreadable images instead of stopping"))
    limit: int | None = field(default=None, metadata=option("use only the first N images"))
    augment: str = field(
        default="flip",
        metadata=option(
            "flip: random horizontal flips; d4: the 8 flips and transposes of the square (the geometric "
            "self-ensemble of `denoise --method ensemble` shows the network all 8)",
            AUGMENTS,
        ),
    )
    steps: int = field(default=10_000, metadata=option("total optimizer steps"))
    epochs: int | None = field(
        default=None,
        metadata=option("train for this many epochs instead of --steps (the report: 100 epochs at batch 32)"),
    )
    batch_size: int = field(default=32, metadata=option("global batch size (split over processes)"))
    lr: float = field(default=1e-4, metadata=option("AdamW peak learning rate"))
    warmup_steps: int = field(default=500, metadata=option("linear LR warm-up steps before the cosine decay"))
    grad_clip: float = field(default=1.0, metadata=option("clip the gradient norm to this (0: no clipping)"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay of the sampled / exported weights"))
    mixed_precision: str = field(
        default="auto", metadata=option("auto (bf16 on recent GPUs, fp16 on older ones, no on CPU), no, bf16 or fp16")
    )
    seed: int = field(default=0, metadata=option("seed of the initial weights, data order, flips, t and noise"))
    log_every: int = field(default=10, metadata=option("steps between metrics.jsonl lines (and NaN checks)"))
    checkpoint_every: int = field(default=1000, metadata=option("steps between checkpoints (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=option("keep this many most recent checkpoints"))
    sample_every: int = field(default=1000, metadata=option("steps between EMA sample grids (0: only at the end)"))
    n_samples: int = field(default=16, metadata=option("images per sample grid (0: no grids)"))
    sample_steps: int = field(default=25, metadata=option("DDIM steps for the sample grids"))
    resume: bool = field(default=False, metadata=option("continue from the latest checkpoint in --out"))
    overwrite: bool = field(
        default=False,
        metadata=option("write into a non-empty --out, replacing its previous run (its checkpoints and sample grids)"),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every number and name up front: a bad option is a one-line UserError, not a crash later."""
        if not str(self.data).strip():
            raise UserError("--data is required (an image folder or a hub dataset id)")
        if not str(self.out).strip():
            raise UserError("--out is required (the run folder)")
        check_out_outside_data(self.data, self.out)
        preset = get_preset(self.preset)
        if self.schedule not in ("linear", "cosine"):
            raise UserError(f"--schedule must be linear or cosine, got {self.schedule!r}")
        if self.augment not in AUGMENTS:
            raise UserError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.t_max is not None and not 1 <= self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--t-max must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.t_max}")
        if not 1 <= self.t_min <= (self.t_max or NUM_TRAIN_TIMESTEPS):
            raise UserError(f"--t-min must be in [1, --t-max], got {self.t_min}")
        # The UNet halves the resolution len(blocks) - 1 times and concatenates skips: sides must divide.
        factor = 2 ** (len(preset.block_out_channels) - 1)
        if self.size < 8 or self.size % factor:
            raise UserError(
                f"--size must be >= 8 and a multiple of {factor} for preset {self.preset!r}, got {self.size}"
            )
        parse_fill(self.fill)
        positive_int("--steps", self.steps)
        positive_int("--batch-size", self.batch_size)
        if self.limit is not None:
            positive_int("--limit", self.limit)
        if self.epochs is not None:
            positive_int("--epochs", self.epochs)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        check_seed(self.seed)
        positive_int("--log-every", self.log_every)
        positive_int("--keep-checkpoints", self.keep_checkpoints)
        for name in ("checkpoint_every", "sample_every", "n_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.sample_steps <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--sample-steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.sample_steps}")
        if self.resume and self.overwrite:
            raise UserError(
                "--resume and --overwrite exclude each other: resume continues the run in --out, "
                "overwrite starts a new one there"
            )


@dataclass
class GeneratorConfig:
    """Every option of `tdpm-dip train-generator` (its command-line options are built from these fields)."""

    model: str = field(metadata=option("the DDPM whose truncated chain G_psi feeds: a diffusers folder or hub id"))
    t_trunc: int = field(metadata=option("truncation level T_trunc: G_psi(z) learns q(x_T_trunc)"))
    out: str = field(metadata=option("run folder: config.json, metrics.jsonl, samples/, checkpoints/, generator/"))
    reverse_steps: int | None = field(
        default=None,
        metadata=option(
            "DDPM steps from T_trunc to 0 when sampling (recorded in generator.json): posterior steps between evenly "
            "spaced levels, so an image costs 1 + this many network calls; default: T_trunc (Algorithm 3)"
        ),
    )
    data: str | None = field(
        default=None,
        metadata=option(
            "training images (folder, file or hub id), resized to the DDPM's size; needed by --objective gan"
        ),
    )
    objective: str = field(
        default="gan",
        metadata=option(
            "gan: non-saturating GAN + R1 against noised training images; distill: regress DDIM(z -> x_T_trunc) "
            "pairs of the DDPM (Luhman & Luhman 2021)",
            OBJECTIVES,
        ),
    )
    preset: str = field(
        default="generator-small",
        metadata=option(
            f"G_psi's network: a StyleGAN-lite generator ({', '.join(STYLE_PRESETS)}) or a UNet preset "
            f"({', '.join(PRESETS)})"
        ),
    )
    init: str | None = field(
        default=None,
        metadata=option(
            "start G_psi from this generator's weights (a RUN/generator folder of the same preset and DDPM), e.g. to "
            "fine-tune one to another --t-trunc; the discriminator starts afresh"
        ),
    )
    fill: str = field(default="white", metadata=option("padding / transparency colour: white, black, #rrggbb"))
    skip_bad: bool = field(default=False, metadata=option("skip unreadable images instead of stopping"))
    limit: int | None = field(default=None, metadata=option("use only the first N images"))
    steps: int = field(default=2000, metadata=option("total generator optimizer steps"))
    batch_size: int = field(default=32, metadata=option("batch size"))
    lr: float = field(default=2e-4, metadata=option("Adam learning rate of G_psi"))
    disc_lr: float = field(default=2e-4, metadata=option("gan: Adam learning rate of the discriminator"))
    r1_gamma: float = field(
        default=0.1, metadata=option("gan: weight gamma of the R1 penalty gamma/2 ||grad D(real)||^2")
    )
    r1_every: int = field(
        default=1,
        metadata=option(
            "gan: apply R1 every N discriminator steps, scaled by N (StyleGAN2's lazy regularisation: cheaper steps)"
        ),
    )
    predict: str = field(
        default="x_T",
        metadata=option(
            "gan: x_T = the network makes x_T_trunc itself; x0 = it makes a clean image and the forward noise of level "
            "T_trunc is added to it, as to the real samples (the discriminator then compares like with like)",
            GAN_PREDICTS,
        ),
    )
    augment: str = field(
        default="none",
        metadata=option(
            "gan: diffaug = DiffAugment (Zhao et al. 2020): the same random colour, translation and cutout on real and "
            "generated samples before the discriminator sees them, so it cannot memorise a small set",
            GAN_AUGMENTS,
        ),
    )
    disc_channels: int = field(default=64, metadata=option("gan: width of the discriminator's first layer"))
    pairs: int = field(default=512, metadata=option("distill: number of (z, DDIM(z)) pairs, computed once"))
    ddim_steps: int = field(default=50, metadata=option("distill: DDIM steps from level T down to T_trunc"))
    warmup_steps: int = field(default=0, metadata=option("linear LR warm-up steps (then constant)"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay of the sampled / exported generator"))
    mixed_precision: str = field(
        default="auto",
        metadata=option(
            "auto (bf16 on recent GPUs, no on CPU), no or bf16 (fp16 is not supported: the R1 penalty's "
            "double backward and a loss scaler do not mix)"
        ),
    )
    seed: int = field(default=0, metadata=option("seed of the weights, data order, flips, z, noise and pairs"))
    log_every: int = field(default=10, metadata=option("steps between metrics.jsonl lines (and NaN checks)"))
    checkpoint_every: int = field(default=500, metadata=option("steps between checkpoints (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=option("keep this many most recent checkpoints"))
    sample_every: int = field(default=500, metadata=option("steps between sample grids (0: only at the end)"))
    n_samples: int = field(
        default=16, metadata=option("images per sample grid: G_psi(z) then the reverse steps (0: none)")
    )
    resume: bool = field(default=False, metadata=option("continue from the latest checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=option("write into a non-empty --out, replacing its previous run"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every number and name up front (one-line UserError); the DDPM-dependent checks run at set-up."""
        if not str(self.model).strip():
            raise UserError("--model is required (the DDPM)")
        if not str(self.out).strip():
            raise UserError("--out is required (the run folder)")
        check_out_outside_data(self.data, self.out)
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "gan" and not (self.data and str(self.data).strip()):
            raise UserError("--objective gan needs --data (the training images noised to T_trunc are its real samples)")
        if self.preset not in STYLE_PRESETS:
            get_preset(self.preset)
        if self.predict not in GAN_PREDICTS:
            raise UserError(f"--predict must be one of {', '.join(GAN_PREDICTS)}, got {self.predict!r}")
        if self.predict == "x0" and self.objective != "gan":
            raise UserError("--predict x0 is for --objective gan (distillation regresses x_T_trunc itself)")
        if self.augment not in GAN_AUGMENTS:
            raise UserError(f"--augment must be one of {', '.join(GAN_AUGMENTS)}, got {self.augment!r}")
        if not isinstance(self.t_trunc, int) or self.t_trunc < 0:
            raise UserError(f"--t-trunc must be an integer >= 0, got {self.t_trunc}")
        check_reverse_steps(self.reverse_steps, self.t_trunc)
        for name in (
            "steps",
            "batch_size",
            "pairs",
            "ddim_steps",
            "disc_channels",
            "r1_every",
            "log_every",
            "keep_checkpoints",
        ):
            positive_int("--" + name.replace("_", "-"), getattr(self, name))
        if self.ddim_steps > NUM_TRAIN_TIMESTEPS:  # a DDIM chain has at most one step per level
            raise UserError(f"--ddim-steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.ddim_steps}")
        if self.limit is not None:
            positive_int("--limit", self.limit)
        for name in ("lr", "disc_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if not (math.isfinite(self.r1_gamma) and self.r1_gamma >= 0):
            raise UserError(f"--r1-gamma must be >= 0, got {self.r1_gamma}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise UserError(f"--mixed-precision must be auto, no or bf16, got {self.mixed_precision!r}")
        check_seed(self.seed)
        for name in ("checkpoint_every", "sample_every", "n_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")


@dataclass
class RestorerConfig:
    """Every option of `tdpm-dip train-restorer` (its command-line options are built from these fields)."""

    data: str = field(metadata=option("clean training images (folder, file or hub id), resized to --size"))
    out: str = field(metadata=option("the restorer folder to write (copy it to MODEL/restorer to use it)"))
    size: int = field(default=64, metadata=option("image side the network is trained at (it runs at any size)"))
    fill: str = field(default="white", metadata=option("padding / transparency colour: white, black, #rrggbb"))
    limit: int | None = field(default=None, metadata=option("use only the first N images"))
    repeats: int = field(default=6, metadata=option("degraded observations made of each image"))
    steps: int = field(default=2400, metadata=option("optimizer steps"))
    batch_size: int = field(default=16, metadata=option("batch size"))
    lr: float = field(default=1e-3, metadata=option("peak AdamW learning rate (one-cycle schedule)"))
    channels: str = field(default="32,64,128", metadata=option("the UNet's block widths, comma-separated"))
    seed: int = field(default=0, metadata=option("seed of the weights, the observations and the batches"))
    threads: int = field(default=0, metadata=option("CPU threads; 0 = auto (all cores when the machine is idle)"))

    def check(self) -> RestorerConfig:
        for name in ("size", "repeats", "steps", "batch_size"):
            positive_int("--" + name.replace("_", "-"), getattr(self, name))
        if self.size % 8 or self.size > 512:
            raise UserError(f"--size must be a multiple of 8 up to 512, got {self.size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be positive, got {self.lr}")
        self.widths()
        parse_fill(self.fill)
        check_seed(self.seed)
        check_out_outside_data(self.data, self.out)
        if Path(self.out).exists():
            raise UserError(f"--out {self.out} exists: give a new folder")
        return self

    def widths(self) -> tuple[int, ...]:
        try:
            w = tuple(int(c) for c in self.channels.split(","))
        except ValueError:
            w = ()
        if not 2 <= len(w) <= 5 or any(c < 8 or c % 8 for c in w):
            raise UserError(f"--channels must be 2 to 5 multiples of 8 (32,64,128), got {self.channels!r}")
        return w

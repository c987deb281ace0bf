"""Algorithm 1 of the report: train the DDPM noise predictor eps_theta.

    repeat: x0 ~ q(x0); t ~ Uniform({1, ..., T_trunc}); eps ~ N(0, I);
            gradient step on || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2

T_trunc = T (the default) is plain DDPM training (Ho et al. 2020, Alg. 1); `t_max` < T trains only the
first t_max noise levels, the report's truncated variant. In diffusers' 0-based indexing level t is
timestep t - 1, so t is drawn uniformly from 0..t_max-1.

The loop uses `accelerate` for device placement, mixed precision and `accelerate launch`; AdamW with a
cosine LR schedule and warm-up, gradient clipping and an EMA of the weights (the EMA is what is sampled
and exported). Every random draw of step i (which images, flips, t, eps) comes from generators seeded by
(seed, i), never from global state, so a resumed run repeats an uninterrupted one exactly on the CPU,
and the global batch does not depend on the number of processes.

Run folder: config.json, metrics.jsonl, samples/step_XXXXXX.png (EMA, DDIM), checkpoints/step_XXXXXX/
(safetensors + JSON, written atomically) and model/ (a `DDPMPipeline` folder with the EMA weights).
--overwrite of an earlier run builds the new one beside it and swaps it in only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from .config import PRESETS, get_preset
from .data import ImageSet, load_images, parse_fill
from .errors import UserError
from .models import build_unet, count_params, save_ddpm
from .noise import image_generators, make_scheduler, randn
from .outputs import prepare_out_dir, save_grid, staged_dir, write_json, write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

NUM_TRAIN_TIMESTEPS = 1000  # T of every scheduler this project trains (the report's, and diffusers' default)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Options a resumed run must share with its checkpoint: changing them would silently train another model
# (AdamW and the LR schedule restore their own lr, so a new --lr would be ignored, not applied).
RESUME_MUST_MATCH = ("preset", "size", "schedule", "t_max", "fill", "batch_size", "lr", "warmup_steps",
                     "ema_decay", "seed")
CKPT_RE = re.compile(r"step_(\d+)")
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "checkpoints", "model")  # what a run writes in --out


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Every option of Algorithm 1 (`tdpm-dip train` builds its command-line options from these fields)."""

    data: str = field(metadata=_help("image folder, single image or hub dataset id (e.g. huggan/pokemon)"))
    out: str = field(metadata=_help("run folder: config.json, metrics.jsonl, samples/, checkpoints/, model/"))
    preset: str = field(default="small", metadata=_help(f"UNet preset: {', '.join(PRESETS)}"))
    schedule: str = field(default="linear", metadata=_help("noise schedule: linear or cosine"))
    t_max: int | None = field(default=None, metadata=_help(
        "train only noise levels 1..t_max (the report's T_trunc variant); default: all T=1000"))
    size: int = field(default=64, metadata=_help("image side in pixels (square-padded, Lanczos-resized)"))
    fill: str = field(default="white", metadata=_help("padding / transparency colour: white, black, #rrggbb"))
    skip_bad: bool = field(default=False, metadata=_help("skip unreadable images instead of stopping"))
    limit: int | None = field(default=None, metadata=_help("use only the first N images"))
    steps: int = field(default=10_000, metadata=_help("total optimizer steps"))
    epochs: int | None = field(default=None, metadata=_help(
        "train for this many epochs instead of --steps (the report: 100 epochs at batch 32)"))
    batch_size: int = field(default=32, metadata=_help("global batch size (split over processes)"))
    lr: float = field(default=1e-4, metadata=_help("AdamW peak learning rate"))
    warmup_steps: int = field(default=500, metadata=_help("linear LR warm-up steps before the cosine decay"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0: no clipping)"))
    ema_decay: float = field(default=0.999, metadata=_help("EMA decay of the sampled / exported weights"))
    mixed_precision: str = field(default="auto", metadata=_help(
        "auto (bf16 on recent GPUs, fp16 on older ones, no on CPU), no, bf16 or fp16"))
    seed: int = field(default=0, metadata=_help("seed of the initial weights, data order, flips, t and noise"))
    log_every: int = field(default=10, metadata=_help("steps between metrics.jsonl lines (and NaN checks)"))
    checkpoint_every: int = field(default=1000, metadata=_help("steps between checkpoints (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("keep this many most recent checkpoints"))
    sample_every: int = field(default=1000, metadata=_help("steps between EMA sample grids (0: only at the end)"))
    n_samples: int = field(default=16, metadata=_help("images per sample grid (0: no grids)"))
    sample_steps: int = field(default=25, metadata=_help("DDIM steps for the sample grids"))
    resume: bool = field(default=False, metadata=_help("continue from the latest checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=_help(
        "write into a non-empty --out, replacing its previous run (its checkpoints and sample grids)"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every number and name up front: a bad option is a one-line UserError, not a crash later."""
        if not str(self.data).strip():
            raise UserError("--data is required (an image folder or a hub dataset id)")
        if not str(self.out).strip():
            raise UserError("--out is required (the run folder)")
        preset = get_preset(self.preset)
        if self.schedule not in ("linear", "cosine"):
            raise UserError(f"--schedule must be linear or cosine, got {self.schedule!r}")
        if self.t_max is not None and not 1 <= self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--t-max must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.t_max}")
        # The UNet halves the resolution len(blocks) - 1 times and concatenates skips: sides must divide.
        factor = 2 ** (len(preset.block_out_channels) - 1)
        if self.size < 8 or self.size % factor:
            raise UserError(f"--size must be >= 8 and a multiple of {factor} for preset {self.preset!r}, "
                            f"got {self.size}")
        parse_fill(self.fill)
        _positive("--steps", self.steps)
        _positive("--batch-size", self.batch_size)
        if self.limit is not None:
            _positive("--limit", self.limit)
        if self.epochs is not None:
            _positive("--epochs", self.epochs)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"--grad-clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, "
                            f"got {self.mixed_precision!r}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        _positive("--log-every", self.log_every)
        _positive("--keep-checkpoints", self.keep_checkpoints)
        for name in ("checkpoint_every", "sample_every", "n_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.sample_steps <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--sample-steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {self.sample_steps}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                            "overwrite starts a new one there")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value}")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------- randomness: a pure function of (seed, step)

def derive_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for draw `index` of a named stream; independent streams, no global RNG involved."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    a, b = np.random.SeedSequence([seed, tag, index]).generate_state(2)
    return (int(a) << 31) ^ int(b)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))


def batch_indices(step: int, n_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of 0-based step `step` (Algorithm 1 line 2, x0 ~ q(x0)).

    Each epoch is a fresh permutation seeded by (seed, epoch) and cut into n_images // batch_size
    batches (the remainder is dropped, so every batch has the same size); nothing to checkpoint.
    """
    per_epoch = n_images // batch_size
    epoch, pos = divmod(step, per_epoch)
    return _epoch_permutation(seed, epoch, n_images)[pos * batch_size:(pos + 1) * batch_size]


def sample_timesteps(n: int, t_max: int | None, generator: torch.Generator,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Algorithm 1 line 3: t ~ Uniform({1, ..., T_trunc}), returned as diffusers indices 0..T_trunc-1."""
    hi = num_train_timesteps if t_max is None else t_max
    if not 1 <= hi <= num_train_timesteps:
        raise UserError(f"t_max must be in [1, {num_train_timesteps}], got {t_max}")
    return torch.randint(0, hi, (n,), generator=generator, device=device)


def step_draws(step: int, batch_size: int, size: int, seed: int, t_max: int | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flip mask [B], timesteps [B], noise eps [B, 3, size, size]) of 0-based step `step`.

    Drawn for the whole global batch on every process, in a fixed order from one generator living on
    the training device (noise is never drawn on one device and moved): each process slices its part.
    """
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step))
    flips = torch.rand(batch_size, generator=g, device=device) < 0.5
    t = sample_timesteps(batch_size, t_max, g, device=device)
    eps = torch.randn((batch_size, 3, size, size), generator=g, device=device)
    return flips, t, eps


def diffusion_loss(model: torch.nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 line 6: mean || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2."""
    x_t = scheduler.add_noise(x0, eps, t)
    pred = model(x_t, t).sample
    # The MSE in fp32: under autocast the prediction may be bf16/fp16, and the loss is a small number.
    return F.mse_loss(pred.float(), eps.float())


# ---------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a model's weights, kept as a full fp32 copy (sampled and exported)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def current_decay(self) -> float:
        # Warm-up as in diffusers' EMAModel: with 0.999 from step 1 a short run would mostly average the
        # random initialisation; (1 + n) / (10 + n) lets early updates dominate.
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)], weight)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, atomic)

def _cpu_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _flatten_optimizer(sd: dict, prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, keyed PREFIX.pid.name; JSON-able rest); no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optimizer") -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (complete: staged, so state.json exists)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CKPT_RE.fullmatch(p.name)) and (p / "training_state.json").is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler, scaler_state: dict | None,
                    config: dict, extra_modules: dict[str, torch.nn.Module] | None = None,
                    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Write checkpoints/step_XXXXXX atomically (built under a temporary name, then renamed).

    `extra_modules` (NAME.safetensors) and `extra_optimizers` are networks trained beside `model`, such
    as a GAN's discriminator and its optimizer (generator.py).
    """
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step_{step:06d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    extra_meta = {}
    for name, opt in (extra_optimizers or {}).items():
        t, extra_meta[name] = _flatten_optimizer(opt.state_dict(), prefix=name)
        opt_tensors.update(t)
    # Nothing in the loop uses the global RNGs (every draw has its own generator); they are saved anyway
    # so that code added later (dropout, say) still resumes exactly.
    opt_tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            opt_tensors[f"rng.cuda.{i}"] = s
    with staged_dir(final) as tmp:
        save_file(_cpu_tensors(model.state_dict()), str(tmp / "model.safetensors"))
        save_file(_cpu_tensors(ema.model.state_dict()), str(tmp / "ema.safetensors"))
        for name, module in (extra_modules or {}).items():
            save_file(_cpu_tensors(module.state_dict()), str(tmp / f"{name}.safetensors"))
        save_file(opt_tensors, str(tmp / "training_state.safetensors"))
        lr_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json(tmp / "training_state.json", {
            "step": step, "optimizer": opt_meta, "lr_scheduler": lr_state, "grad_scaler": scaler_state,
            "ema": {"decay": ema.decay, "num_updates": ema.num_updates}, "config": config,
            "extra_optimizers": extra_meta,
        })
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                    extra_modules: dict[str, torch.nn.Module] | None = None,
                    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict:
    """Restore a checkpoint written by `save_checkpoint` in place; returns its JSON part."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "training_state.json").read_text())
        device = next(model.parameters()).device
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
        ema.load_state_dict({"model": load_file(path / "ema.safetensors", device=str(device)), **meta["ema"]})
        for name, module in (extra_modules or {}).items():
            module.load_state_dict(load_file(path / f"{name}.safetensors", device=str(device)))
        tensors = load_file(path / "training_state.safetensors")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise UserError(f"{path}: damaged checkpoint ({str(e).splitlines()[0]}); delete it to resume "
                        "from the one before") from None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    for name, opt in (extra_optimizers or {}).items():
        opt.load_state_dict(_unflatten_optimizer(tensors, meta["extra_optimizers"][name], prefix=name))
    lr_scheduler.load_state_dict(dict(meta["lr_scheduler"], lr_lambdas=[None]))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


# ---------------------------------------------------------------- the run

def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 on GPUs with native bf16 (compute capability >= 8), fp16 on older GPUs, no on CPU."""
    if choice != "auto":
        if choice == "fp16" and not torch.cuda.is_available():
            raise UserError("--mixed-precision fp16 needs a CUDA GPU; use no or bf16 on the CPU")
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    return "no"


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers

    from . import __version__

    return {"tdpm_dip": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "accelerate": accelerate.__version__}


def _check_out_dir(out: Path, allow_existing: bool) -> None:
    """Read-only version of prepare_out_dir, for the processes that do not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not allow_existing:
        raise UserError(f"{out}: exists and is not empty (use --resume to continue its run, or --overwrite)")


@contextlib.contextmanager
def _run_folder(cfg: TrainConfig | LoopOptions, out: Path, owned: tuple[str, ...] = RUN_FILES) -> Iterator[Path]:
    """Where the main process writes the run: `out` itself, except for --overwrite of an earlier run.

    That one is built beside it and replaces the earlier run's files (`owned`, whole) only when it is
    complete (`staged_dir`): interrupted or failed, it is discarded and the earlier run, checkpoints
    included, stays as it was; a later --resume continues that one. Other files in `out` are kept. A new
    run or --resume writes in `out`, where every checkpoint is complete once written (--resume restarts
    from the latest)."""
    if not (cfg.overwrite and out.is_dir() and any(out.iterdir())):
        yield out
        return
    with staged_dir(out, owned=owned) as work:
        try:
            yield work
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e} (that checkpoint was in the discarded --overwrite run: {out} still "
                                   "holds the earlier run)") from None


def _remove_cut_writes(out: Path) -> None:
    """--resume after a kill -9: delete what that process was writing (staged checkpoints or export,
    temporary files); complete files are never named like these."""
    for folder in (out, out / "checkpoints", out / "samples"):
        for p in folder.iterdir() if folder.is_dir() else []:
            if not (p.name.startswith(".") and (".partial." in p.name or p.name.endswith(".tmp"))):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint: those steps are trained again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            pass  # a line cut short by a crash
    write_text(path, "".join(line + "\n" for line in keep))


def _resume_mismatch(saved: dict, cfg: TrainConfig | LoopOptions, n_images: int,
                     must_match: tuple[str, ...] = RESUME_MUST_MATCH) -> list[str]:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}"
             for k in must_match if saved.get(k) != getattr(cfg, k)]
    if saved.get("n_images") not in (None, n_images):
        diffs.append(f"images: checkpoint {saved['n_images']}, now {n_images}")
    return diffs


@torch.no_grad()
def sample_grid(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, steps: int, seed: int,
                device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """n DDIM samples of `unet` from fixed noise (same seeds at every step, so grids are comparable)."""
    from .sampling import ddim_chain

    size = int(unet.config.sample_size)
    gens = image_generators([derive_seed(seed, "samples", i) for i in range(n)], device)
    x_T = randn((3, size, size), gens, device)
    return ddim_chain(unet, scheduler, x_T, steps, gens, amp_dtype=amp_dtype)


class LoopOptions(Protocol):
    """The options the shared loop reads (TrainConfig and generator.GeneratorConfig both have them)."""

    steps: int
    batch_size: int
    seed: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    sample_every: int
    n_samples: int
    resume: bool
    overwrite: bool


@dataclass(frozen=True)
class _Run:
    """What a run fixes once set up: options, data, the networks and their optimizer (built by `_setup`)."""

    cfg: LoopOptions                  # with --epochs resolved into steps
    out: Path
    accelerator: Accelerator
    mixed: str                        # the resolved mixed precision: no, bf16 or fp16
    images: torch.Tensor              # the whole preloaded dataset (see _place)
    n_images: int
    scheduler: DDPMScheduler
    unet: UNet2DModel                 # the bare network: the EMA, checkpoints and export read it
    model: torch.nn.Module            # the same network as accelerator.prepare wraps it: trained through this
    ema: EMA
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    run_config: dict                  # the options, as config.json and every checkpoint record them
    start: int                        # the step the run starts after (the checkpoint's, when resuming)
    resumed_from: Path | None
    # Networks trained beside `unet` and checkpointed with it (a GAN's discriminator), and their optimizers.
    extra_modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class _RunLog:
    """What the loop carries from step to step: the last checkpoint written and the current metrics window.

    Losses and gradient norms stay on the device and are read once per window (every log_every steps): a
    .item() per step would stall the GPU queue. The NaN check runs at those reads, always before a
    checkpoint is written.
    """

    last_ckpt: Path | None
    step_last: int                    # the last step of the previous window
    t_last: float = field(default_factory=time.perf_counter)  # when this window's training began
    t0: float = field(default_factory=time.perf_counter)
    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # further logged scalars, NaN-checked


# A training step: (run, 1-based step) -> (loss, gradient norm, further scalars to log), left on the device.
StepFn = Callable[[_Run, int], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def train(cfg: TrainConfig, progress: bool = True, callback: Callable[[int], None] | None = None) -> Path:
    """Algorithm 1: train eps_theta on `cfg.data`; returns the exported `DDPMPipeline` folder `out/model`.

    `callback(step)` is called after every optimizer step (1-based) on every process.
    """
    cfg.validate()
    with contextlib.ExitStack() as folder:  # holds the staging of an --overwrite run (_run_folder)
        run = _setup(cfg, progress, folder)
        run_loop(run, _train_step, _save_samples, progress, callback, "train")
        _export(run)
    run.accelerator.wait_for_everyone()  # the main process has put the run in place
    return Path(cfg.out) / "model"


def run_loop(run: _Run, step_fn: StepFn, sample_fn: Callable[[_Run, int], None], progress: bool = True,
             callback: Callable[[int], None] | None = None, desc: str = "train") -> None:
    """The steps run.start+1 .. cfg.steps: metrics and the NaN stop every log_every steps, atomic
    checkpoints every checkpoint_every, sample grids every sample_every, and at the last step."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    log = _RunLog(last_ckpt=run.resumed_from, step_last=run.start)
    bar = tqdm(total=cfg.steps, initial=run.start, desc=desc, unit="step",
               disable=not (progress and run.main), dynamic_ncols=True)
    try:
        for step in range(run.start + 1, cfg.steps + 1):
            loss, grad_norm, extra = step_fn(run, step)
            log.losses.append(loss)
            log.norms.append(grad_norm)
            for k, v in extra.items():
                log.extra.setdefault(k, []).append(v)
            bar.update(1)
            if callback is not None:
                callback(step)

            do_ckpt = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == cfg.steps
            do_grid = (cfg.sample_every > 0 and step % cfg.sample_every == 0) or step == cfg.steps
            if step % cfg.log_every == 0 or do_ckpt or do_grid:
                rec = _log_metrics(run, log, step)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_s']:.1f}")
            if do_ckpt:
                _checkpoint(run, log, step)
            if do_grid:
                sample_fn(run, step)
            if do_ckpt or do_grid:
                log.t_last = time.perf_counter()  # it/s measures training, not saving or sampling
    finally:
        bar.close()


def _setup(cfg: TrainConfig, progress: bool, folder: contextlib.ExitStack) -> _Run:
    """Accelerator, data, networks and optimizer; restores the latest checkpoint when resuming and
    (main process) starts the run folder (`_run_folder`, entered into `folder`)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup

    out = Path(cfg.out)
    mixed = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed)
    device, main, nproc = accelerator.device, accelerator.is_main_process, accelerator.num_processes

    _check_out_dir(out, allow_existing=cfg.resume or cfg.overwrite)
    data = load_images(cfg.data, cfg.size, cfg.fill, cfg.skip_bad, cfg.limit, progress=progress and main)
    n = len(data)
    if cfg.batch_size > n:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the dataset ({n} images in {cfg.data})")
    if cfg.batch_size % nproc:
        raise UserError(f"--batch-size {cfg.batch_size} does not split evenly over {nproc} processes")
    if cfg.epochs is not None:
        cfg = replace(cfg, steps=cfg.epochs * (n // cfg.batch_size))

    if device.type == "cuda":
        # TF32 for whatever autocast leaves in fp32: nearly free on Ampere+, and this loop is not precision-bound.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    scheduler = make_scheduler(cfg.schedule, NUM_TRAIN_TIMESTEPS)
    unet = build_unet(cfg.preset, seed=cfg.seed, sample_size=cfg.size).to(device).train()
    ema = EMA(unet, cfg.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    # Stepped by us once per optimizer step; handing it to accelerator.prepare would step it once per
    # process (accelerate's convention), shortening the schedule under `accelerate launch`.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    images = _place(data, device)
    run_config = {**asdict(cfg), "n_images": n}
    start, resumed_from = resume_run(cfg, out, n, unet, ema, optimizer, lr_scheduler)
    out = open_run_folder(cfg, out, folder, accelerator, start, RUN_FILES, {
        "config": run_config, "algorithm": "Algorithm 1 (DDPM training)", "resumed_from": str(resumed_from)
        if resumed_from else None, "device": str(device), "device_name": _device_name(device),
        "num_processes": nproc, "mixed_precision": mixed, "params": count_params(unet),
        "unet": get_preset(cfg.preset).unet_kwargs(cfg.size), "scheduler": dict(scheduler.config),
        "versions": _versions(),
    })

    model, optimizer = accelerator.prepare(unet, optimizer)
    if resumed_from is not None and accelerator.scaler is not None:
        saved_scaler = json.loads((resumed_from / "training_state.json").read_text()).get("grad_scaler")
        if saved_scaler:
            accelerator.scaler.load_state_dict(saved_scaler)
    return _Run(cfg, out, accelerator, mixed, images, n, scheduler, unet, model, ema, optimizer, lr_scheduler,
                run_config, start, resumed_from)


def open_run_folder(cfg: TrainConfig | LoopOptions, out: Path, folder: contextlib.ExitStack, accelerator: Accelerator,
                    start: int, owned: tuple[str, ...], config_json: dict) -> Path:
    """Where the main process writes the run (`_run_folder`, entered into `folder`): prepared, cleaned
    after a cut --resume (partial writes removed, metrics after the checkpoint dropped), config.json written."""
    if accelerator.is_main_process:
        out = folder.enter_context(_run_folder(cfg, out, owned))
        prepare_out_dir(out, overwrite=cfg.resume or cfg.overwrite)
        if cfg.resume:
            _remove_cut_writes(out)
            _truncate_metrics(out / "metrics.jsonl", start)
        write_json(out / "config.json", config_json)
    accelerator.wait_for_everyone()
    return out


def resume_run(cfg: TrainConfig | LoopOptions, out: Path, n_images: int, unet: UNet2DModel, ema: EMA,
               optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
               must_match: tuple[str, ...] = RESUME_MUST_MATCH,
               extra_modules: dict[str, torch.nn.Module] | None = None,
               extra_optimizers: dict[str, torch.optim.Optimizer] | None = None) -> tuple[int, Path | None]:
    """--resume: restore the latest checkpoint in place; returns (its step, its folder), or (0, None)."""
    ckpts = list_checkpoints(out) if cfg.resume else []
    if not ckpts:
        return 0, None
    last = ckpts[-1]
    saved = json.loads((last / "training_state.json").read_text()).get("config", {})
    diffs = _resume_mismatch(saved, cfg, n_images, must_match)
    if diffs:
        raise UserError(f"{last}: cannot resume with different options ({'; '.join(diffs)}); "
                        "use the same options or another --out")
    start = int(load_checkpoint(last, unet, ema, optimizer, lr_scheduler, extra_modules, extra_optimizers)["step"])
    if start > cfg.steps:
        raise UserError(f"{last}: the checkpoint is at step {start}, past --steps {cfg.steps}")
    return start, last


def _train_step(run: _Run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step (1-based `step`) of Algorithm 1 and the EMA; returns the loss and the gradient norm,
    left on the device (and no further scalars)."""
    cfg, acc = run.cfg, run.accelerator
    i = step - 1  # 0-based index of this step's random draws
    idx = batch_indices(i, run.n_images, cfg.batch_size, cfg.seed)
    flips, t, eps = step_draws(i, cfg.batch_size, cfg.size, cfg.seed, cfg.t_max, run.device)
    local_bs = cfg.batch_size // acc.num_processes
    mine = slice(acc.process_index * local_bs, (acc.process_index + 1) * local_bs)  # this process's share
    x0 = run.images[idx[mine].to(run.images.device)].to(run.device, non_blocking=True)
    x0 = torch.where(flips[mine, None, None, None], x0.flip(-1), x0)  # random horizontal flips
    with acc.autocast():
        loss = diffusion_loss(run.model, run.scheduler, x0, t[mine], eps[mine])
    acc.backward(loss)
    # max_norm=inf (--grad-clip 0) measures the norm without clipping: it is logged and NaN-checked.
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), max_norm).detach()
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet)
    return loss.detach(), grad_norm, {}


def _log_metrics(run: _Run, log: _RunLog, step: int) -> dict:
    """Read the window's losses and gradient norms (the host sync), stop on NaN / inf, append a line to
    metrics.jsonl (main process) and start the next window; returns the line."""
    cfg = run.cfg
    vals = torch.stack(log.losses)
    if run.accelerator.num_processes > 1:
        vals = run.accelerator.reduce(vals, reduction="mean")
    vals_l = vals.float().cpu().tolist()
    # Gradient norms are identical on every process (DDP averages gradients before clipping). A finite
    # loss with a non-finite gradient would still poison the weights the next checkpoint saves; under
    # fp16 the grad scaler skips such steps by design, so they are not an error there.
    norms_l = torch.stack(log.norms).float().cpu().tolist()
    if run.mixed == "fp16":
        norms_l = [g if math.isfinite(g) else 0.0 for g in norms_l]
    extra_l = {k: torch.stack(v).float().cpu().tolist() for k, v in log.extra.items()}
    series = {"loss": vals_l, "gradient norm": norms_l, **extra_l}
    bad = next((i for i in range(len(vals_l)) if not all(math.isfinite(v[i]) for v in series.values())), None)
    if bad is not None:
        what = next((k, v[bad]) for k, v in series.items() if not math.isfinite(v[bad]))
        raise TrainingDiverged(
            f"{what[0]} became {what[1]} at step {log.step_last + 1 + bad}; last good checkpoint: "
            f"{log.last_ckpt if log.last_ckpt else 'none (none written yet)'}. Lower --lr or raise "
            "--warmup-steps, then --resume")
    now = time.perf_counter()
    its = (step - log.step_last) / max(now - log.t_last, 1e-9)
    rec = {"step": step, "epoch": round(step * cfg.batch_size / run.n_images, 4),
           "loss": sum(vals_l) / len(vals_l), "loss_last": vals_l[-1], "lr": run.lr_scheduler.get_last_lr()[0],
           "it_s": round(its, 4), "img_s": round(its * cfg.batch_size, 2), "elapsed_s": round(now - log.t0, 2)}
    rec["grad_norm"] = sum(norms_l) / len(norms_l)
    rec.update({k: sum(v) / len(v) for k, v in extra_l.items()})
    if run.device.type == "cuda":
        rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
    if run.main:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    log.losses.clear()
    log.norms.clear()
    log.extra.clear()
    log.t_last, log.step_last = now, step
    return rec


def _checkpoint(run: _Run, log: _RunLog, step: int) -> None:
    """Write checkpoint `step` (main process), recorded in `log`; drop those beyond --keep-checkpoints."""
    if run.main:
        scaler = run.accelerator.scaler
        log.last_ckpt = save_checkpoint(run.out, step, run.unet, run.ema, run.optimizer, run.lr_scheduler,
                                        scaler.state_dict() if scaler is not None else None, run.run_config,
                                        run.extra_modules, run.extra_optimizers)
        for old in list_checkpoints(run.out)[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def _save_samples(run: _Run, step: int) -> None:
    cfg = run.cfg
    if run.main and cfg.n_samples > 0:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.mixed)
        x = sample_grid(run.ema.model, run.scheduler, cfg.n_samples, cfg.sample_steps, cfg.seed, run.device,
                        amp_dtype)
        save_grid(x, run.out / "samples" / f"step_{step:06d}.png", upscale=max(1, 64 // cfg.size))


def _export(run: _Run) -> Path:
    """The EMA weights as a `DDPMPipeline` folder, out/model (written atomically)."""
    export = run.out / "model"
    if run.main:
        with staged_dir(export) as tmp:
            save_ddpm(run.ema.model, run.scheduler, tmp)
    run.accelerator.wait_for_everyone()
    return export


def _place(data: ImageSet, device: torch.device) -> torch.Tensor:
    """Keep the preloaded images on the training device when they fit easily (no per-step copies)."""
    imgs = data.images.float()
    if device.type == "cuda" and imgs.numel() * 4 > 4 * 2**30:
        return imgs.pin_memory()  # large sets stay in pinned host memory; batches are copied asynchronously
    return imgs.to(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


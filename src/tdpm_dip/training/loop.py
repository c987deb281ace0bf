"""The training loop that Algorithm 1 (`ddpm.py`) and the generator G_psi (`generator.py`) share.

It uses `accelerate` for device placement, mixed precision and `accelerate launch`; an EMA of the weights
(the EMA is what is sampled and exported); atomic safetensors checkpoints (no pickle) with the optimizer,
the LR schedule and any networks trained beside the main one; `--resume` from the latest checkpoint;
metrics.jsonl with a NaN stop; sample grids. Every random draw of step i comes from generators seeded by
(seed, i) (`seeding.derive_seed`), never from global state, so a resumed run repeats an uninterrupted one
exactly on the CPU, and the global batch does not depend on the number of processes. What --resume and
--overwrite do to the run folder is `run_folder`'s.

A trainer gives `start_run` its networks and optimizer and `run_loop` a step function; this module does the rest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import accelerate
import diffusers
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import __version__
from ..data import ImageSet
from ..errors import UserError
from ..models import count_params
from ..outputs import ordinary_modes, staged_dir, write_json
from .run_folder import FolderOptions, TrainingDiverged, check_out_dir, open_run_folder

# derive_seed and batch_indices are the trainers' too: they import the whole loop from here
from .seeding import batch_indices as batch_indices
from .seeding import derive_seed as derive_seed

CKPT_RE = re.compile(r"step_(\d+)")


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
        ema_p: list[torch.Tensor] = list(self.model.parameters())
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
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CKPT_RE.fullmatch(p.name)) and (p / "training_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler_state: dict | None,
    config: dict,
    extra_modules: dict[str, torch.nn.Module] | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write checkpoints/step_XXXXXX atomically (built under a temporary name, then renamed).

    `extra_modules` (NAME.safetensors) and `extra_optimizers` are networks trained beside `model`, such
    as a GAN's discriminator and its optimizer (generator.py).
    """
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
        ordinary_modes(tmp)
        lr_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json(
            tmp / "training_state.json",
            {
                "step": step,
                "optimizer": opt_meta,
                "lr_scheduler": lr_state,
                "grad_scaler": scaler_state,
                "ema": {"decay": ema.decay, "num_updates": ema.num_updates},
                "config": config,
                "extra_optimizers": extra_meta,
            },
        )
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra_modules: dict[str, torch.nn.Module] | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> dict:
    """Restore a checkpoint written by `save_checkpoint` in place; returns its JSON part."""
    try:
        meta = json.loads((path / "training_state.json").read_text())
        device = next(model.parameters()).device
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
        ema.load_state_dict({"model": load_file(path / "ema.safetensors", device=str(device)), **meta["ema"]})
        for name, module in (extra_modules or {}).items():
            module.load_state_dict(load_file(path / f"{name}.safetensors", device=str(device)))
        tensors = load_file(path / "training_state.safetensors")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise UserError(
            f"{path}: damaged checkpoint ({str(e).splitlines()[0]}); delete it to resume from the one before"
        ) from None
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


def versions() -> dict[str, str]:
    return {
        "tdpm_dip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
    }


def _resume_mismatch(saved: dict, cfg: LoopOptions, n_images: int, must_match: tuple[str, ...]) -> list[str]:
    # An option newer than the checkpoint is absent from it: that run had the option's default.
    default = {f.name: f.default for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    diffs = [
        f"{k}: checkpoint {saved.get(k, default.get(k))!r}, now {getattr(cfg, k)!r}"
        for k in must_match
        if saved.get(k, default.get(k)) != getattr(cfg, k)
    ]
    if saved.get("n_images") not in (None, n_images):
        diffs.append(f"images: checkpoint {saved['n_images']}, now {n_images}")
    return diffs


class LoopOptions(FolderOptions, Protocol):
    """The options the shared loop reads (TrainConfig and generator.GeneratorConfig both have them)."""

    steps: int
    batch_size: int
    seed: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    sample_every: int
    n_samples: int


@dataclass(frozen=True)
class Run:
    """What a run fixes once set up: options, data, the networks and their optimizer (`start_run`)."""

    cfg: LoopOptions  # with --epochs resolved into steps
    out: Path
    accelerator: Accelerator
    mixed: str  # the resolved mixed precision: no, bf16 or fp16
    images: torch.Tensor  # the whole preloaded dataset (see place_images)
    n_images: int
    scheduler: DDPMScheduler
    unet: UNet2DModel  # the bare network: the EMA, checkpoints and export read it
    model: torch.nn.Module  # the same network as accelerator.prepare wraps it: trained through this
    ema: EMA
    optimizer: torch.optim.Optimizer  # prepared by accelerate
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    run_config: dict  # the options, as config.json and every checkpoint record them
    start: int  # the step the run starts after (the checkpoint's, when resuming)
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
class RunLog:
    """What the loop carries from step to step: the last checkpoint written and the current metrics window.

    Losses and gradient norms stay on the device and are read once per window (every log_every steps): a
    .item() per step would stall the GPU queue. The NaN check runs at those reads, always before a
    checkpoint is written.
    """

    last_ckpt: Path | None
    step_last: int  # the last step of the previous window
    t_last: float = field(default_factory=time.perf_counter)  # when this window's training began
    t0: float = field(default_factory=time.perf_counter)
    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # further logged scalars, NaN-checked


# A training step: (run, 1-based step) -> (loss, gradient norm, further scalars to log), left on the device.
StepFn = Callable[[Run, int], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def optimizer_step(run: Run, loss: torch.Tensor, max_norm: float = math.inf) -> torch.Tensor:
    """Backward, the gradient norm (clipped to max_norm; inf measures it without clipping, for the log and
    the NaN check), one optimizer and LR step, then the EMA; returns the norm, left on the device."""
    run.accelerator.backward(loss)
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm).detach()
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet)
    return grad_norm


def run_loop(
    run: Run,
    step_fn: StepFn,
    sample_fn: Callable[[Run, int], None],
    progress: bool = True,
    callback: Callable[[int], None] | None = None,
    desc: str = "train",
) -> None:
    """The steps run.start+1 .. cfg.steps: metrics and the NaN stop every log_every steps, atomic
    checkpoints every checkpoint_every, sample grids every sample_every, and at the last step."""
    cfg = run.cfg
    log = RunLog(last_ckpt=run.resumed_from, step_last=run.start)
    bar = tqdm(
        total=cfg.steps,
        initial=run.start,
        desc=desc,
        unit="step",
        disable=not (progress and run.main),
        dynamic_ncols=True,
    )
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


def resume_run(
    cfg: LoopOptions,
    out: Path,
    n_images: int,
    unet: UNet2DModel,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    must_match: tuple[str, ...],
    extra_modules: dict[str, torch.nn.Module] | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> tuple[int, Path | None]:
    """--resume: restore the latest checkpoint in place; returns (its step, its folder), or (0, None)."""
    ckpts = list_checkpoints(out) if cfg.resume else []
    if not ckpts:
        return 0, None
    last = ckpts[-1]
    saved = json.loads((last / "training_state.json").read_text()).get("config", {})
    diffs = _resume_mismatch(saved, cfg, n_images, must_match)
    if diffs:
        raise UserError(
            f"{last}: cannot resume with different options ({'; '.join(diffs)}); use the same options or another --out"
        )
    start = int(load_checkpoint(last, unet, ema, optimizer, lr_scheduler, extra_modules, extra_optimizers)["step"])
    if start > cfg.steps:
        raise UserError(f"{last}: the checkpoint is at step {start}, past --steps {cfg.steps}")
    return start, last


def _log_metrics(run: Run, log: RunLog, step: int) -> dict:
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
            "--warmup-steps, then --resume"
        )
    now = time.perf_counter()
    its = (step - log.step_last) / max(now - log.t_last, 1e-9)
    rec = {
        "step": step,
        "epoch": round(step * cfg.batch_size / run.n_images, 4),
        "loss": sum(vals_l) / len(vals_l),
        "loss_last": vals_l[-1],
        "lr": run.lr_scheduler.get_last_lr()[0],
        "it_s": round(its, 4),
        "img_s": round(its * cfg.batch_size, 2),
        "elapsed_s": round(now - log.t0, 2),
    }
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


def _checkpoint(run: Run, log: RunLog, step: int) -> None:
    """Write checkpoint `step` (main process), recorded in `log`; drop those beyond --keep-checkpoints."""
    if run.main:
        scaler = run.accelerator.scaler
        log.last_ckpt = save_checkpoint(
            run.out,
            step,
            run.unet,
            run.ema,
            run.optimizer,
            run.lr_scheduler,
            scaler.state_dict() if scaler is not None else None,
            run.run_config,
            run.extra_modules,
            run.extra_optimizers,
        )
        for old in list_checkpoints(run.out)[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def place_images(data: ImageSet, device: torch.device) -> torch.Tensor:
    """Keep the preloaded images on the training device when they fit easily (no per-step copies)."""
    imgs = data.images.float()
    if device.type == "cuda" and imgs.numel() * 4 > 4 * 2**30:
        return imgs.pin_memory()  # large sets stay in pinned host memory; batches are copied asynchronously
    return imgs.to(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def start_accelerator(cfg: LoopOptions, mixed: str) -> Accelerator:
    """The run's Accelerator (its device, mixed precision and processes), once --out is known to be usable."""
    accelerator = Accelerator(mixed_precision=mixed)
    check_out_dir(Path(cfg.out), allow_existing=cfg.resume or cfg.overwrite)
    return accelerator


def start_run(
    cfg: LoopOptions,
    accelerator: Accelerator,
    mixed: str,
    folder: contextlib.ExitStack,
    *,
    images: torch.Tensor,
    n_images: int,
    scheduler: DDPMScheduler,
    unet: UNet2DModel,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    run_config: dict,
    algorithm: str,
    describe: dict,
    must_match: tuple[str, ...],
    owned: tuple[str, ...],
    extra_modules: dict[str, torch.nn.Module] | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> tuple[Run, list]:
    """What every trainer does once its networks and optimizer exist: restore the latest checkpoint (--resume),
    open the run folder with its config.json (`_config_json`), and prepare the networks with accelerate.

    Returns the Run and the prepared `extra_modules` then `extra_optimizers`, in their order."""
    extra_modules, extra_optimizers = extra_modules or {}, extra_optimizers or {}
    start, resumed_from = resume_run(
        cfg, Path(cfg.out), n_images, unet, ema, optimizer, lr_scheduler, must_match, extra_modules, extra_optimizers
    )
    config_json = _config_json(accelerator, mixed, scheduler, unet, run_config, algorithm, describe, resumed_from)
    out = open_run_folder(cfg, Path(cfg.out), folder, accelerator, start, owned, config_json)
    model, optimizer, *extras = accelerator.prepare(
        unet, optimizer, *extra_modules.values(), *extra_optimizers.values()
    )
    _restore_scaler(accelerator, resumed_from)
    run = Run(
        cfg,
        out,
        accelerator,
        mixed,
        images,
        n_images,
        scheduler,
        unet,
        model,
        ema,
        optimizer,
        lr_scheduler,
        run_config,
        start,
        resumed_from,
        extra_modules,
        extra_optimizers,
    )
    return run, extras


def _config_json(
    accelerator: Accelerator,
    mixed: str,
    scheduler: DDPMScheduler,
    unet: torch.nn.Module,
    run_config: dict,
    algorithm: str,
    describe: dict,
    resumed_from: Path | None,
) -> dict:
    """The run's config.json: the options, `algorithm`, where it resumed from, the device and versions, plus
    `describe` (what the trainer adds)."""
    device = accelerator.device
    return {
        "config": run_config,
        "algorithm": algorithm,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "device": str(device),
        "device_name": device_name(device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": mixed,
        "params": count_params(unet),
        **describe,
        "scheduler": dict(scheduler.config),
        "versions": versions(),
    }


def _restore_scaler(accelerator: Accelerator, resumed_from: Path | None) -> None:
    """fp16: the gradient scaler's state of the checkpoint resumed from (accelerate makes the scaler in `prepare`,
    so it is restored after it, unlike the rest of the checkpoint)."""
    if resumed_from is not None and accelerator.scaler is not None:
        saved_scaler = json.loads((resumed_from / "training_state.json").read_text()).get("grad_scaler")
        if saved_scaler:
            accelerator.scaler.load_state_dict(saved_scaler)

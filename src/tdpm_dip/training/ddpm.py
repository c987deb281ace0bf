"""Algorithm 1 of the report: train the DDPM noise predictor eps_theta.

    repeat: x0 ~ q(x0); t ~ Uniform({1, ..., T_trunc}); eps ~ N(0, I);
            gradient step on || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2

T_trunc = T (the default) is plain DDPM training (Ho et al. 2020, Alg. 1); `t_max` < T trains only the
first t_max noise levels, the report's truncated variant, and `t_min` > 1 drops the lowest ones (a band: a
denoiser's levels). In diffusers' 0-based indexing level t is timestep t - 1, so t is drawn uniformly from
t_min-1..t_max-1.

AdamW with a cosine LR schedule and warm-up, gradient clipping and an EMA of the weights, in the shared
loop of `loop.py` (accelerate, checkpoints, --resume, metrics). Every random draw of step i (which images,
flips, t, eps) comes from generators seeded by (seed, i). `--init` fine-tunes a trained DDPM instead of a
fresh --preset network, and `--t-max` restricts the levels trained (e.g. a denoiser's low levels).

Run folder: config.json, metrics.jsonl, samples/step_XXXXXX.png (EMA, DDIM), checkpoints/step_XXXXXX/
(safetensors + JSON, written atomically) and model/ (a `DDPMPipeline` folder with the EMA weights).
--overwrite of an earlier run builds the new one beside it and swaps it in only when complete.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup

from ..config import get_preset
from ..data import load_images
from ..errors import UserError
from ..images import save_grid
from ..models import build_unet, load_ddpm, save_ddpm, trained_levels, unet_size
from ..noise import image_generators, make_scheduler, num_levels, randn
from ..outputs import staged_dir
from ..sampling import EpsModel, ddim_chain
from .loop import (
    EMA,
    Run,
    batch_indices,
    derive_seed,
    optimizer_step,
    place_images,
    resolve_mixed_precision,
    run_loop,
    start_accelerator,
    start_run,
)
from .options import NUM_TRAIN_TIMESTEPS, TrainConfig

# Options a resumed run must share with its checkpoint: changing them would silently train another model
# (AdamW and the LR schedule restore their own lr, so a new --lr would be ignored, not applied).
RESUME_MUST_MATCH = (
    "preset",
    "init",
    "size",
    "schedule",
    "t_min",
    "t_max",
    "augment",
    "fill",
    "batch_size",
    "lr",
    "warmup_steps",
    "ema_decay",
    "seed",
)
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "checkpoints", "model")  # what a run writes in --out


def sample_timesteps(
    n: int,
    t_max: int | None,
    generator: torch.Generator,
    t_min: int = 1,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Algorithm 1 line 3: t ~ Uniform({1, ..., T_trunc}), returned as diffusers indices 0..T_trunc-1."""
    hi = num_train_timesteps if t_max is None else t_max
    if not 1 <= t_min <= hi <= num_train_timesteps:
        raise UserError(f"need 1 <= t_min <= t_max <= {num_train_timesteps}, got {t_min} and {t_max}")
    return torch.randint(t_min - 1, hi, (n,), generator=generator, device=device)


def step_draws(
    step: int, batch_size: int, size: int, seed: int, t_max: int | None, device: torch.device, t_min: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flip mask [B], timesteps [B], noise eps [B, 3, size, size]) of 0-based step `step`.

    Drawn for the whole global batch on every process, in a fixed order from one generator living on
    the training device (noise is never drawn on one device and moved): each process slices its part.
    """
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "step", step))
    flips = torch.rand(batch_size, generator=g, device=device) < 0.5
    t = sample_timesteps(batch_size, t_max, g, t_min, device=device)
    eps = torch.randn((batch_size, 3, size, size), generator=g, device=device)
    return flips, t, eps


def symmetry_draws(step: int, batch_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical-flip mask [B], transpose mask [B]) of 0-based step `step` for --augment d4; with the
    horizontal flips of `step_draws` they pick one of the 8 symmetries of the square per image. A stream of
    its own, so that --augment flip draws exactly what it always drew."""
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, "symmetry", step))
    flip = torch.rand(batch_size, generator=g, device=device) < 0.5
    return flip, torch.rand(batch_size, generator=g, device=device) < 0.5


def diffusion_loss(
    model: torch.nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Algorithm 1 line 6: mean || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2."""
    x_t = scheduler.add_noise(x0, eps, t)
    pred = model(x_t, t).sample
    # The MSE in fp32: under autocast the prediction may be bf16/fp16, and the loss is a small number.
    return F.mse_loss(pred.float(), eps.float())


@torch.no_grad()
def sample_grid(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    n: int,
    steps: int,
    seed: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """n DDIM samples of `unet` from fixed noise (same seeds at every step, so grids are comparable)."""
    size = int(unet.config.sample_size)
    gens = image_generators([derive_seed(seed, "samples", i) for i in range(n)], device)
    x_T = randn((3, size, size), gens, device)
    return ddim_chain(EpsModel(unet, scheduler, amp_dtype), x_T, steps, gens)


def train(cfg: TrainConfig, progress: bool = True, callback: Callable[[int], None] | None = None) -> Path:
    """Algorithm 1: train eps_theta on `cfg.data`; returns the exported `DDPMPipeline` folder `out/model`.

    `callback(step)` is called after every optimizer step (1-based) on every process.
    """
    cfg.validate()
    with contextlib.ExitStack() as folder:  # holds the staging of an --overwrite run (loop._run_folder)
        run = _setup(cfg, progress, folder)
        run_loop(run, _train_step, _save_samples, progress, callback, "train")
        _export(run)
    run.accelerator.wait_for_everyone()  # the main process has put the run in place
    return Path(cfg.out) / "model"


def _setup(cfg: TrainConfig, progress: bool, folder: contextlib.ExitStack) -> Run:
    """Data, the UNet (fresh or --init), its EMA, AdamW and the LR schedule, then the shared `start_run`."""
    mixed = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = start_accelerator(cfg, mixed)
    device, nproc = accelerator.device, accelerator.num_processes
    data = load_images(
        cfg.data, cfg.size, cfg.fill, cfg.skip_bad, cfg.limit, progress=progress and accelerator.is_main_process
    )
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
    unet = _init_unet(cfg, scheduler) if cfg.init else build_unet(cfg.preset, seed=cfg.seed, sample_size=cfg.size)
    unet = unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    # Stepped by us once per optimizer step; handing it to accelerator.prepare would step it once per
    # process (accelerate's convention), shortening the schedule under `accelerate launch`.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    run, _ = start_run(
        cfg,
        accelerator,
        mixed,
        folder,
        images=place_images(data, device),
        n_images=n,
        scheduler=scheduler,
        unet=unet,
        ema=EMA(unet, cfg.ema_decay),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        # With --init the network is --init's, not a preset's: config.json must not name a preset it never used.
        run_config={**asdict(cfg), "preset": None if cfg.init else cfg.preset, "n_images": n},
        algorithm="Algorithm 1 (DDPM training)",
        describe={"unet": dict(unet.config) if cfg.init else get_preset(cfg.preset).unet_kwargs(cfg.size)},
        must_match=RESUME_MUST_MATCH,
        owned=RUN_FILES,
    )
    return run


def _init_unet(cfg: TrainConfig, scheduler: DDPMScheduler) -> UNet2DModel:
    """--init: the UNet of a trained DDPM (fp32), checked against --schedule and --size (one-line errors)."""
    assert cfg.init is not None  # called with --init only
    unet, init_sched = load_ddpm(cfg.init)
    if not torch.allclose(init_sched.alphas_cumprod, scheduler.alphas_cumprod):
        raise UserError(f"--init {cfg.init}: its noise schedule is not --schedule {cfg.schedule}")
    if unet_size(unet.config) != cfg.size:
        raise UserError(f"--init {cfg.init}: its images are {unet_size(unet.config)} px, not --size {cfg.size}")
    return unet.float()


def _train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step (1-based `step`) of Algorithm 1 and the EMA; returns the loss and the gradient norm,
    left on the device (and no further scalars)."""
    cfg, acc = run.cfg, run.accelerator
    assert isinstance(cfg, TrainConfig)  # the Run that _setup started
    i = step - 1  # 0-based index of this step's random draws
    idx = batch_indices(i, run.n_images, cfg.batch_size, cfg.seed)
    flips, t, eps = step_draws(i, cfg.batch_size, cfg.size, cfg.seed, cfg.t_max, run.device, cfg.t_min)
    local_bs = cfg.batch_size // acc.num_processes
    mine = slice(acc.process_index * local_bs, (acc.process_index + 1) * local_bs)  # this process's share
    x0 = run.images[idx[mine].to(run.images.device)].to(run.device, non_blocking=True)
    x0 = torch.where(flips[mine, None, None, None], x0.flip(-1), x0)  # random horizontal flips
    if cfg.augment == "d4":
        vflips, transposes = symmetry_draws(i, cfg.batch_size, cfg.seed, run.device)
        x0 = torch.where(vflips[mine, None, None, None], x0.flip(-2), x0)
        x0 = torch.where(transposes[mine, None, None, None], x0.transpose(-1, -2), x0)
    with acc.autocast():
        loss = diffusion_loss(run.model, run.scheduler, x0, t[mine], eps[mine])
    grad_norm = optimizer_step(run, loss, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    return loss.detach(), grad_norm, {}


def _save_samples(run: Run, step: int) -> None:
    cfg = run.cfg
    assert isinstance(cfg, TrainConfig)  # the Run that _setup started
    if run.main and cfg.n_samples > 0:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.mixed)
        x = sample_grid(run.ema.model, run.scheduler, cfg.n_samples, cfg.sample_steps, cfg.seed, run.device, amp_dtype)
        save_grid(x, run.out / "samples" / f"step_{step:06d}.png", upscale=max(1, 64 // cfg.size))


def _levels_trained(run: Run) -> tuple[int, int]:
    """The noise levels the exported network has been trained on: this run's band, widened by the --init
    model's."""
    cfg = run.cfg
    assert isinstance(cfg, TrainConfig)
    T = num_levels(run.scheduler)
    lo, hi = cfg.t_min, cfg.t_max or T
    if cfg.init:
        init_lo, init_hi = trained_levels(cfg.init, run.scheduler)  # a hub id or a folder without the file: all
        lo, hi = min(lo, init_lo), max(hi, init_hi)
    return lo, hi


def _export(run: Run) -> Path:
    """The EMA weights as a `DDPMPipeline` folder, out/model (written atomically)."""
    export = run.out / "model"
    if run.main:
        with staged_dir(export) as tmp:
            save_ddpm(run.ema.model, run.scheduler, tmp, _levels_trained(run))
    run.accelerator.wait_for_everyone()
    return export

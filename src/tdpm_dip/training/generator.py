"""Training TDPM's amortized generator G_psi(z) (`tdpm_dip.generator`) for a DDPM's truncated chain.

G_psi learns q(x_T_trunc), the training images noised to T_trunc (Zheng et al., ICLR 2023). Objectives:

gan      Non-saturating GAN loss (Goodfellow et al. 2014) with the R1 penalty (Mescheder et al. 2018),
         gamma/2 E||grad_x D(x)||^2 on real samples, against a compact conv discriminator with a
         minibatch-stddev feature (Karras et al. 2018), which lets it see a batch without variety;
         real samples are training images noised to T_trunc, x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) eps
         (Eq. 3).
distill  Luhman & Luhman (2021): regress G_psi(z) onto x_T = DDIM(z), the deterministic DDIM (eta 0) of
         the DDPM from level T down to T_trunc, on a fixed, seeded set of (z, x_T) pairs computed once
         (RUN/pairs.safetensors). Squared error, as LPIPS would need torchvision.

Training reuses the shared loop (`loop.py`: EMA, atomic safetensors checkpoints with the discriminator
and its optimizer, --resume, metrics, sample grids, the NaN stop). Every draw of step i comes from a
generator seeded by (seed, i), so a resumed run repeats an uninterrupted one exactly on the CPU.
Export: RUN/generator/, the EMA generator as a generator folder (`tdpm_dip.generator`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import STYLE_PRESETS, get_preset
from ..data import load_images
from ..errors import UserError
from ..generator import FORMAT, GENERATOR_JSON, TDPMGenerator, draw_latents, g_forward, load_generator, style_dim
from ..images import save_grid
from ..models import build_generator_network, ddpm_fingerprint, load_ddpm, unet_size
from ..noise import image_generators, num_levels, q_sample
from ..outputs import atomic_path, ordinary_modes, staged_dir, write_json
from ..sampling import EpsModel, ddim_between
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
from .options import GeneratorConfig

RUN_FILES = ("config.json", "metrics.jsonl", "samples", "checkpoints", "generator", "pairs.safetensors")
RESUME_MUST_MATCH = (
    "model",
    "t_trunc",
    "objective",
    "preset",
    "init",
    "batch_size",
    "lr",
    "disc_lr",
    "r1_gamma",
    "r1_every",
    "augment",
    "predict",
    "disc_channels",
    "pairs",
    "ddim_steps",
    "warmup_steps",
    "ema_decay",
    "seed",
)


# ---------------------------------------------------------------- networks


class Discriminator(torch.nn.Module):
    """A compact conv discriminator: a 3x3 stem, stride-2 4x4 convs with LeakyReLU(0.2) that double the width
    (up to 4x the first) while halving the side down to 4 px, then StyleGAN2's epilogue: the minibatch
    standard deviation as one more channel (Karras et al. 2018, groups of up to 4 images), a 3x3 conv and
    a linear logit."""

    def __init__(self, size: int, channels: int = 64) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.LeakyReLU(0.2)]
        c, res = channels, size
        while res > 4:
            c2 = min(2 * c, 4 * channels)
            layers += [torch.nn.Conv2d(c, c2, 4, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
            c, res = c2, res // 2
        self.features = torch.nn.Sequential(*layers)
        self.epilogue = torch.nn.Sequential(
            torch.nn.Conv2d(c + 1, c, 3, padding=1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Flatten(),
            torch.nn.Linear(c * res * res, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.epilogue(minibatch_stddev(self.features(x))).squeeze(1)


def minibatch_stddev(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """h with one more channel: the standard deviation of the features over a group of images, averaged over
    features and pixels (ProGAN / StyleGAN2). Groups are images i, i + B/g, ...; g is the largest size
    <= `group` that divides the batch B, so any batch works."""
    b = h.shape[0]
    g = next(k for k in range(min(group, b), 0, -1) if b % k == 0)
    std = (h.float().view(g, b // g, *h.shape[1:]).var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
    return torch.cat([h, std.repeat(g)[:, None, None, None].expand(b, 1, *h.shape[2:]).to(h.dtype)], 1)


# ---------------------------------------------------------------- distillation pairs


@torch.no_grad()
def make_pairs(
    ddpm: UNet2DModel,
    scheduler: DDPMScheduler,
    n: int,
    t_trunc: int,
    ddim_steps: int,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    w_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """n pairs ((z_j, w_j), DDIM(z_j) at level T_trunc): (z_j, w_j) from a generator seeded by (seed, j)
    (`draw_latents`), the deterministic DDIM of the DDPM from level T (x_T = z_j) down to T_trunc (Luhman &
    Luhman 2021's training set). The teacher ignores w_j: drawn as at sampling, G_psi learns it carries
    nothing."""
    size = unet_size(ddpm.config)
    T = num_levels(scheduler)
    zs, ws, xs = [], [], []
    with tqdm(total=n, desc="DDIM pairs", unit="pair", disable=not progress, leave=False) as bar:
        for lo in range(0, n, batch_size):
            gens = image_generators([derive_seed(seed, "pairs", j) for j in range(lo, min(n, lo + batch_size))], device)
            z, w = draw_latents((3, size, size), w_dim, gens, device)
            x = ddim_between(
                EpsModel(ddpm, scheduler, amp_dtype), z, T, t_trunc, ddim_steps, clip=bool(scheduler.config.clip_sample)
            )
            zs.append(z.cpu())
            xs.append(x.cpu())
            if w is not None:
                ws.append(w.cpu())
            bar.update(z.shape[0])
    return torch.cat(zs), torch.cat(xs), torch.cat(ws) if ws else None


def _pairs_key(cfg: GeneratorConfig, ddpm_fp: str, w_dim: int) -> str:
    key = [ddpm_fp, cfg.t_trunc, cfg.pairs, cfg.ddim_steps, cfg.seed, w_dim]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def _load_or_make_pairs(
    cfg: GeneratorConfig,
    out: Path,
    main: bool,
    ddpm: UNet2DModel,
    scheduler: DDPMScheduler,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool,
    w_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The pair set (z, x, w), read from out/pairs.safetensors when it was made with the same DDPM and options."""
    key = _pairs_key(cfg, ddpm_fingerprint(ddpm, scheduler), w_dim)
    path = out / "pairs.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
            if same:
                t = load_file(path)
                return t["z"], t["x"], t.get("w")
        except (OSError, ValueError, RuntimeError):
            pass  # damaged: made again below
    z, x, w = make_pairs(
        ddpm,
        scheduler,
        cfg.pairs,
        cfg.t_trunc,
        cfg.ddim_steps,
        cfg.seed,
        device,
        amp_dtype=amp_dtype,
        progress=progress and main,
        w_dim=w_dim,
    )
    if main:
        tensors = {"z": z.contiguous(), "x": x.contiguous(), **({"w": w.contiguous()} if w is not None else {})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key})
    return z, x, w


# ---------------------------------------------------------------- the run


@dataclass
class _GenState:
    """What the generator's steps need beyond loop.Run: the frozen DDPM, the discriminator, the pairs."""

    cfg: GeneratorConfig
    ddpm: UNet2DModel
    disc: torch.nn.Module | None = None  # as accelerate prepared it
    disc_optimizer: torch.optim.Optimizer | None = None
    z: torch.Tensor | None = None  # distill: pair inputs (targets are run.images)
    w: torch.Tensor | None = None  # distill: the pairs' style vectors (None: no style input)
    w_dim: int = 0  # G_psi's style width (style_dim)
    last_r1: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # logged between lazy R1 steps


def train_generator(cfg: GeneratorConfig, progress: bool = True, callback: Callable[[int], None] | None = None) -> Path:
    """Train G_psi (module docstring) and export RUN/generator; returns that folder."""
    cfg.validate()
    with contextlib.ExitStack() as folder:
        run, state = _setup(cfg, progress, folder)
        step_fn = functools.partial(_gan_step if cfg.objective == "gan" else _distill_step, state)
        run_loop(
            run,
            step_fn,
            functools.partial(_save_samples, state),
            progress,
            callback,
            f"train-generator ({cfg.objective})",
        )
        _export(run, state)
    run.accelerator.wait_for_everyone()
    return Path(cfg.out) / "generator"


def _setup(cfg: GeneratorConfig, progress: bool, folder: contextlib.ExitStack) -> tuple[Run, _GenState]:
    """The frozen DDPM, G_psi (fresh or --init) with its EMA and Adam, the discriminator (gan) or the pairs
    (distill), then the shared `start_run`."""
    mixed = resolve_mixed_precision(cfg.mixed_precision)
    if mixed == "fp16":
        mixed = "bf16"  # auto on an older GPU: the generator trains in bf16 or fp32 only
    accelerator = start_accelerator(cfg, mixed)
    device, main = accelerator.device, accelerator.is_main_process
    ddpm, scheduler, size = _frozen_ddpm(cfg, device)
    gen = build_generator_network(cfg.preset, seed=cfg.seed, sample_size=size).to(device).train()
    if cfg.init:
        _init_from(gen, cfg, ddpm, scheduler)
    ema = EMA(gen, cfg.ema_decay)
    betas = (0.0, 0.99) if cfg.objective == "gan" else (0.9, 0.999)  # StyleGAN2's Adam for the GAN
    optimizer = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=betas)
    state = _GenState(cfg, ddpm, w_dim=style_dim(gen.config))
    # distill: the pairs are the targets, made once the run folder is open (they are cached there)
    images, extra_modules, extra_optimizers = (
        _gan_data(cfg, size, device, betas, progress and main) if cfg.objective == "gan" else (torch.empty(0), {}, {})
    )
    n = images.shape[0] if cfg.objective == "gan" else cfg.pairs
    if cfg.batch_size > n:
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the training set ({n} "
            + ("images)" if cfg.objective == "gan" else "pairs; raise --pairs)")
        )
    run, prepared = start_run(
        cfg,
        accelerator,
        mixed,
        folder,
        images=images,
        n_images=n,
        scheduler=scheduler,
        unet=gen,
        ema=ema,
        optimizer=optimizer,
        lr_scheduler=get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps),
        run_config={**asdict(cfg), "n_images": n, "image_size": size},
        algorithm=f"TDPM generator G_psi ({cfg.objective})",
        describe={
            "disc_params": sum(p.numel() for p in extra_modules["discriminator"].parameters())
            if extra_modules
            else None,
            "network": _network_kwargs(cfg.preset, size),
        },
        must_match=RESUME_MUST_MATCH,
        owned=RUN_FILES,
        extra_modules=extra_modules,
        extra_optimizers=extra_optimizers,
    )
    if prepared:
        state.disc, state.disc_optimizer = prepared
    if cfg.objective == "distill":
        amp = {"bf16": torch.bfloat16}.get(mixed)
        z, x, w = _load_or_make_pairs(cfg, run.out, main, ddpm, scheduler, device, amp, progress, state.w_dim)
        state.z, state.w = z.to(device), None if w is None else w.to(device)
        run = dataclasses.replace(run, images=x.to(device))
    return run, state


def _gan_data(
    cfg: GeneratorConfig, size: int, device: torch.device, betas: tuple[float, float], progress: bool
) -> tuple[torch.Tensor, dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    """The GAN's real images (placed on the device) and its discriminator with its Adam, seeded apart from G_psi,
    as the networks and optimizers `start_run` checkpoints beside G_psi."""
    assert cfg.data is not None  # GeneratorConfig.validate: the GAN needs --data
    images = place_images(load_images(cfg.data, size, cfg.fill, cfg.skip_bad, cfg.limit, progress=progress), device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        disc = Discriminator(size, cfg.disc_channels).to(device).train()
    optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=betas)
    return images, {"discriminator": disc}, {"disc_optimizer": optimizer}


def _frozen_ddpm(cfg: GeneratorConfig, device: torch.device) -> tuple[UNet2DModel, DDPMScheduler, int]:
    """The DDPM whose chain G_psi feeds, frozen, and its image side; checks --t-trunc and --preset against it."""
    ddpm, scheduler = load_ddpm(cfg.model, device=device)
    ddpm.requires_grad_(False)
    size = unet_size(ddpm.config)
    T = num_levels(scheduler)
    if not 0 <= cfg.t_trunc <= T - 1:
        raise UserError(f"--t-trunc must be in [0, {T - 1}] for this DDPM, got {cfg.t_trunc}")
    if cfg.preset in STYLE_PRESETS:
        if STYLE_PRESETS[cfg.preset].sample_size != size:
            raise UserError(
                f"preset {cfg.preset!r} makes {STYLE_PRESETS[cfg.preset].sample_size} px images, the DDPM {size} px"
            )
        return ddpm, scheduler, size
    factor = 2 ** (len(get_preset(cfg.preset).block_out_channels) - 1)
    if size % factor:
        raise UserError(
            f"the DDPM's {size} px images do not suit preset {cfg.preset!r} (sides must be multiples of {factor})"
        )
    return ddpm, scheduler, size


def _network_kwargs(preset: str, size: int) -> dict:
    """What config.json records of G_psi's network."""
    return STYLE_PRESETS[preset].model_kwargs() if preset in STYLE_PRESETS else get_preset(preset).unet_kwargs(size)


def _init_from(gen: UNet2DModel, cfg: GeneratorConfig, ddpm: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Copy the weights of the generator folder --init into the freshly built G_psi (one-line errors)."""
    try:
        start = load_generator(cfg.init, ddpm, scheduler)  # type: ignore[arg-type]
    except UserError as e:  # its messages name --generator, the option that usually gives the folder
        raise UserError(str(e).replace("--generator", "--init", 1)) from None
    # A GAN's target, the training images noised to T_trunc, does not involve the DDPM, so a GAN generator may
    # start another DDPM's (same size, checked by load_generator); distillation's target is the DDPM's own DDIM.
    other_ddpm = start.info.get("ddpm_fingerprint") not in (None, ddpm_fingerprint(ddpm, scheduler))
    if other_ddpm and (cfg.objective != "gan" or start.info.get("objective") != "gan"):
        raise UserError(
            f"--init {cfg.init}: that generator belongs to another DDPM; only a GAN may start from a GAN generator "
            "of another DDPM"
        )
    try:
        gen.load_state_dict(start.unet.state_dict())
    except RuntimeError:
        raise UserError(f"--init {cfg.init}: its UNet is not preset {cfg.preset!r}") from None


def _draws(
    cfg: GeneratorConfig, step: int, size: int, w_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(flips [B], z [B, 3, S, S], w [B, w_dim] or None, eps [B, 3, S, S]) of 0-based step `step`, from one
    generator seeded by (seed, step)."""
    g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "generator", step))
    flips = torch.rand(cfg.batch_size, generator=g, device=device) < 0.5
    z = torch.randn((cfg.batch_size, 3, size, size), generator=g, device=device)
    w = torch.randn((cfg.batch_size, w_dim), generator=g, device=device) if w_dim else None
    eps = torch.randn((cfg.batch_size, 3, size, size), generator=g, device=device)
    return flips, z, w, eps


def diff_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """DiffAugment's colour, translation and cutout (Zhao et al. 2020), drawn per image from `g`; differentiable,
    so the generator learns through it. Colour: brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5];
    translation: up to 1/8 of the side, zero-filled; cutout: a zeroed square of half the side."""
    b, c, h, w = x.shape
    dev = x.device

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g, device=dev)

    x = x + (u(b, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (2 * u(b, 1, 1, 1)) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (u(b, 1, 1, 1) + 0.5) + mean
    r = max(1, h // 8)
    shift = torch.randint(-r, r + 1, (b, 2), generator=g, device=dev)
    rows = (torch.arange(h, device=dev)[None] + r - shift[:, :1])[:, None, :, None]
    cols = (torch.arange(w, device=dev)[None] + r - shift[:, 1:])[:, None, None, :]
    padded = F.pad(x, (r, r, r, r))
    x = padded[
        torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols
    ]
    side = h // 2
    top = torch.randint(0, h - side + 1, (b, 1, 1), generator=g, device=dev)
    left = torch.randint(0, w - side + 1, (b, 1, 1), generator=g, device=dev)
    ys, xs = torch.arange(h, device=dev)[None, :, None], torch.arange(w, device=dev)[None, None, :]
    inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return x * (~inside)[:, None].to(x.dtype)


def _gan_step(state: _GenState, run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One discriminator step (non-saturating loss, R1 on the real samples every r1_every steps), then one
    generator step; with --augment diffaug the discriminator sees every sample through `diff_augment`."""
    cfg, acc = state.cfg, run.accelerator
    assert state.disc is not None and state.disc_optimizer is not None
    i = step - 1
    idx = batch_indices(i, run.n_images, cfg.batch_size, cfg.seed)
    flips, z, w, eps = _draws(cfg, i, int(run.images.shape[-1]), state.w_dim, run.device)
    x0 = run.images[idx.to(run.images.device)].to(run.device, non_blocking=True)
    x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
    real = q_sample(run.scheduler, x0, cfg.t_trunc, eps)  # a sample of q(x_T_trunc)
    lazy_r1 = step % cfg.r1_every == 0
    real.requires_grad_(lazy_r1)
    aug = _augmenter(cfg, i, run.device)

    # Discriminator: softplus(D(fake)) + softplus(-D(real)) [+ r1_every gamma/2 ||grad_real D||^2].
    state.disc.requires_grad_(True)
    with torch.no_grad(), acc.autocast():
        fake = _fake(run, cfg, z, w, i).float()
    with acc.autocast():
        d_real = state.disc(aug(real)).float()
        d_fake = state.disc(aug(fake)).float()
    loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
    if lazy_r1:
        (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        state.last_r1 = grad.float().pow(2).flatten(1).sum(1).mean()
        acc.backward(loss_d + 0.5 * cfg.r1_gamma * cfg.r1_every * state.last_r1)
    else:
        acc.backward(loss_d)
    state.disc_optimizer.step()
    state.disc_optimizer.zero_grad(set_to_none=True)

    # Generator: softplus(-D(G(z))), the non-saturating loss.
    state.disc.requires_grad_(False)
    with acc.autocast():
        loss_g = F.softplus(-state.disc(aug(_fake(run, cfg, z, w, i))).float()).mean()
    grad_norm = optimizer_step(run, loss_g)
    return loss_g.detach(), grad_norm, {"loss_d": loss_d.detach(), "r1": state.last_r1.detach()}


def _fake(run: Run, cfg: GeneratorConfig, z: torch.Tensor, w: torch.Tensor | None, step: int) -> torch.Tensor:
    """A generated sample of q(x_T_trunc): G(z), or (--predict x0) G(z) noised to T_trunc with noise of a stream
    of its own (the same draws for the discriminator's and the generator's half of the step)."""
    out = g_forward(run.model, z, w)
    if cfg.predict == "x_T":
        return out
    g = torch.Generator(device=run.device).manual_seed(derive_seed(cfg.seed, "fake-noise", step))
    return q_sample(run.scheduler, out, cfg.t_trunc, torch.randn(out.shape, generator=g, device=run.device))


def _augmenter(cfg: GeneratorConfig, step: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The discriminator's view of a batch at 0-based `step`: DiffAugment with draws of a stream of its own
    (--augment diffaug), or the batch itself."""
    if cfg.augment == "none":
        return lambda x: x
    g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "augment", step))
    return lambda x: diff_augment(x, g)


def _distill_step(state: _GenState, run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One regression step: mean ||G_psi(z_j) - DDIM(z_j)||^2 over a batch of the fixed pairs."""
    cfg, acc = state.cfg, run.accelerator
    assert state.z is not None
    idx = batch_indices(step - 1, run.n_images, cfg.batch_size, cfg.seed).to(run.device)
    with acc.autocast():
        pred = g_forward(run.model, state.z[idx], None if state.w is None else state.w[idx])
    loss = F.mse_loss(pred.float(), run.images[idx].float())
    return loss.detach(), optimizer_step(run, loss), {}


def _save_samples(state: _GenState, run: Run, step: int) -> None:
    """A grid of amortized TDPM samples of the EMA generator, from the same seeds at every step."""
    cfg = state.cfg
    if run.main and cfg.n_samples > 0:
        size = unet_size(state.ddpm.config)
        info = {"predict": cfg.predict, "reverse_steps": cfg.reverse_steps}  # None: T_trunc
        ema = TDPMGenerator(run.ema.model, cfg.t_trunc, (3, size, size), info, "EMA")
        ddpm = EpsModel(state.ddpm, run.scheduler, {"bf16": torch.bfloat16}.get(run.mixed))
        gens = image_generators([derive_seed(cfg.seed, "samples", i) for i in range(cfg.n_samples)], run.device)
        x = ema.sample(ddpm, gens)
        size = int(x.shape[-1])
        save_grid(x, run.out / "samples" / f"step_{step:06d}.png", upscale=max(1, 64 // size))


def _export(run: Run, state: _GenState) -> Path:
    """RUN/generator: the EMA generator (diffusers UNet2DModel, safetensors) and generator.json, atomically."""
    export = run.out / "generator"
    cfg = state.cfg
    size = unet_size(state.ddpm.config)
    if run.main:
        with staged_dir(export) as tmp:
            model = run.ema.model
            assert isinstance(model, ModelMixin)  # G_psi: a UNet2DModel or a StyleGenerator
            model.save_pretrained(tmp, safe_serialization=True)
            ordinary_modes(tmp)
            write_json(
                tmp / GENERATOR_JSON,
                {
                    "format": FORMAT,
                    "t_trunc": cfg.t_trunc,
                    "reverse_steps": cfg.reverse_steps or cfg.t_trunc,
                    "z_shape": [3, size, size],
                    "w_dim": state.w_dim,
                    "objective": cfg.objective,
                    "ddpm": Path(cfg.model).name or str(cfg.model),
                    "ddpm_fingerprint": ddpm_fingerprint(state.ddpm, run.scheduler),
                    "image_size": size,
                    "schedule": run.scheduler.config.beta_schedule,
                    "preset": cfg.preset,
                    "steps": cfg.steps,
                    "batch_size": cfg.batch_size,
                    "seed": cfg.seed,
                    "data": cfg.data if cfg.objective == "gan" else None,
                    "init": cfg.init,
                    "predict": cfg.predict,
                    "pairs": cfg.pairs if cfg.objective == "distill" else None,
                    "ddim_steps": cfg.ddim_steps if cfg.objective == "distill" else None,
                },
            )
    run.accelerator.wait_for_everyone()
    return export

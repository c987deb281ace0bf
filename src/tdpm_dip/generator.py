"""TDPM's amortized generator G_psi for the truncated chain (Zheng et al., ICLR 2023).

A truncated diffusion model starts its reverse chain at level T_trunc from a sample of q(x_T_trunc),
the training images noised to T_trunc. TDPM draws that sample from an implicit generator
x_T = G_psi(z), z ~ N(0, I), so a new image costs 1 + T_trunc network calls. G_psi here is a small
`UNet2DModel` (preset `generator-small`) called at timestep 0 on z = (z_img, w): z_img of the image's shape,
and a style vector w ~ N(0, I) that the preset's class embedding feeds to every ResNet block (config.py).
Both come from the image's seed, z_img first. Objectives:

gan      Non-saturating GAN loss (Goodfellow et al. 2014) with the R1 penalty (Mescheder et al. 2018),
         gamma/2 E||grad_x D(x)||^2 on real samples, against a compact conv discriminator with a
         minibatch-stddev feature (Karras et al. 2018), which lets it see a batch without variety;
         real samples are training images noised to T_trunc, x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) eps
         (Eq. 3).
distill  Luhman & Luhman (2021): regress G_psi(z) onto x_T = DDIM(z), the deterministic DDIM (eta 0) of
         the DDPM from level T down to T_trunc, on a fixed, seeded set of (z, x_T) pairs computed once
         (RUN/pairs.safetensors). Squared error, as LPIPS would need torchvision.

Training reuses train.py's loop (`run_loop`: EMA, atomic safetensors checkpoints with the discriminator
and its optimizer, --resume, metrics, sample grids, the NaN stop). Every draw of step i comes from a
generator seeded by (seed, i), so a resumed run repeats an uninterrupted one exactly on the CPU.

Export: RUN/generator/, the EMA generator's `UNet2DModel` (save_pretrained, safetensors, so diffusers
loads it), plus generator.json {t_trunc, z_shape, w_dim, objective, ddpm, image_size, ...}.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from .config import PRESETS, get_preset
from .errors import UserError
from .models import ddpm_fingerprint, unet_size
from .noise import image_generators, num_levels, q_sample, randn

GENERATOR_JSON = "generator.json"
FORMAT = "tdpm-dip generator"
OBJECTIVES = ("gan", "distill")
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "checkpoints", "generator", "pairs.safetensors")
RESUME_MUST_MATCH = ("model", "t_trunc", "objective", "preset", "init", "batch_size", "lr", "disc_lr", "r1_gamma",
                     "disc_channels", "pairs", "ddim_steps", "warmup_steps", "ema_decay", "seed")


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict:
    return {"help": text, **({"choices": choices} if choices else {})}


@dataclass
class GeneratorConfig:
    """Every option of `tdpm-dip train-generator` (its command-line options are built from these fields)."""

    model: str = field(metadata=_help("the DDPM whose truncated chain G_psi feeds: a diffusers folder or hub id"))
    t_trunc: int = field(metadata=_help("truncation level T_trunc: G_psi(z) learns q(x_T_trunc)"))
    out: str = field(metadata=_help("run folder: config.json, metrics.jsonl, samples/, checkpoints/, generator/"))
    data: str | None = field(default=None, metadata=_help(
        "training images (folder, file or hub id), resized to the DDPM's size; needed by --objective gan"))
    objective: str = field(default="gan", metadata=_help(
        "gan: non-saturating GAN + R1 against noised training images; distill: regress DDIM(z -> x_T_trunc) "
        "pairs of the DDPM (Luhman & Luhman 2021)", OBJECTIVES))
    preset: str = field(default="generator-small", metadata=_help(f"G_psi's UNet preset: {', '.join(PRESETS)}"))
    init: str | None = field(default=None, metadata=_help(
        "start G_psi from this generator's weights (a RUN/generator folder of the same preset and DDPM), e.g. to "
        "fine-tune one to another --t-trunc; the discriminator starts afresh"))
    fill: str = field(default="white", metadata=_help("padding / transparency colour: white, black, #rrggbb"))
    skip_bad: bool = field(default=False, metadata=_help("skip unreadable images instead of stopping"))
    limit: int | None = field(default=None, metadata=_help("use only the first N images"))
    steps: int = field(default=2000, metadata=_help("total generator optimizer steps"))
    batch_size: int = field(default=32, metadata=_help("batch size"))
    lr: float = field(default=2e-4, metadata=_help("Adam learning rate of G_psi"))
    disc_lr: float = field(default=2e-4, metadata=_help("gan: Adam learning rate of the discriminator"))
    r1_gamma: float = field(default=0.1, metadata=_help("gan: weight gamma of the R1 penalty gamma/2 ||grad D(real)||^2"))
    disc_channels: int = field(default=64, metadata=_help("gan: width of the discriminator's first layer"))
    pairs: int = field(default=512, metadata=_help("distill: number of (z, DDIM(z)) pairs, computed once"))
    ddim_steps: int = field(default=50, metadata=_help("distill: DDIM steps from level T down to T_trunc"))
    warmup_steps: int = field(default=0, metadata=_help("linear LR warm-up steps (then constant)"))
    ema_decay: float = field(default=0.999, metadata=_help("EMA decay of the sampled / exported generator"))
    mixed_precision: str = field(default="auto", metadata=_help(
        "auto (bf16 on recent GPUs, no on CPU), no or bf16 (fp16 is not supported: the R1 penalty's "
        "double backward and a loss scaler do not mix)"))
    seed: int = field(default=0, metadata=_help("seed of the weights, data order, flips, z, noise and pairs"))
    log_every: int = field(default=10, metadata=_help("steps between metrics.jsonl lines (and NaN checks)"))
    checkpoint_every: int = field(default=500, metadata=_help("steps between checkpoints (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("keep this many most recent checkpoints"))
    sample_every: int = field(default=500, metadata=_help("steps between sample grids (0: only at the end)"))
    n_samples: int = field(default=16, metadata=_help("images per sample grid: G_psi(z) then T_trunc steps (0: none)"))
    resume: bool = field(default=False, metadata=_help("continue from the latest checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=_help(
        "write into a non-empty --out, replacing its previous run"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every number and name up front (one-line UserError); the DDPM-dependent checks run at set-up."""
        from .train import _positive

        if not str(self.model).strip():
            raise UserError("--model is required (the DDPM)")
        if not str(self.out).strip():
            raise UserError("--out is required (the run folder)")
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "gan" and not (self.data and str(self.data).strip()):
            raise UserError("--objective gan needs --data (the training images noised to T_trunc are its real samples)")
        get_preset(self.preset)
        if not isinstance(self.t_trunc, int) or self.t_trunc < 0:
            raise UserError(f"--t-trunc must be an integer >= 0, got {self.t_trunc}")
        for name in ("steps", "batch_size", "pairs", "ddim_steps", "disc_channels", "log_every", "keep_checkpoints"):
            _positive("--" + name.replace("_", "-"), getattr(self, name))
        if self.limit is not None:
            _positive("--limit", self.limit)
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
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        for name in ("checkpoint_every", "sample_every", "n_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite exclude each other")


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
        self.epilogue = torch.nn.Sequential(torch.nn.Conv2d(c + 1, c, 3, padding=1), torch.nn.LeakyReLU(0.2),
                                            torch.nn.Flatten(), torch.nn.Linear(c * res * res, 1))

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


def style_dim(config: Mapping) -> int:
    """Width of G_psi's style vector w: the time-embedding width when the UNet takes class_labels through an
    identity class embedding (preset generator-small), else 0 (a generator of z_img alone)."""
    if config.get("class_embed_type") != "identity":
        return 0
    return int(config.get("time_embedding_dim") or 4 * config["block_out_channels"][0])


def draw_latents(z_shape: tuple[int, ...], w_dim: int, generators: list[torch.Generator],
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z_img [B, *z_shape], w [B, w_dim] or None): row i from generators[i], z_img first, then w."""
    z = randn(tuple(z_shape), generators, device)
    w = randn((w_dim,), generators, device) if w_dim else None
    return z, w


def g_forward(net: torch.nn.Module, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """x_T = G_psi(z, w): the generator UNet at timestep 0 (its time embedding is a constant, to which the
    identity class embedding adds w)."""
    return net(z, 0, class_labels=w).sample


@dataclass(frozen=True)
class Generator:
    """A trained G_psi and what it was trained for (read from generator.json by `load_generator`)."""

    unet: UNet2DModel
    t_trunc: int
    z_shape: tuple[int, int, int]
    info: dict
    path: str

    @property
    def w_dim(self) -> int:
        return style_dim(self.unet.config)

    def draw(self, generators: list[torch.Generator], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This generator's (z_img, w) of each image (`draw_latents`)."""
        return draw_latents(self.z_shape, self.w_dim, generators, device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return g_forward(self.unet, z.to(self.unet.dtype), None if w is None else w.to(self.unet.dtype)).float()


def read_generator_info(path: str | os.PathLike) -> dict:
    """generator.json of a generator folder (one-line UserError when it is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--generator {p}: no such folder")
    meta_path = p / GENERATOR_JSON
    if not meta_path.is_file():
        hint = " (it looks like a DDPM folder; pass it as --model)" if (p / "unet" / "config.json").is_file() else ""
        raise UserError(f"--generator {p}: not a generator folder: no {GENERATOR_JSON}{hint}; "
                        "make one with `tdpm-dip train-generator`")
    try:
        info = json.loads(meta_path.read_text())
        info["t_trunc"], info["image_size"] = int(info["t_trunc"]), int(info["image_size"])
        info["z_shape"] = [int(v) for v in info["z_shape"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--generator {p}: unreadable {GENERATOR_JSON} ({type(e).__name__}: {e})") from None
    if len(info["z_shape"]) != 3:
        raise UserError(f"--generator {p}: z_shape must be [channels, height, width], got {info['z_shape']}")
    return info


def generator_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a generator folder's files (weights, UNet config and generator.json): keys bench rows."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_generator(path: str | os.PathLike, ddpm: UNet2DModel | None = None, scheduler: DDPMScheduler | None = None,
                   device: torch.device | str = "cpu") -> Generator:
    """Load RUN/generator (or any folder with generator.json and a UNet2DModel); with the DDPM given, check
    that its image size and T_trunc fit that DDPM. Every problem is a one-line UserError."""
    p = Path(path)
    info = read_generator_info(p)
    t_trunc, z_shape, image_size = info["t_trunc"], tuple(info["z_shape"]), info["image_size"]
    if ddpm is not None and image_size != unet_size(ddpm.config):
        raise UserError(f"--generator {p} makes {image_size} px images, but the DDPM makes {unet_size(ddpm.config)} px: "
                        "train a generator for this DDPM")
    if scheduler is not None and not 0 <= t_trunc < num_levels(scheduler):
        raise UserError(f"--generator {p}: its T_trunc {t_trunc} is outside the DDPM's levels 0..{num_levels(scheduler) - 1}")
    try:
        unet = UNet2DModel.from_pretrained(p, torch_dtype=torch.float32, use_safetensors=True)  # fp16 on disk: upcast
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise UserError(f"--generator {p}: cannot load the generator's UNet ({str(e).splitlines()[0]})") from None
    if info.get("w_dim", style_dim(unet.config)) != style_dim(unet.config):
        raise UserError(f"--generator {p}: {GENERATOR_JSON} says w_dim {info['w_dim']}, but its UNet takes "
                        f"{style_dim(unet.config)}")
    return Generator(unet.to(device).eval().requires_grad_(False), t_trunc, z_shape, info, str(p))  # type: ignore[arg-type]


# ---------------------------------------------------------------- distillation pairs

@torch.no_grad()
def make_pairs(ddpm: UNet2DModel, scheduler: DDPMScheduler, n: int, t_trunc: int, ddim_steps: int, seed: int,
               device: torch.device, batch_size: int = 64, amp_dtype: torch.dtype | None = None,
               progress: bool = False, w_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """n pairs ((z_j, w_j), DDIM(z_j) at level T_trunc): (z_j, w_j) from a generator seeded by (seed, j)
    (`draw_latents`), the deterministic DDIM of the DDPM from level T (x_T = z_j) down to T_trunc (Luhman &
    Luhman 2021's training set). The teacher ignores w_j: drawn as at sampling, G_psi learns it carries
    nothing."""
    from tqdm.auto import tqdm

    from .sampling import ddim_between
    from .train import derive_seed

    size = unet_size(ddpm.config)
    T = num_levels(scheduler)
    zs, ws, xs = [], [], []
    with tqdm(total=n, desc="DDIM pairs", unit="pair", disable=not progress, leave=False) as bar:
        for lo in range(0, n, batch_size):
            gens = image_generators([derive_seed(seed, "pairs", j) for j in range(lo, min(n, lo + batch_size))], device)
            z, w = draw_latents((3, size, size), w_dim, gens, device)
            x = ddim_between(ddpm, scheduler, z, T, t_trunc, ddim_steps, amp_dtype,
                             clip=bool(scheduler.config.clip_sample))
            zs.append(z.cpu())
            xs.append(x.cpu())
            if w is not None:
                ws.append(w.cpu())
            bar.update(z.shape[0])
    return torch.cat(zs), torch.cat(xs), torch.cat(ws) if ws else None


def _pairs_key(cfg: GeneratorConfig, ddpm_fp: str, w_dim: int) -> str:
    import hashlib

    key = [ddpm_fp, cfg.t_trunc, cfg.pairs, cfg.ddim_steps, cfg.seed, w_dim]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def _load_or_make_pairs(cfg: GeneratorConfig, out: Path, main: bool, ddpm: UNet2DModel, scheduler: DDPMScheduler,
                        device: torch.device, amp_dtype: torch.dtype | None, progress: bool, w_dim: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The pair set (z, x, w), read from out/pairs.safetensors when it was made with the same DDPM and options."""
    from safetensors.torch import load_file, save_file

    from .outputs import atomic_path

    key = _pairs_key(cfg, ddpm_fingerprint(ddpm, scheduler), w_dim)
    path = out / "pairs.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                same = (f.metadata() or {}).get("key") == key
            if same:
                t = load_file(path)
                return t["z"], t["x"], t.get("w")
        except (OSError, ValueError, RuntimeError):
            pass  # damaged: made again below
    z, x, w = make_pairs(ddpm, scheduler, cfg.pairs, cfg.t_trunc, cfg.ddim_steps, cfg.seed, device,
                         amp_dtype=amp_dtype, progress=progress and main, w_dim=w_dim)
    if main:
        tensors = {"z": z.contiguous(), "x": x.contiguous(), **({"w": w.contiguous()} if w is not None else {})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key})
    return z, x, w


# ---------------------------------------------------------------- the run

@dataclass
class _GenState:
    """What the generator's steps need beyond train._Run: the frozen DDPM, the discriminator, the pairs."""

    cfg: GeneratorConfig
    ddpm: UNet2DModel
    disc: torch.nn.Module | None = None          # as accelerate prepared it
    disc_optimizer: torch.optim.Optimizer | None = None
    z: torch.Tensor | None = None                # distill: pair inputs (targets are run.images)
    w: torch.Tensor | None = None                # distill: the pairs' style vectors (None: no style input)
    w_dim: int = 0                               # G_psi's style width (style_dim)


def train_generator(cfg: GeneratorConfig, progress: bool = True, callback: Callable[[int], None] | None = None) -> Path:
    """Train G_psi (module docstring) and export RUN/generator; returns that folder."""
    from .train import run_loop

    cfg.validate()
    with contextlib.ExitStack() as folder:
        run, state = _setup(cfg, progress, folder)
        step_fn = functools.partial(_gan_step if cfg.objective == "gan" else _distill_step, state)
        run_loop(run, step_fn, functools.partial(_save_samples, state), progress, callback,
                 f"train-generator ({cfg.objective})")
        _export(run, state)
    run.accelerator.wait_for_everyone()
    return Path(cfg.out) / "generator"


def _setup(cfg: GeneratorConfig, progress: bool, folder: contextlib.ExitStack):  # noqa: ANN202 - (_Run, _GenState)
    from accelerate import Accelerator
    from diffusers.optimization import get_constant_schedule_with_warmup

    from .data import load_images
    from .models import build_unet, count_params, load_ddpm
    from .train import (EMA, _check_out_dir, _device_name, _place, _Run, _versions, open_run_folder,
                        resolve_mixed_precision, resume_run)

    out = Path(cfg.out)
    mixed = resolve_mixed_precision(cfg.mixed_precision)
    if mixed == "fp16":
        mixed = "bf16"  # auto on an older GPU: the generator trains in bf16 or fp32 only
    accelerator = Accelerator(mixed_precision=mixed)
    device, main = accelerator.device, accelerator.is_main_process
    _check_out_dir(out, allow_existing=cfg.resume or cfg.overwrite)

    ddpm, scheduler = load_ddpm(cfg.model, device=device)
    ddpm.requires_grad_(False)
    size = unet_size(ddpm.config)
    T = num_levels(scheduler)
    if not 0 <= cfg.t_trunc <= T - 1:
        raise UserError(f"--t-trunc must be in [0, {T - 1}] for this DDPM, got {cfg.t_trunc}")
    factor = 2 ** (len(get_preset(cfg.preset).block_out_channels) - 1)
    if size % factor:
        raise UserError(f"the DDPM's {size} px images do not suit preset {cfg.preset!r} (sides must be multiples of {factor})")

    gen = build_unet(cfg.preset, seed=cfg.seed, sample_size=size).to(device).train()
    if cfg.init:
        _init_from(gen, cfg, ddpm, scheduler)
    ema = EMA(gen, cfg.ema_decay)
    betas = (0.0, 0.99) if cfg.objective == "gan" else (0.9, 0.999)  # StyleGAN2's Adam for the GAN
    optimizer = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=betas)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    state = _GenState(cfg, ddpm, w_dim=style_dim(gen.config))
    extra_modules: dict[str, torch.nn.Module] = {}
    extra_optimizers: dict[str, torch.optim.Optimizer] = {}
    if cfg.objective == "gan":
        data = load_images(cfg.data, size, cfg.fill, cfg.skip_bad, cfg.limit, progress=progress and main)
        images = _place(data, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            disc = Discriminator(size, cfg.disc_channels).to(device).train()
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=betas)
        extra_modules, extra_optimizers = {"discriminator": disc}, {"disc_optimizer": disc_opt}
    n = len(data) if cfg.objective == "gan" else cfg.pairs
    if cfg.batch_size > n:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} "
                        + ("images)" if cfg.objective == "gan" else "pairs; raise --pairs)"))

    run_config = {**asdict(cfg), "n_images": n, "image_size": size}
    start, resumed_from = resume_run(cfg, out, n, gen, ema, optimizer, lr_scheduler, RESUME_MUST_MATCH,
                                     extra_modules, extra_optimizers)
    out = open_run_folder(cfg, out, folder, accelerator, start, RUN_FILES, {
        "config": run_config, "algorithm": f"TDPM generator G_psi ({cfg.objective})",
        "resumed_from": str(resumed_from) if resumed_from else None, "device": str(device),
        "device_name": _device_name(device), "mixed_precision": mixed, "params": count_params(gen),
        "disc_params": count_params(extra_modules["discriminator"]) if extra_modules else None,
        "unet": get_preset(cfg.preset).unet_kwargs(size), "scheduler": dict(scheduler.config), "versions": _versions(),
    })
    if cfg.objective == "distill":
        amp = {"bf16": torch.bfloat16}.get(mixed)
        z, x, w = _load_or_make_pairs(cfg, out, main, ddpm, scheduler, device, amp, progress, state.w_dim)
        state.z, images = z.to(device), x.to(device)
        state.w = None if w is None else w.to(device)
    if extra_modules:
        model, optimizer, state.disc, state.disc_optimizer = accelerator.prepare(
            gen, optimizer, extra_modules["discriminator"], extra_optimizers["disc_optimizer"])
    else:
        model, optimizer = accelerator.prepare(gen, optimizer)
    run = _Run(cfg, out, accelerator, mixed, images, n, scheduler, gen, model, ema, optimizer, lr_scheduler,  # type: ignore[arg-type]
               run_config, start, resumed_from, extra_modules, extra_optimizers)
    return run, state


def _init_from(gen: UNet2DModel, cfg: GeneratorConfig, ddpm: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Copy the weights of the generator folder --init into the freshly built G_psi (one-line errors)."""
    start = load_generator(cfg.init, ddpm, scheduler)  # type: ignore[arg-type]
    if start.info.get("ddpm_fingerprint") not in (None, ddpm_fingerprint(ddpm, scheduler)):
        raise UserError(f"--init {cfg.init}: that generator was trained for another DDPM")
    try:
        gen.load_state_dict(start.unet.state_dict())
    except RuntimeError:
        raise UserError(f"--init {cfg.init}: its UNet is not preset {cfg.preset!r}") from None


def _draws(cfg: GeneratorConfig, step: int, size: int, w_dim: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(flips [B], z [B, 3, S, S], w [B, w_dim] or None, eps [B, 3, S, S]) of 0-based step `step`, from one
    generator seeded by (seed, step)."""
    from .train import derive_seed

    g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "generator", step))
    flips = torch.rand(cfg.batch_size, generator=g, device=device) < 0.5
    z = torch.randn((cfg.batch_size, 3, size, size), generator=g, device=device)
    w = torch.randn((cfg.batch_size, w_dim), generator=g, device=device) if w_dim else None
    eps = torch.randn((cfg.batch_size, 3, size, size), generator=g, device=device)
    return flips, z, w, eps


def _gan_step(state: _GenState, run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    """One discriminator step (non-saturating loss + R1 on the real samples), then one generator step."""
    from .train import batch_indices

    cfg, acc = state.cfg, run.accelerator
    assert state.disc is not None and state.disc_optimizer is not None
    i = step - 1
    idx = batch_indices(i, run.n_images, cfg.batch_size, cfg.seed)
    size = int(run.images.shape[-1])
    flips, z, w, eps = _draws(cfg, i, size, state.w_dim, run.device)
    x0 = run.images[idx.to(run.images.device)].to(run.device, non_blocking=True)
    x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
    real = q_sample(run.scheduler, x0, cfg.t_trunc, eps).requires_grad_(True)  # a sample of q(x_T_trunc)

    # Discriminator: softplus(D(fake)) + softplus(-D(real)) + gamma/2 ||grad_real D||^2.
    state.disc.requires_grad_(True)
    with torch.no_grad(), acc.autocast():
        fake = g_forward(run.model, z, w).float()
    with acc.autocast():
        d_real = state.disc(real).float()
        d_fake = state.disc(fake).float()
    loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
    (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    r1 = grad.float().pow(2).flatten(1).sum(1).mean()
    acc.backward(loss_d + 0.5 * cfg.r1_gamma * r1)
    state.disc_optimizer.step()
    state.disc_optimizer.zero_grad(set_to_none=True)

    # Generator: softplus(-D(G(z))), the non-saturating loss.
    state.disc.requires_grad_(False)
    with acc.autocast():
        loss_g = F.softplus(-state.disc(g_forward(run.model, z, w)).float()).mean()
    acc.backward(loss_g)
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), math.inf).detach()
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet)
    return loss_g.detach(), grad_norm, {"loss_d": loss_d.detach(), "r1": r1.detach()}


def _distill_step(state: _GenState, run, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # noqa: ANN001
    """One regression step: mean ||G_psi(z_j) - DDIM(z_j)||^2 over a batch of the fixed pairs."""
    from .train import batch_indices

    cfg, acc = state.cfg, run.accelerator
    assert state.z is not None
    idx = batch_indices(step - 1, run.n_images, cfg.batch_size, cfg.seed).to(run.device)
    with acc.autocast():
        pred = g_forward(run.model, state.z[idx], None if state.w is None else state.w[idx])
    loss = F.mse_loss(pred.float(), run.images[idx].float())
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), math.inf).detach()
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet)
    return loss.detach(), grad_norm, {}


@torch.no_grad()
def sample_tdpm(gen: torch.nn.Module, ddpm: UNet2DModel, scheduler: DDPMScheduler, t_trunc: int, seeds: list[int],
                device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Amortized TDPM: x_T = G_psi(z), z from seed i, then T_trunc posterior steps (`sampling.reverse_chain`)."""
    from .sampling import reverse_chain

    size = unet_size(ddpm.config)
    gens = image_generators(seeds, device)
    z, w = draw_latents((3, size, size), style_dim(gen.config), gens, device)
    x_T = g_forward(gen, z, w).float()
    return reverse_chain(ddpm, scheduler, x_T, t_trunc, gens, amp_dtype).clamp(-1, 1)


def _save_samples(state: _GenState, run, step: int) -> None:  # noqa: ANN001
    from .outputs import save_grid
    from .train import derive_seed

    cfg = state.cfg
    if run.main and cfg.n_samples > 0:
        amp = {"bf16": torch.bfloat16}.get(run.mixed)
        seeds = [derive_seed(cfg.seed, "samples", i) for i in range(cfg.n_samples)]
        x = sample_tdpm(run.ema.model, state.ddpm, run.scheduler, cfg.t_trunc, seeds, run.device, amp)
        size = int(x.shape[-1])
        save_grid(x, run.out / "samples" / f"step_{step:06d}.png", upscale=max(1, 64 // size))


def _export(run, state: _GenState) -> Path:  # noqa: ANN001
    """RUN/generator: the EMA generator (diffusers UNet2DModel, safetensors) and generator.json, atomically."""
    from .outputs import staged_dir, write_json

    export = run.out / "generator"
    cfg = state.cfg
    size = unet_size(state.ddpm.config)
    if run.main:
        with staged_dir(export) as tmp:
            run.ema.model.save_pretrained(tmp, safe_serialization=True)
            write_json(tmp / GENERATOR_JSON, {
                "format": FORMAT, "t_trunc": cfg.t_trunc, "z_shape": [3, size, size], "w_dim": state.w_dim,
                "objective": cfg.objective,
                "ddpm": Path(cfg.model).name or str(cfg.model),
                "ddpm_fingerprint": ddpm_fingerprint(state.ddpm, run.scheduler), "image_size": size,
                "schedule": run.scheduler.config.beta_schedule, "preset": cfg.preset, "steps": cfg.steps,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "data": cfg.data if cfg.objective == "gan" else None,
                "init": cfg.init,
                "pairs": cfg.pairs if cfg.objective == "distill" else None,
                "ddim_steps": cfg.ddim_steps if cfg.objective == "distill" else None,
            })
    run.accelerator.wait_for_everyone()
    return export

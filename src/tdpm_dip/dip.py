"""Algorithm 2: fit a Deep Image Prior G_psi (a `UNet2DModel` called at timestep 0) to a target.

`fit_dip` fits B images at once, each with its own weights: the B networks are stacked
(`torch.func.stack_module_state`) and evaluated with `vmap(functional_call)`; one Adam over the stacked
tensors equals B independent Adams because Adam is element-wise, and the loss is the *sum* of the
per-image mean squared errors, so each network receives exactly its own gradient. `batched=False`
is the report's loop (a fresh network and optimiser per image, batch 1) and gives the same result.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from . import defaults
from .config import get_preset
from .devices import autocast, timer
from .errors import UserError
from .metrics import mse_per_image, psnr, ssim
from .models import build_unet
from .noise import image_generators, randn

# An observation operator inside the DIP's loss: (outputs of images lo..hi, lo, hi) -> their observations.
Measure = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DIPConfig:
    """Hyperparameters of Algorithm 2 (defaults: the report's, Adam lr 1e-4, 100 iterations)."""

    preset: str = "paper-dip"
    iters: int = defaults.DIP["paper"]["iters"]
    lr: float = defaults.DIP["paper"]["lr"]
    # Blind denoising tricks from Ulyanov et al.: perturb the input each step and return an
    # exponential average of the outputs instead of the last one. Off in the paper protocol.
    input_noise: float = 0.0
    average: float | None = None
    ssim_every: int = 10

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise UserError(f"DIP iterations must be >= 0, got {self.iters}")
        if not self.lr > 0:
            raise UserError(f"DIP learning rate must be > 0, got {self.lr}")
        if self.average is not None and not 0 <= self.average < 1:
            raise UserError(f"DIP output averaging must be in [0, 1), got {self.average}")
        get_preset(self.preset)


def dip_defaults(use: str, preset: str, iters: int | None = None, lr: float | None = None) -> DIPConfig:
    """The DIP settings of `use` (paper | blind | plugin, defaults.DIP) for `preset`; `iters` / `lr` override them."""
    if use not in defaults.DIP:
        raise ValueError(f"unknown DIP use {use!r}")
    settings = defaults.DIP[use] | defaults.DIP_PRESET_OVERRIDES.get((use, preset), {})
    if iters is not None:
        settings["iters"] = iters
    if lr is not None:
        settings["lr"] = lr
    return DIPConfig(preset=preset, **settings)


@dataclass
class DIPResult:
    """Network outputs and per-iteration curves. `loss[i]`, `psnr[i]` are taken before update i."""

    output: torch.Tensor  # [B, 3, H, W]: G_psi^{(i_max)}(z), or the averaged output
    loss: torch.Tensor  # [iters, B]
    psnr: torch.Tensor | None = None  # [iters, B] against the reference, if one was given
    ssim: torch.Tensor | None = None  # [len(ssim_iters), B]
    ssim_iters: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def concat(cls, parts: list[DIPResult], seconds: float | None = None) -> DIPResult:
        """One result for consecutive groups of images: curves ([iters, B]) are joined along the image axis;
        `seconds` defaults to the sum of the parts' fit times."""

        def cat(name: str) -> torch.Tensor | None:
            xs = [getattr(p, name) for p in parts]
            return None if xs[0] is None else torch.cat(xs, dim=1)

        total = sum(p.seconds for p in parts) if seconds is None else seconds
        return cls(
            torch.cat([p.output for p in parts]),
            torch.cat([p.loss for p in parts], dim=1),
            cat("psnr"),
            cat("ssim"),
            list(parts[0].ssim_iters),
            total,
        )

    def mean_curves(self) -> dict[str, list[float]]:
        out = {"loss": self.loss.mean(1).tolist()}
        if self.psnr is not None:
            out["psnr"] = self.psnr.mean(1).tolist()
        if self.ssim is not None:
            out["ssim_iters"] = list(self.ssim_iters)
            out["ssim"] = self.ssim.mean(1).tolist()
        return out


def fit_dip(
    target: torch.Tensor,
    net_input: torch.Tensor,
    seeds: list[int],
    cfg: DIPConfig = DIPConfig(),
    reference: torch.Tensor | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    batched: bool = True,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    measure: Measure | None = None,
    interrupt: Callable[[], None] | None = None,
) -> DIPResult:
    """Algorithm 2 for B images: fit G_psi^b(net_input[b]) to target[b], b = 1..B.

    target, net_input: [B, C, H, W] on the device to use; seeds[b] initialises network b, so image b's result does
    not depend on `batch_size` or `batched`. `reference` (the clean images, when known) adds PSNR/SSIM curves.
    `measure(outputs, lo, hi)` puts an observation operator inside the loss, MSE(A G_psi(z), y) (Ulyanov et al.'s
    super-resolution and inpainting). `interrupt()` runs after every step. Returns the outputs and curves.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if target.shape[0] != len(seeds) or net_input.shape[0] != len(seeds):
        raise ValueError("target, net_input and seeds must have the same length")
    group = batch_size if batched else 1
    bar = None
    if progress:
        bar = tqdm(total=cfg.iters * len(seeds), desc=f"DIP fit ({cfg.preset})", unit="img-it", leave=False)

    try:
        parts = []
        with timer(target.device) as tm:
            for lo in range(0, len(seeds), group):
                hi = min(lo + group, len(seeds))
                ref = reference[lo:hi] if reference is not None else None
                parts.append(
                    _fit_group(
                        target[lo:hi],
                        net_input[lo:hi],
                        list(seeds[lo:hi]),
                        cfg,
                        ref,
                        amp_dtype,
                        _on_step(bar, interrupt),
                        None if measure is None else functools.partial(measure, lo=lo, hi=hi),
                    )
                )
        return DIPResult.concat(parts, tm[0])
    except (RuntimeError, NotImplementedError) as e:
        if not batched or "vmap" not in str(e).lower():
            raise
        # Some layers (older torch's attention kernels) have no batching rule: fit one by one.
        warnings.warn(
            f"vmap failed for preset {cfg.preset} ({str(e).splitlines()[0]}); fitting one image at a time", stacklevel=2
        )
    finally:
        if bar is not None:
            bar.close()
    return fit_dip(target, net_input, seeds, cfg, reference, batch_size, False, amp_dtype, progress, measure, interrupt)


def _on_step(bar: tqdm | None, interrupt: Callable[[], None] | None) -> Callable[[int], None] | None:
    """What runs after every Adam step of n images: the progress bar, and the caller's stop check (a time
    budget, a visitor who left); None when there is neither."""
    if bar is None and interrupt is None:
        return None

    def step(n: int) -> None:
        if bar is not None:
            bar.update(n)
        if interrupt is not None:
            interrupt()

    return step


def _fit_group(
    target: torch.Tensor,
    net_input: torch.Tensor,
    seeds: list[int],
    cfg: DIPConfig,
    reference: torch.Tensor | None,
    amp_dtype: torch.dtype | None,
    on_step: Callable[[int], None] | None,
    measure: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DIPResult:
    """Alg. 2 lines 4-9 for len(seeds) networks at once: cfg.iters Adam steps on sum_b MSE(G_b(z_b), x_b)."""
    device = target.device
    forward, params = _networks(cfg.preset, seeds, target.shape[-1], device)
    gens = image_generators([s + 7919 for s in seeds], device) if cfg.input_noise > 0 else None
    opt = torch.optim.Adam(params, lr=cfg.lr)
    # The curves stay on the device and are copied to the host once, at the end: no sync per step.
    losses, psnrs, ssims, ssim_iters = [], [], [], []
    avg: torch.Tensor | None = None
    for i in range(cfg.iters):
        x = net_input
        if gens is not None:
            x = x + cfg.input_noise * randn(tuple(x.shape[1:]), gens, device, x.dtype)
        with autocast(device, amp_dtype):
            out = forward(x)
        per_image = mse_per_image(out if measure is None else measure(out.float()), target)
        losses.append(per_image.detach().float())
        o = out.detach().float()
        if reference is not None:
            psnrs.append(psnr(o, reference))
            if cfg.ssim_every > 0 and (i % cfg.ssim_every == 0 or i == cfg.iters - 1):
                ssims.append(ssim(o, reference))
                ssim_iters.append(i)
        if cfg.average is not None:
            avg = o if avg is None else cfg.average * avg + (1 - cfg.average) * o
        opt.zero_grad(set_to_none=True)
        # Sum, not mean: each network must get the gradient of its own MSE, as if fitted alone.
        per_image.sum().backward()
        opt.step()
        if on_step is not None:
            on_step(len(seeds))
    output = avg
    if output is None:
        with torch.no_grad(), autocast(device, amp_dtype):
            output = forward(net_input).float()  # G_psi^{(i_max)}(z): the fitted network's output
    loss = torch.stack(losses).cpu() if losses else torch.zeros(0, len(seeds))
    return DIPResult(
        output,
        loss,
        torch.stack(psnrs).cpu() if psnrs else None,
        torch.stack(ssims).cpu() if ssims else None,
        ssim_iters,
    )


def _networks(
    preset: str, seeds: list[int], size: int, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """The networks G_b (network b initialised from seeds[b]) as one function of a [B, C, H, W] input,
    and the tensors Adam updates: a plain module for one image, stacked weights under vmap for several."""
    models = [build_unet(preset, seed=s, sample_size=size).to(device) for s in seeds]
    if len(models) == 1:
        (model,) = models
        return (lambda x: model(x, 0).sample), list(model.parameters())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x.unsqueeze(0), 0)).sample.squeeze(0)

    batched = vmap(one)
    return (lambda x: batched(params, buffers, x)), list(params.values())

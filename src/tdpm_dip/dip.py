"""Algorithm 2: fit a Deep Image Prior G_psi (a `UNet2DModel` called at timestep 0) to a target.

`fit_dip` fits B images at once, each with its own weights: the B networks are stacked
(`torch.func.stack_module_state`) and evaluated with `vmap(functional_call)`; one Adam over the stacked
tensors equals B independent Adams because Adam is element-wise, and the loss is the *sum* of the
per-image mean squared errors, so each network receives exactly its own gradient. `batched=False`
is the report's loop (a fresh network and optimiser per image, batch 1) and gives the same result.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, stack_module_state, vmap

from .config import UNetPreset, get_preset
from .devices import autocast, timer
from .errors import UserError
from .metrics import mse_per_image, psnr, ssim
from .models import build_unet
from .noise import image_generators, randn


@dataclass(frozen=True)
class DIPConfig:
    """Hyperparameters of Algorithm 2 (defaults: the report's, Adam lr 1e-4, 100 iterations)."""

    preset: str = "paper-dip"
    iters: int = 100
    lr: float = 1e-4
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


@dataclass
class DIPResult:
    """Network outputs and per-iteration curves. `loss[i]`, `psnr[i]` are taken before update i."""

    output: torch.Tensor                      # [B, 3, H, W]: G_psi^{(i_max)}(z), or the averaged output
    loss: torch.Tensor                        # [iters, B]
    psnr: torch.Tensor | None = None          # [iters, B] against the reference, if one was given
    ssim: torch.Tensor | None = None          # [len(ssim_iters), B]
    ssim_iters: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def mean_curves(self) -> dict[str, list[float]]:
        out = {"loss": self.loss.mean(1).tolist()}
        if self.psnr is not None:
            out["psnr"] = self.psnr.mean(1).tolist()
        if self.ssim is not None:
            out["ssim_iters"] = list(self.ssim_iters)
            out["ssim"] = self.ssim.mean(1).tolist()
        return out


class _Tracker:
    """Collects loss / PSNR / SSIM on the device; converted once at the end (no per-step host sync)."""

    def __init__(self, reference: torch.Tensor | None, ssim_every: int, iters: int) -> None:
        self.reference, self.ssim_every, self.iters = reference, ssim_every, iters
        self.loss: list[torch.Tensor] = []
        self.psnr: list[torch.Tensor] = []
        self.ssim: list[torch.Tensor] = []
        self.ssim_iters: list[int] = []

    def __call__(self, i: int, out: torch.Tensor, loss: torch.Tensor) -> None:
        self.loss.append(loss.detach().float())
        if self.reference is not None:
            out = out.detach().float()
            self.psnr.append(psnr(out, self.reference))
            if self.ssim_every > 0 and (i % self.ssim_every == 0 or i == self.iters - 1):
                self.ssim.append(ssim(out, self.reference))
                self.ssim_iters.append(i)

    def result(self, output: torch.Tensor, seconds: float) -> DIPResult:
        def stack(xs: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.stack(xs).cpu() if xs else None

        loss = stack(self.loss)
        return DIPResult(output, loss if loss is not None else torch.zeros(0, output.shape[0]),
                         stack(self.psnr), stack(self.ssim), self.ssim_iters, seconds)


def _fit_group(target: torch.Tensor, net_input: torch.Tensor, preset: UNetPreset, seeds: list[int],
               cfg: DIPConfig, track: _Tracker, amp_dtype: torch.dtype | None, vmapped: bool,
               step_cb: Callable[[int], None] | None) -> torch.Tensor:
    """Fit len(seeds) networks jointly (vmapped) or a single one (plain module)."""
    device = target.device
    models = [build_unet(preset, seed=s, sample_size=target.shape[-1]).to(device) for s in seeds]
    if vmapped:
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        del models

        def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (x.unsqueeze(0), 0)).sample.squeeze(0)

        batched = vmap(one)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return batched(params, buffers, x)

        opt_params = list(params.values())
    else:
        (model,) = models
        opt_params = list(model.parameters())

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x, 0).sample

    return optimise(forward, opt_params, net_input, target, seeds, cfg, track, amp_dtype, step_cb)


def optimise(forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], net_input: torch.Tensor,
             target: torch.Tensor, seeds: list[int], cfg: DIPConfig, track: _Tracker,
             amp_dtype: torch.dtype | None, step_cb: Callable[[int], None] | None = None,
             fused: bool = False) -> torch.Tensor:
    """Alg. 2 lines 4-9 for B networks at once: i_max Adam steps on sum_b MSE(G_b(z_b), x_b)."""
    device = target.device
    gens = image_generators([s + 7919 for s in seeds], device) if cfg.input_noise > 0 else None
    opt = torch.optim.Adam(params, lr=cfg.lr, **({"fused": True} if fused else {}))
    avg: torch.Tensor | None = None
    for i in range(cfg.iters):
        x = net_input
        if gens is not None:
            x = x + cfg.input_noise * randn(tuple(x.shape[1:]), gens, device, x.dtype)
        with autocast(device, amp_dtype):
            out = forward(x)
        per_image = mse_per_image(out, target)
        track(i, out, per_image)
        if cfg.average is not None:
            o = out.detach().float()
            avg = o if avg is None else cfg.average * avg + (1 - cfg.average) * o
        opt.zero_grad(set_to_none=True)
        # Sum, not mean: each network must get the gradient of its own MSE, as if fitted alone.
        per_image.sum().backward()
        opt.step()
        if step_cb is not None:
            step_cb(len(seeds))
    if avg is not None:
        return avg
    with torch.no_grad(), autocast(device, amp_dtype):
        return forward(net_input).float()  # G_psi^{(i_max)}(z): the fitted network's output


FitGroup = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int], _Tracker], torch.Tensor]


def fit_in_groups(target: torch.Tensor, net_input: torch.Tensor, seeds: list[int], cfg: DIPConfig,
                  reference: torch.Tensor | None, group: int, fit_group: FitGroup) -> DIPResult:
    """Run `fit_group(target, input, reference, seeds, tracker)` on consecutive groups of images."""
    if target.shape[0] != len(seeds) or net_input.shape[0] != len(seeds):
        raise ValueError("target, net_input and seeds must have the same length")
    if group < 1:
        raise UserError(f"batch size must be >= 1, got {group}")
    outputs, results = [], []
    with timer(target.device) as tm:
        for lo in range(0, len(seeds), group):
            hi = min(lo + group, len(seeds))
            ref = reference[lo:hi] if reference is not None else None
            track = _Tracker(ref, cfg.ssim_every, cfg.iters)
            out = fit_group(target[lo:hi], net_input[lo:hi], ref, list(seeds[lo:hi]), track)
            outputs.append(out)
            results.append(track.result(out, 0.0))

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(r, name) for r in results]
        return None if parts[0] is None else torch.cat(parts, dim=1)

    return DIPResult(torch.cat(outputs), cat("loss"), cat("psnr"), cat("ssim"), results[0].ssim_iters, tm[0])


def fit_dip(target: torch.Tensor, net_input: torch.Tensor, seeds: list[int], cfg: DIPConfig = DIPConfig(),
            reference: torch.Tensor | None = None, batch_size: int = 16, batched: bool = True,
            amp_dtype: torch.dtype | None = None, progress: bool = False) -> DIPResult:
    """Algorithm 2 for B images: fit G_psi^b(net_input[b]) to target[b], b = 1..B.

    target, net_input: [B, C, H, W] on the device to use; seeds[b] initialises network b, so
    image b's result does not depend on `batch_size` or `batched`. `reference` (the clean images,
    when known) adds PSNR/SSIM curves. Returns the fitted outputs and curves (`DIPResult`).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    preset = get_preset(cfg.preset)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iters * len(seeds), desc=f"DIP fit ({cfg.preset})", unit="img-it", leave=False)

    def fit_group(tgt: torch.Tensor, inp: torch.Tensor, ref: torch.Tensor | None, sds: list[int],
                  track: _Tracker) -> torch.Tensor:
        return _fit_group(tgt, inp, preset, sds, cfg, track, amp_dtype, vmapped=len(sds) > 1,
                          step_cb=bar.update if bar else None)

    try:
        return fit_in_groups(target, net_input, seeds, cfg, reference, batch_size if batched else 1, fit_group)
    except (RuntimeError, NotImplementedError) as e:
        if not batched or "vmap" not in str(e).lower():
            raise
        # Some layers (older torch's attention kernels) have no batching rule: fit one by one.
        warnings.warn(f"vmap failed for preset {cfg.preset} ({str(e).splitlines()[0]}); "
                      "fitting one image at a time", stacklevel=2)
        return fit_dip(target, net_input, seeds, cfg, reference, batch_size, False, amp_dtype, progress)
    finally:
        if bar is not None:
            bar.close()

"""Reverse chains (Algorithm 3 and its baselines). Samplers take the network; they never own it.

All chains use diffusers schedulers' true posterior steps. The report's printed update (its
1/sqrt(abar_t) and beta_t z) has typos; `DDPMScheduler.step` is the DDPM posterior mean
1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) plus sqrt(beta~_t) z (Ho et al., Alg. 2),
written through the predicted x0 with clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .devices import autocast
from .noise import abar, chain_timesteps, check_level, num_levels

Callback = Callable[[int], None]


@torch.no_grad()
def reverse_chain(unet: UNet2DModel, scheduler: DDPMScheduler, x_t: torch.Tensor, t: int,
                  generators: list[torch.Generator], amp_dtype: torch.dtype | None = None,
                  callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling from noise level t to 0: exactly t posterior steps (t = 0: identity).

    Algorithm 3 lines 3-6 when x_t = G_psi(z) and t = T_trunc; the full DDPM sampler when t = T and
    x_t ~ N(0, I). generators[i] draws the step noise of image i.
    """
    check_level(scheduler, t)
    # A private copy: `set_timesteps` elsewhere must not change which step `step` takes.
    sched = DDPMScheduler.from_config(scheduler.config)
    x = x_t.float()
    for ts in chain_timesteps(t):
        with autocast(x.device, amp_dtype):
            eps = unet(x.to(unet.dtype), ts).sample
        x = sched.step(eps.float(), ts, x, generator=generators).prev_sample
        if callback is not None:
            callback(ts)
    return x


@torch.no_grad()
def ddim_chain(unet: UNet2DModel, scheduler: DDPMScheduler, x_T: torch.Tensor, steps: int,
               generators: list[torch.Generator], eta: float = 0.0, amp_dtype: torch.dtype | None = None,
               callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) from pure noise in `steps` network evaluations ("trailing" spacing,
    so the first step is at the last training timestep)."""
    if not 1 <= steps <= num_levels(scheduler):
        raise ValueError(f"DDIM steps must be in [1, {num_levels(scheduler)}]")
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(steps, device=x_T.device)
    x = x_T.float()
    for ts in ddim.timesteps:
        with autocast(x.device, amp_dtype):
            eps = unet(x.to(unet.dtype), ts).sample
        x = ddim.step(eps.float(), ts, x, eta=eta, generator=generators).prev_sample
        if callback is not None:
            callback(int(ts))
    return x


@torch.no_grad()
def ddim_between(unet: UNet2DModel, scheduler: DDPMScheduler, x: torch.Tensor, t_from: int, t_to: int, steps: int,
                 amp_dtype: torch.dtype | None = None, clip: bool = False) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) from level t_from down to level t_to in
    `steps` network calls, on the levels round(linspace(t_from, t_to)). With t_to = 0 the last step returns
    the predicted x0. `clip` clamps each predicted x0 to [-1, 1] (diffusers' clip_sample) and keeps eps.
    """
    check_level(scheduler, t_from)
    check_level(scheduler, t_to)
    if not 0 <= t_to <= t_from or steps < 1:
        raise ValueError(f"DDIM from level {t_from} to {t_to} in {steps} steps: need t_from >= t_to and steps >= 1")
    levels = sorted({round(t_to + (t_from - t_to) * (steps - i) / steps) for i in range(steps + 1)}, reverse=True)
    x = x.float()
    for hi, lo in zip(levels[:-1], levels[1:]):
        a_hi, a_lo = abar(scheduler, hi), abar(scheduler, lo)
        with autocast(x.device, amp_dtype):
            eps = unet(x.to(unet.dtype), hi - 1).sample.float()
        x0 = (x - math.sqrt(1 - a_hi) * eps) / math.sqrt(a_hi)
        if clip:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(a_lo) * x0 + math.sqrt(1 - a_lo) * eps
    return x


def tdpm_sample(unet: UNet2DModel, scheduler: DDPMScheduler, dip_output: torch.Tensor, t_trunc: int,
                generators: list[torch.Generator], amp_dtype: torch.dtype | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Algorithm 3: start at x_T = G_psi(z) (the fitted DIP's output) and reverse T_trunc steps.

    T_trunc = 0 returns the DIP output itself (Table 3, first row).
    """
    return reverse_chain(unet, scheduler, dip_output, t_trunc, generators, amp_dtype, callback)

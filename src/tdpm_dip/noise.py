"""Noise schedules and the report's noise-level convention.

Convention (the report's Eq. 3 with 1-based t): a *noise level* t in {0, ..., T} means
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar_0 = 1 and abar_t = prod_{s<=t} alpha_s, which
is `scheduler.alphas_cumprod[t - 1]` in diffusers' 0-based indexing. A reverse chain from level t runs
exactly t posterior steps, over diffusers timesteps t-1, ..., 0, so the step counts match the report
(DDPM 1000, denoising from 600, TDPM-DIP T_trunc=10) and T_trunc = 0 means "no chain".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler

from . import defaults
from .errors import UserError, check_sigma

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}


def make_scheduler(schedule: str = "linear", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The DDPM scheduler of Algorithm 1 (linear betas 1e-4..0.02, or the cosine schedule)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose linear or cosine")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=SCHEDULES[schedule],
        clip_sample=True,
        prediction_type="epsilon",
        variance_type="fixed_small",
    )


def num_levels(scheduler: DDPMScheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def check_level(scheduler: DDPMScheduler, t: int, name: str = "t") -> int:
    """Validate a noise level: 0 <= t <= T (T = number of training timesteps)."""
    T = num_levels(scheduler)
    if not isinstance(t, int) or t < 0 or t > T:
        raise UserError(f"{name} must be an integer in [0, {T}], got {t}")
    return t


def check_t_trunc(scheduler: DDPMScheduler, t_trunc: int) -> int:
    """Validate a truncation level: 0 <= T_trunc <= T - 1 (T_trunc = T would be the full chain from noise)."""
    T = num_levels(scheduler)
    if not isinstance(t_trunc, int) or not 0 <= t_trunc <= T - 1:
        raise UserError(f"T_trunc must be an integer in [0, {T - 1}], got {t_trunc}")
    return t_trunc


def check_steps(scheduler: DDPMScheduler, steps: int, name: str = "--ddim-steps") -> int:
    """A chain's step count: 1..T, one network call per level at most."""
    T = num_levels(scheduler)
    if not 1 <= steps <= T:
        raise UserError(f"{name} must be in 1..{T} (this DDPM's levels), got {steps}")
    return steps


def abar(scheduler: DDPMScheduler, t: int) -> float:
    """abar_t in the report's 1-based convention (abar_0 = 1)."""
    check_level(scheduler, t)
    return 1.0 if t == 0 else float(scheduler.alphas_cumprod[t - 1])


def q_sample(scheduler: DDPMScheduler, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 3: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = abar(scheduler, t)
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps


def rescale(scheduler: DDPMScheduler, x: torch.Tensor, t: int, t_from: int = 0) -> torch.Tensor:
    """x carried from level t_from's signal scale to level t's: sqrt(abar_t / abar_t_from) x. With t_from = 0, an
    observation y = x0 + n read as x_t = sqrt(abar_t) y (its noise then has x_t's variance when n matches t)."""
    return math.sqrt(abar(scheduler, t) / abar(scheduler, t_from)) * x


def level_for_ratio(scheduler: DDPMScheduler, ratio: float, nearest: bool = False) -> int:
    """The level t >= 1 whose noise-to-signal variance (1 - abar_t) / abar_t matches `ratio`: the nearest one, or
    (nearest False) the smallest one that reaches it, at most T - 1."""
    ac = scheduler.alphas_cumprod.double()
    r = (1 - ac) / ac
    if nearest:
        return int((r - ratio).abs().argmin()) + 1
    idx = int(torch.searchsorted(r, torch.tensor([ratio], dtype=torch.float64)).item())
    return min(idx + 1, num_levels(scheduler) - 1)


def sigma_to_level(scheduler: DDPMScheduler, sigma255: float) -> int:
    """Level t* whose noise-to-signal ratio matches Gaussian noise of std sigma (0..255 scale).

    y = x + n, n ~ N(0, s^2) with s = 2 sigma / 255 on [-1, 1]; scaled by sqrt(abar), it has the
    statistics of x_t when (1 - abar_t) / abar_t = s^2.
    """
    check_sigma(sigma255, "sigma")
    return level_for_ratio(scheduler, (2.0 * sigma255 / 255.0) ** 2, nearest=True)


# ---------------------------------------------------------------- per-image randomness


def image_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, on the device where the noise is drawn (never drawn then moved).

    Image i depends only on seed i, whatever the batch size (as NVlabs/edm's StackedRandomGenerator).
    """
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[len(generators), *shape] standard normal noise, row i drawn from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def add_noise(clean: torch.Tensor, sigma255: float, seeds: list[int], model: str = "clipped") -> torch.Tensor:
    """The observation y of clean images in [-1, 1]: Gaussian noise of std sigma on the 0..255 scale.

    clipped: what a saved noisy file holds, round(clip(255 x + n)) / 255 in 8 bits (the default);
    float: the unclipped y = x0 + n of denoising papers. The noise of image i comes from seed i; sigma 0 leaves
    only the 8-bit rounding (a noise-free observation file).
    """
    if model not in defaults.NOISE_MODELS:
        raise UserError(f"noise model must be one of {', '.join(defaults.NOISE_MODELS)}, got {model!r}")
    if not 0 <= sigma255 <= 255:
        raise UserError(f"sigma must be in [0, 255] (noise std on the 0..255 scale), got {sigma255}")
    gens = image_generators([s + 104729 for s in seeds], clean.device)
    y = clean + (2.0 * sigma255 / 255.0) * randn(tuple(clean.shape[1:]), gens, clean.device, clean.dtype)
    return to_8bit(y) if model == "clipped" else y


def to_8bit(y: torch.Tensor) -> torch.Tensor:
    """What an 8-bit file stores of y in [-1, 1]: round(clip(255 x)) / 255 on the image scale."""
    return torch.round((y + 1.0) * 127.5).clamp(0, 255) / 127.5 - 1.0

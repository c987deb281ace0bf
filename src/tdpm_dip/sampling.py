"""The noise predictor in the report's level convention, and the reverse chains (Algorithm 3 and its baselines).

`EpsModel` wraps a diffusers UNet once (as k-diffusion's `DiscreteEpsDDPMDenoiser` does): it maps a noise
level t to the diffusers timestep t - 1 and applies autocast, so the samplers below never see either.
Samplers take the EpsModel; they never own the network.

All chains use diffusers schedulers' true posterior steps. The report's printed update (its
1/sqrt(abar_t) and beta_t z) has typos; `DDPMScheduler.step` is the DDPM posterior mean
1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) plus sqrt(beta~_t) z (Ho et al., Alg. 2),
written through the predicted x0 with clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .devices import autocast
from .noise import abar, check_level, num_levels, randn

Callback = Callable[[int], None]
# A data-consistency step: (predicted clean image, level) -> the clean image the next level is drawn from.
X0Step = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class EpsModel:
    """eps_theta(x_t, t) of a noise-predicting UNet, at noise level t (noise.py's 1-based convention)."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    amp_dtype: torch.dtype | None = None

    def eps(self, x: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        """The predicted noise (fp32) of x at level t: the UNet at diffusers timestep t - 1, under autocast."""
        with torch.no_grad(), autocast(x.device, self.amp_dtype):
            return self.unet(x.to(self.unet.dtype), level - 1).sample.float()

    def x0(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """The predicted clean image (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Eq. 3 solved for x0)."""
        return self.x0_eps(x, level)[0]

    def x0_eps(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted eps) of x at level t: one network call."""
        a = abar(self.scheduler, level)
        eps = self.eps(x, level)
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a), eps

    def tweedie(self, y: torch.Tensor, level: int) -> torch.Tensor:
        """E[x0 | x_t] for an observation y = x0 + n on the image's scale (Tweedie's formula, Efron 2011): with
        x_t = sqrt(abar_t) y, x0 = y - sqrt((1 - abar_t) / abar_t) eps(x_t, t)."""
        a = abar(self.scheduler, level)
        return y - math.sqrt((1 - a) / a) * self.eps(math.sqrt(a) * y, level)


@torch.no_grad()
def reverse_chain(
    model: EpsModel,
    x_t: torch.Tensor,
    t: int,
    generators: list[torch.Generator],
    callback: Callback | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling from noise level t to 0 (t = 0: identity).

    steps None (or t): exactly t posterior steps, Algorithm 3 lines 3-6 when x_t = G_psi(z) and t = T_trunc;
    the full DDPM sampler when t = T and x_t ~ N(0, I). steps < t: the true posterior q(x_s | x_t', x0_hat)
    between the levels round(linspace(t, 0, steps + 1)) (Ho et al. Eq. 7 with abar_t' / abar_s for alpha_t;
    diffusers' DDPMScheduler with custom timesteps), in `steps` network calls. generators[i] draws the step
    noise of image i.
    """
    check_level(model.scheduler, t)
    steps = t if steps is None else steps
    if t and not 1 <= steps <= t:
        raise ValueError(f"a reverse chain from level {t} takes 1..{t} steps, got {steps}")
    levels = sorted({round(t * (steps - i) / steps) for i in range(steps)}, reverse=True) if t else []
    # A private copy: `set_timesteps` elsewhere must not change which step `step` takes.
    sched = DDPMScheduler.from_config(model.scheduler.config)
    if steps < t:
        # The posterior step from level s down to the next level is diffusers' step at timestep s - 1.
        sched.set_timesteps(timesteps=[level - 1 for level in levels], device=x_t.device)
    x = x_t.float()
    for level in levels:
        x = sched.step(model.eps(x, level), level - 1, x, generator=generators).prev_sample
        if callback is not None:
            callback(level - 1)
    return x


@torch.no_grad()
def ddim_chain(
    model: EpsModel,
    x_T: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    eta: float = 0.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from pure noise in `steps` network evaluations ("trailing" spacing,
    so the first step is at the last training timestep)."""
    if not 1 <= steps <= num_levels(model.scheduler):
        raise ValueError(f"DDIM steps must be in [1, {num_levels(model.scheduler)}]")
    ddim = DDIMScheduler.from_config(model.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(steps, device=x_T.device)
    x = x_T.float()
    for ts in ddim.timesteps:
        x = ddim.step(model.eps(x, ts + 1), ts, x, eta=eta, generator=generators).prev_sample
        if callback is not None:
            callback(int(ts))
    return x


def ddim_between(
    model: EpsModel, x: torch.Tensor, t_from: int, t_to: int, steps: int, clip: bool = False
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) from level t_from down to level t_to in
    `steps` network calls, on the levels round(linspace(t_from, t_to)) (`sample` with eta = 0). With t_to = 0
    the last step returns the predicted x0. `clip` clamps each predicted x0 to [-1, 1] (diffusers' clip_sample)
    and keeps eps.
    """
    check_level(model.scheduler, t_from)
    check_level(model.scheduler, t_to)
    return sample(model, x, spaced_levels(t_from, steps, t_to), [], eta=0.0, clip=clip)


def spaced_levels(t_from: int, steps: int, t_to: int = 0) -> list[int]:
    """The levels round(linspace(t_from, t_to, steps + 1)), decreasing and without repeats: a chain of (at most)
    `steps` network calls from level t_from down to t_to."""
    if not 0 <= t_to <= t_from or steps < 1:
        raise ValueError(f"a chain from level {t_from} to {t_to} in {steps} steps: need t_from >= t_to and steps >= 1")
    return sorted({round(t_to + (t_from - t_to) * (steps - i) / steps) for i in range(steps + 1)}, reverse=True)


@torch.no_grad()
def sample(
    model: EpsModel,
    x: torch.Tensor,
    levels: list[int],
    generators: list[torch.Generator],
    eta: float = 1.0,
    zeta: float | None = None,
    x0_step: X0Step | None = None,
    clip: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reverse chain over an explicit list of decreasing levels, with a data-consistency step.

    x is x_{levels[0]}. At each level t the model predicts x0 (Eq. 3 solved for x0, clipped to [-1, 1] unless
    `clip` is off); `x0_step(x0, t)` may replace it (a projection onto the observation: DDNM, Wang et al. 2023;
    a proximal data step: DiffPIR, Zhu et al. 2023). The next level s is then drawn
    - by DDIM (Song et al. 2021, Eq. 12) when zeta is None: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps
      + sigma z, sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s); eta = 1 is the DDPM
      posterior step, eta = 0 deterministic DDIM;
    - by DiffPIR's rule otherwise: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) (sqrt(1 - zeta) eps^ + sqrt(zeta) z),
      with eps^ the noise that x0 implies in x_t (zeta = 1: fresh noise, annealed denoising).
    One network call per level but the last; when the last level is 0 the result is the final clean estimate.
    """
    x = x.float()
    for hi, lo in zip(levels[:-1], levels[1:]):
        a_hi, a_lo = abar(model.scheduler, hi), abar(model.scheduler, lo)
        x0, eps = model.x0_eps(x, hi)
        if clip:
            x0 = x0.clamp(-1, 1)
        if x0_step is not None:
            x0 = x0_step(x0, hi)
        if lo == 0 and zeta is not None:
            x = x0
        elif zeta is not None:
            z = randn(tuple(x.shape[1:]), generators, x.device)
            eps_hat = (x - math.sqrt(a_hi) * x0) / math.sqrt(1 - a_hi) if zeta < 1 else z
            x = math.sqrt(a_lo) * x0 + math.sqrt(1 - a_lo) * (math.sqrt(1 - zeta) * eps_hat + math.sqrt(zeta) * z)
        else:
            sigma = eta * math.sqrt((1 - a_lo) / (1 - a_hi) * (1 - a_hi / a_lo))
            x = math.sqrt(a_lo) * x0 + math.sqrt(max(0.0, 1 - a_lo - sigma**2)) * eps
            if sigma > 0:
                x = x + sigma * randn(tuple(x.shape[1:]), generators, x.device)
        if callback is not None:
            callback(lo)
    return x

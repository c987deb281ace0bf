"""The noise predictor in the report's level convention, and the one reverse sampler (Algorithm 3 and the rest).

`EpsModel` wraps a diffusers UNet once (as k-diffusion's `DiscreteEpsDDPMDenoiser` does): it maps a noise
level t to the diffusers timestep t - 1 and applies autocast, so the sampler below never sees either.
Samplers take the EpsModel; they never own the network.

`sample` runs a chain over an explicit list of levels with a step rule: the DDPM posterior (`ddpm_step`, Ho et al.
Eq. 7; the report's printed update, its 1/sqrt(abar_t) and beta_t z, has typos), DDIM (`ddim_step`) or DiffPIR's
re-noising (`diffpir_step`), and an optional data step on each predicted x0. `reverse_chain` (Algorithm 3, DDPM),
`ddim_chain` and `ddim_between` are calls of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

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
        """(predicted x0, predicted eps) of x at level t: one network call; x0 in float32 scalars in diffusers'
        order, so the chains below are the library's schedulers to the last bit."""
        a = torch.tensor(abar(self.scheduler, level), dtype=torch.float32)
        eps = self.eps(x, level)
        return (x - (1 - a) ** 0.5 * eps) / a**0.5, eps

    def tweedie(self, y: torch.Tensor, level: int) -> torch.Tensor:
        """E[x0 | x_t] for an observation y = x0 + n on the image's scale (Tweedie's formula, Efron 2011): with
        x_t = sqrt(abar_t) y, x0 = y - sqrt((1 - abar_t) / abar_t) eps(x_t, t)."""
        a = abar(self.scheduler, level)
        return y - math.sqrt((1 - a) / a) * self.eps(math.sqrt(a) * y, level)


def reverse_chain(
    model: EpsModel,
    x_t: torch.Tensor,
    t: int,
    generators: list[torch.Generator],
    callback: Callback | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling from noise level t to 0 (t = 0: identity): `sample` with the posterior step.

    steps None (or t): exactly t posterior steps, Algorithm 3 lines 3-6 when x_t = G_psi(z) and t = T_trunc;
    the full DDPM sampler when t = T and x_t ~ N(0, I). steps < t: the true posterior q(x_s | x_t', x0_hat)
    between the levels round(linspace(t, 0, steps + 1)) (Ho et al. Eq. 7 with abar_t' / abar_s for alpha_t), in
    `steps` network calls. generators[i] draws the step noise of image i.
    """
    check_level(model.scheduler, t)
    steps = t if steps is None else steps
    if t and not 1 <= steps <= t:
        raise ValueError(f"a reverse chain from level {t} takes 1..{t} steps, got {steps}")
    if not t:
        return x_t.float()
    return sample(model, x_t, spaced_levels(t, steps), generators, rule=ddpm_step, callback=callback)


def ddim_chain(
    model: EpsModel,
    x_T: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    eta: float = 0.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from pure noise in `steps` network evaluations, on the levels round(T - i T / steps)
    (diffusers' "trailing" spacing: the first call is at level T)."""
    T = num_levels(model.scheduler)
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}]")
    return sample(model, x_T, spaced_levels(T, steps), generators, rule=ddim_step(eta), callback=callback)


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
    return sample(model, x, spaced_levels(t_from, steps, t_to), [], rule=ddim_step(0.0), clip=clip)


def spaced_levels(t_from: int, steps: int, t_to: int = 0) -> list[int]:
    """The levels round(linspace(t_from, t_to, steps + 1)), decreasing and without repeats: a chain of (at most)
    `steps` network calls from level t_from down to t_to."""
    if not 0 <= t_to <= t_from or steps < 1:
        raise ValueError(f"a chain from level {t_from} to {t_to} in {steps} steps: need t_from >= t_to and steps >= 1")
    return sorted({round(t_to + (t_from - t_to) * (steps - i) / steps) for i in range(steps + 1)}, reverse=True)


# How a chain draws x_s from x_t once the model has predicted (x0, eps) at level t: (x_t, x0, eps, abar_t, abar_s,
# noise) -> x_s, where noise() draws z ~ N(0, I) from the images' generators (only when the rule needs it, so
# a rule that adds no noise leaves the random streams where they were).
StepRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, Callable[[], torch.Tensor]], torch.Tensor]


def ddpm_step(
    x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a_t: float, a_s: float, noise: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """The DDPM posterior q(x_s | x_t, x0) (Ho et al. 2020, Eqs. 6-7, with alpha = abar_t / abar_s for a strided
    chain): mean sqrt(abar_s) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_s) / (1 - abar_t) x_t, variance
    beta~ = (1 - abar_s) / (1 - abar_t) beta ("fixed_small"); no noise on the last step (s = 0). This is the
    true posterior step; the report's printed update (its 1/sqrt(abar_t) and beta_t z) has typos."""
    # float32 scalars in diffusers' DDPMScheduler order, so the chain is the library's to the last bit.
    a_t32, a_s32 = torch.tensor(a_t, dtype=torch.float32), torch.tensor(a_s, dtype=torch.float32)
    beta = 1 - a_t32 / a_s32
    mean = (a_s32**0.5 * beta) / (1 - a_t32) * x0 + (a_t32 / a_s32) ** 0.5 * (1 - a_s32) / (1 - a_t32) * x
    if a_s == 1:
        return mean
    return mean + ((1 - a_s32) / (1 - a_t32) * beta).clamp(min=1e-20) ** 0.5 * noise()


def ddim_step(eta: float = 0.0) -> StepRule:
    """DDIM (Song et al. 2021, Eq. 12): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s); eta = 1 matches the DDPM posterior
    when x0 is left as predicted, eta = 0 is deterministic. eps is the network's, also when x0 was clipped or
    corrected (as diffusers' DDIMScheduler and DDNM, Wang et al. 2023, keep it)."""

    def step(
        x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a_t: float, a_s: float, noise: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        a_t32, a_s32 = torch.tensor(a_t, dtype=torch.float32), torch.tensor(a_s, dtype=torch.float32)
        sigma = eta * ((1 - a_s32) / (1 - a_t32) * (1 - a_t32 / a_s32)) ** 0.5
        x = a_s32**0.5 * x0 + (1 - a_s32 - sigma**2).clamp(min=0) ** 0.5 * eps
        return x + sigma * noise() if eta > 0 else x

    return step


def diffpir_step(zeta: float) -> StepRule:
    """DiffPIR's re-noising (Zhu et al. 2023, Alg. 1): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) (sqrt(1 - zeta)
    eps^ + sqrt(zeta) z), eps^ the noise that x0 implies in x_t (zeta = 1: fresh noise, annealed denoising);
    the last step (s = 0) returns x0."""

    def step(
        x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a_t: float, a_s: float, noise: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if a_s == 1:
            return x0
        z = noise()
        eps_hat = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t) if zeta < 1 else z
        return math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * (math.sqrt(1 - zeta) * eps_hat + math.sqrt(zeta) * z)

    return step


@torch.no_grad()
def sample(
    model: EpsModel,
    x: torch.Tensor,
    levels: list[int],
    generators: list[torch.Generator],
    rule: StepRule = ddpm_step,
    x0_step: X0Step | None = None,
    clip: bool = True,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reverse chain over an explicit list of decreasing levels: Algorithm 3, DDPM, DDIM and the restoration
    chains are all calls of it.

    x is x_{levels[0]}. At each level t the model predicts x0 (Eq. 3 solved for x0, clipped to [-1, 1] unless
    `clip` is off); `x0_step(x0, t)` may replace it (a projection onto the observation: DDNM, Wang et al. 2023;
    a proximal data step: DiffPIR, Zhu et al. 2023); `rule` then draws the next level s (`ddpm_step`,
    `ddim_step(eta)`, `diffpir_step(zeta)`). One network call per level but the last, so a chain's NFE is
    len(levels) - 1; when the last level is 0 the result is the final clean estimate. `callback(s)` runs after
    each step.
    """
    x = x.float()
    shape, device = tuple(x.shape[1:]), x.device

    def noise() -> torch.Tensor:
        return randn(shape, generators, device)

    for hi, lo in zip(levels[:-1], levels[1:]):
        x0, eps = model.x0_eps(x, hi)
        if clip:
            x0 = x0.clamp(-1, 1)
        if x0_step is not None:
            x0 = x0_step(x0, hi)
        x = rule(x, x0, eps, abar(model.scheduler, hi), abar(model.scheduler, lo), noise)
        if callback is not None:
            callback(lo)
    return x

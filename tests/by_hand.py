"""Closed forms and random draws the exact tests compare against (imported as a plain module: pytest puts tests/ on
sys.path). None of them calls the package's code under test: the schedules, the DDPM posterior of Ho et al. as
diffusers' DDPMScheduler.step computes it, DDIM with eta = 0, Tweedie's formula with the stub noise predictors of
tests/stubs.py, and the clipping-aware observation model, with the random draws reproduced from the same per-image
seeds.

Level convention (noise.py): abar_0 = 1, abar_t = scheduler.alphas_cumprod[t - 1]; a network call at level t is a
call at diffusers timestep t - 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from stubs import SIZE, StubUNet

from tdpm_dip.data import make_sprites
from tdpm_dip.noise import make_scheduler

SCHED = make_scheduler("linear")
AC = SCHED.alphas_cumprod.double()  # abar_t = AC[t - 1]
T_STAR_25 = 57  # anchors.md: sigma 25 -> diffusers timestep 56, level 57
T0 = 10  # defaults.T_TRUNC, the blind TDPM-DIP's DIP target level
DECLIP_SALT = 15485863  # observe.declip draws image i's excess from seed i + this


def abar(t: int) -> float:
    return 1.0 if t == 0 else float(AC[t - 1])


def linear_abar(T: int = 1000) -> torch.Tensor:
    """Ho et al.'s schedule: betas linear from 1e-4 to 0.02 over T steps, abar_t = prod (1 - beta_s)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_abar(T: int = 1000) -> torch.Tensor:
    """Nichol and Dhariwal's schedule: abar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) pi / 2)^2, s = 0.008,
    through betas clipped at 0.999."""
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = torch.tensor([min(1 - f[t + 1] / f[t], 0.999) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def level_of_sigma(sigma255: float) -> int:
    """The level whose (1 - abar) / abar is closest to (2 sigma / 255)^2."""
    ratio = ((1 - AC) / AC).numpy()
    return int(np.abs(ratio - (2 * sigma255 / 255) ** 2).argmin()) + 1


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def after_first_draw(seeds: list[int]) -> list[torch.Generator]:
    """Each image's generator after its first draw (z, at SIZE x SIZE): where the chain's step noise continues."""
    g = gens(seeds)
    draw((3, SIZE, SIZE), g)
    return g


def declip_by_hand(y: torch.Tensor, sigmas: list[float], seeds: list[int]) -> torch.Tensor:
    """A pixel stored at +1 becomes 1 + |n|, at -1 becomes -1 - |n|, with |n| ~ |N(0, (2 sigma / 255)^2)| from
    seed + 15485863; every other pixel stays."""
    excess = draw(tuple(y.shape[1:]), gens([s + DECLIP_SALT for s in seeds])).abs()
    excess = excess * torch.tensor([2 * s / 255 for s in sigmas]).view(-1, 1, 1, 1)
    out = y.clone()
    out[y == 1.0] = 1.0 + excess[y == 1.0]
    out[y == -1.0] = -1.0 - excess[y == -1.0]
    return out


def tweedie_factor(unet: StubUNet, t: int) -> float:
    """Tweedie at level t with eps = c x_t, x_t = sqrt(abar) y: y - sqrt((1 - abar) / abar) c sqrt(abar) y."""
    return 1.0 - unet.coef(t - 1) * math.sqrt(1 - abar(t))


def ddpm_chain_by_hand(
    unet: StubUNet, x: torch.Tensor, t: int, generators: list[torch.Generator], levels: list[int] | None = None
) -> torch.Tensor:
    """t DDPM posterior steps (Ho et al. Alg. 2 as DDPMScheduler.step writes it: clip_sample, fixed_small), or
    with `levels` (t first) the posterior steps from each level to the next one and, from the last, to 0.

    Step from level s to s - 1 calls the network at timestep s - 1: x0 = clip((x - sqrt(1 - abar_s) eps) /
    sqrt(abar_s)), mean = sqrt(abar_{s-1}) beta_s / (1 - abar_s) x0 + sqrt(alpha_s) (1 - abar_{s-1}) / (1 -
    abar_s) x with alpha_s = abar_s / abar_{s-1}, beta_s = 1 - alpha_s, plus sqrt((1 - abar_{s-1}) / (1 -
    abar_s) beta_s) z for every step but the last; z is the next draw of each image's generator.

    The coefficients are computed in float32 from the float32 abar, in diffusers' order: 1 - abar_s /
    abar_{s-1} loses ~3 digits to cancellation at small levels (1e-4 in x after a few steps), the same
    rounding as the code under test, so the comparison can be tight."""
    ac = SCHED.alphas_cumprod  # float32
    one = torch.tensor(1.0)
    path = list(range(t, -1, -1)) if levels is None else [*levels, 0]
    for s, prev in zip(path[:-1], path[1:]):
        a, a_prev = ac[s - 1], (ac[prev - 1] if prev > 0 else one)
        alpha = a / a_prev
        beta = 1 - alpha
        eps = unet.coef(s - 1) * x
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        mean = (a_prev**0.5 * beta / (1 - a)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a)) * x
        if prev > 0:
            z = draw(tuple(x.shape[1:]), generators)
            mean = mean + ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20) ** 0.5 * z
        x = mean
    return x


def ddim_by_hand(unet: StubUNet, x: torch.Tensor, levels: list[int], clip: bool = False) -> torch.Tensor:
    """DDIM, eta = 0, over the given levels: x0 = (x - sqrt(1 - a_hi) eps) / sqrt(a_hi) (clipped if asked),
    x <- sqrt(a_lo) x0 + sqrt(1 - a_lo) eps, with eps = c(hi - 1) x."""
    x = x.double()
    for hi, lo in zip(levels[:-1], levels[1:]):
        eps = unet.coef(hi - 1) * x
        x0 = (x - math.sqrt(1 - abar(hi)) * eps) / math.sqrt(abar(hi))
        if clip:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(abar(lo)) * x0 + math.sqrt(1 - abar(lo)) * eps
    return x.float()


def noisy_8bit(h: int, w: int, seed: int, n: int = 1) -> torch.Tensor:
    """n 8-bit observations (sprites on white + noise of std 25, rounded and clipped), as [-1, 1] tensors."""
    rng = np.random.default_rng(seed)
    x = (make_sprites(n, max(h, w), seed=seed).images[:, :, :h, :w].numpy() + 1) * 127.5
    y = np.clip(np.round(x + rng.normal(0, 25, x.shape)), 0, 255)
    return torch.from_numpy(y).float() / 127.5 - 1

"""The report's denoising protocol (Table 2): x0 is noised to level t_noisy, and the DIP target is built
from the *clean* image, x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z with the DIP input's own z (Eq. 7,
Alg. 2). It is an oracle: its "denoising" never looks at the noisy image. Every Result names the paper protocol.
"""

from __future__ import annotations

import torch

from .. import defaults
from ..devices import timer
from ..dip import DIPResult
from ..noise import check_level, check_t_trunc, image_generators, q_sample, randn
from .common import chain, dip_target, fit, image_shape, need
from .types import Context, Job, Result


def _draws(ctx: Context, job: Job) -> tuple[torch.Tensor, list[torch.Generator], torch.Tensor, torch.Tensor]:
    """clean, generators, z (one draw per image: DIP input and forward noise), x_{t_noisy}."""
    check_level(ctx.scheduler, job.t_noisy, "t_noisy")
    clean = need(job.clean, "the clean images", "paper denoising").to(ctx.device)
    gens = image_generators(job.seeds, ctx.device)
    z = randn(image_shape(ctx), gens, ctx.device)
    return clean, gens, z, q_sample(ctx.scheduler, clean, job.t_noisy, z)


def ddpm(ctx: Context, job: Job) -> Result:
    """Table 2, DDPM row: noise x0 to level t_noisy and run t_noisy reverse steps."""
    _, gens, _, x_noisy = _draws(ctx, job)
    with timer(ctx.device) as tm:
        out = chain(ctx, x_noisy, job.t_noisy, gens, "DDPM reverse")
    return Result(
        "ddpm", "paper", out.cpu(), tm[0], job.t_noisy, job.t_noisy, x_noisy.cpu(), info={"t_noisy": job.t_noisy}
    )


def oracle_tdpm(
    ctx: Context, x0: torch.Tensor, z: torch.Tensor, gens: list[torch.Generator], job: Job, t: int, score: bool
) -> tuple[torch.Tensor, DIPResult, float]:
    """The paper protocol's TDPM-DIP, for denoising (Table 2) and generation (Table 1) alike: Alg. 2 fits G_psi(z)
    to the oracle target x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, then Alg. 3 runs T reverse steps from it
    (T = 0: the DIP alone). `score`: the DIP curves are scored against x0. Returns (x0_hat, the fit, seconds of
    the fit and the chain, the scoring of the curves left out)."""
    res = fit(ctx, dip_target(ctx.scheduler, x0, t, z), z, list(job.seeds), x0 if score else None)
    with timer(ctx.device) as tm:
        out = chain(ctx, res.output, t, gens, "TDPM reverse") if t else res.output
    return out, res, res.seconds + tm[0]


def _tdpm(ctx: Context, job: Job, method: str, t: int) -> Result:
    """Table 2: the oracle TDPM-DIP (`oracle_tdpm`) on the clean images, z also the forward noise of x_{t_noisy}."""
    clean, gens, z, x_noisy = _draws(ctx, job)
    out, res, seconds = oracle_tdpm(ctx, clean, z, gens, job, t, score=True)
    iters = ctx.dip.iters
    return Result(
        method,
        "paper",
        out.cpu(),
        seconds,
        iters + t,
        iters + t,
        x_noisy.cpu(),
        res,
        {"t_noisy": job.t_noisy, "t_trunc": t},
    )


def dip(ctx: Context, job: Job) -> Result:
    """Table 3 row 1: the DIP fitted to x0 (T_trunc = 0)."""
    return _tdpm(ctx, job, "dip", 0)


def tdpm_dip(ctx: Context, job: Job) -> Result:
    """Table 2, TDPM-DIP row: Alg. 2 on the oracle x_T, then Alg. 3."""
    t = check_t_trunc(ctx.scheduler, defaults.T_TRUNC if job.t_trunc is None else job.t_trunc)
    return _tdpm(ctx, job, "tdpm-dip", t)

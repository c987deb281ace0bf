"""The report's denoising protocol (Table 2): x0 is noised to level t_noisy, and the DIP target is built
from the *clean* image, x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z with the DIP input's own z (Eq. 7,
Alg. 2). It is an oracle: its "denoising" never looks at the noisy image. Every Result names the paper protocol.
"""

from __future__ import annotations

import torch

from .. import defaults
from ..devices import timer
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


def _tdpm(ctx: Context, job: Job, method: str, t: int) -> Result:
    """Alg. 2 on the oracle target x_T (built from x0 and the DIP input z), then Alg. 3 (T steps)."""
    clean, gens, z, x_noisy = _draws(ctx, job)
    res = fit(ctx, dip_target(ctx.scheduler, clean, t, z), z, list(job.seeds), clean)
    with timer(ctx.device) as tm:
        out = chain(ctx, res.output, t, gens, "TDPM reverse") if t else res.output
    iters = ctx.dip.iters
    return Result(
        method,
        "paper",
        out.cpu(),
        res.seconds + tm[0],
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

"""Generation (Table 1): DDPM and DDIM from pure noise, amortized TDPM, and TDPM-DIP under the paper protocol."""

from __future__ import annotations

import math

import torch

from .. import defaults, registry
from ..devices import timer
from ..errors import UserError
from ..noise import check_t_trunc, image_generators, num_levels, randn
from ..sampling import ddim_chain
from .common import after_each_step, chain, check_trained_level, chunks, image_shape, progress_bar
from .paper import oracle_tdpm
from .types import Context, Job, Result


def check_from_noise(ctx: Context, method: str) -> None:
    """A chain from pure noise needs a DDPM trained up to level T: a truncated one (TDPM) starts at T_trunc."""
    check_trained_level(
        ctx,
        num_levels(ctx.scheduler),
        f"--method {method} starts a chain from pure noise",
        ": use --method tdpm with its generator",
    )


def ddpm(ctx: Context, job: Job) -> Result:
    """Table 1, DDPM row: T ancestral steps from N(0, I)."""
    check_from_noise(ctx, "ddpm")
    gens = image_generators(job.seeds, ctx.device)
    x_T = randn(image_shape(ctx), gens, ctx.device)
    T = num_levels(ctx.scheduler)
    with timer(ctx.device) as tm:
        out = chain(ctx, x_T, T, gens, f"DDPM {T} steps")
    return Result("ddpm", "unconditional", out.cpu(), tm[0], T, T)


def ddim(ctx: Context, job: Job) -> Result:
    """DDIM (Song et al. 2021) from N(0, I) in `ddim_steps` network evaluations."""
    check_from_noise(ctx, "ddim")
    steps = job.ddim_steps or defaults.GENERATE_DDIM_STEPS
    gens = image_generators(job.seeds, ctx.device)
    x_T = randn(image_shape(ctx), gens, ctx.device)
    n = len(job.seeds)
    with (
        progress_bar(ctx, steps * math.ceil(n / ctx.batch_size), f"DDIM {steps} steps") as bar,
        timer(ctx.device) as tm,
    ):
        callback = after_each_step(ctx, bar)  # the bar, and ctx.interrupt (Ctrl-C, the app's budget) every step
        out = torch.cat(
            [
                ddim_chain(ctx.model, x_T[sl], steps, gens[sl], eta=job.eta, callback=callback)
                for sl in chunks(n, ctx.batch_size)
            ]
        )
    return Result("ddim", "unconditional", out.cpu(), tm[0], steps, steps, info={"ddim_steps": steps})


def tdpm_dip(ctx: Context, job: Job) -> Result:
    """Table 1, TDPM-DIP row: the oracle TDPM-DIP (`paper.oracle_tdpm`) on reference image i and z_i."""
    n = len(job.seeds)
    if job.reference is None or job.reference.shape[0] < n:
        raise UserError(
            "TDPM-DIP generation follows the paper protocol: it needs --reference-data with at least "
            "--n images (each output reconstructs one of them)"
        )
    t_trunc = check_t_trunc(ctx.scheduler, defaults.T_TRUNC if job.t_trunc is None else job.t_trunc)
    gens = image_generators(job.seeds, ctx.device)
    x0 = job.reference[:n].to(ctx.device)
    z = randn(image_shape(ctx), gens, ctx.device)
    out, res, seconds = oracle_tdpm(ctx, x0, z, gens, job, t_trunc, score=False)
    iters = ctx.dip.iters
    return Result(
        "tdpm-dip",
        "paper",
        out.cpu(),
        seconds,
        iters + t_trunc,
        iters + t_trunc,
        dip=res,
        info={"t_trunc": t_trunc, "dip_output": res.output.cpu()},
    )


def tdpm(ctx: Context, job: Job) -> Result:
    """TDPM sampling (Zheng et al. 2023): one call of the generator, then the DDPM's reverse steps from T_trunc
    (Algorithm 3's T_trunc steps, or the generator's `reverse_steps` strided posterior steps).

    z_i = (z_img, w) and the chain's step noise of image i come from seed i. T_trunc is the generator's (job.t_trunc,
    when given, must equal it).
    """
    gen = ctx.generator
    if gen is None:
        raise UserError(f"method tdpm needs {registry.NEED_TEXT['generator']}")
    t, steps = gen.t_trunc, gen.reverse_steps
    if job.t_trunc is not None and job.t_trunc != t:
        raise UserError(f"T_trunc {job.t_trunc} does not match the generator's {t} ({gen.path})")
    check_t_trunc(ctx.scheduler, t)
    gens = image_generators(job.seeds, ctx.device)
    n = len(job.seeds)
    with progress_bar(ctx, steps * math.ceil(n / ctx.batch_size), "TDPM reverse") as bar, timer(ctx.device) as tm:
        out = torch.cat(
            [gen.sample(ctx.model, gens[sl], after_each_step(ctx, bar)) for sl in chunks(n, ctx.batch_size)]
        )
    return Result(
        "tdpm",
        "unconditional",
        out.cpu(),
        tm[0],
        1 + steps,
        1 + steps,
        info={"t_trunc": t, "reverse_steps": steps, "generator": gen.path, "objective": gen.info.get("objective")},
    )

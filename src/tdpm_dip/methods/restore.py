"""Restoration: super-resolution and inpainting, y = A x0 (+ n), with A an `operators.Operator`.

bicubic     the classical start for super-resolution (PIL's bicubic upscaling);
biharmonic  the classical start for inpainting (scikit-image);
dip         G_psi(z) fitted through A: MSE(A G_psi(z), y) (Ulyanov et al. 2018);
ddnm        the full chain from pure noise with each predicted x0 projected onto {A x = y} (Wang et al. 2023);
diffpir     the full chain with DiffPIR's proximal data step and fresh noise (Zhu et al. 2023);
ccdf        the classical start forward-diffused to t0, then the truncated chain with a data step after every
            network call, K chains averaged (Chung, Sim and Ye 2022: come closer, diffuse faster);
net         the restoration network's one-call estimate from the classical one (`restoration_net`);
ccdf-net    CCDF from that estimate, the start CCDF recommends (a network trained for the task, its Sec. 3.3);
tdpm-dip    the same chain from a DIP start: G_psi(z) fitted through A, forward-diffused to T_trunc (TDPM-DIP
            with the oracle replaced by the observation), K chains averaged; `tdpm-dip-nodc` drops the data step.
Every Result names the blind protocol: only y, A and sigma_y are known.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from .. import defaults, registry
from ..devices import timer
from ..dip import DIPConfig, DIPResult
from ..errors import UserError
from ..noise import abar, image_generators, num_levels, q_sample, randn
from ..operators import Operator
from ..restoration_net import estimate
from ..sampling import X0Step, ddim_step, diffpir_step, sample, spaced_levels
from .common import after_each_step, check_trained_level, chunks, fit, need, progress_bar
from .types import Context, Job, Result


def _observation(job: Job) -> tuple[torch.Tensor, Operator, float]:
    """(y, A, sigma_y on the [-1, 1] scale) of a restoration job."""
    y = need(job.observed, "the observed images", "restoration")
    op = job.operator
    if op is None:
        raise ValueError("a restoration job needs its operator")
    return y, op, 2.0 * (float(job.sigma[0]) if job.sigma else 0.0) / 255.0


def classical(y: torch.Tensor, op: Operator) -> torch.Tensor:
    """The classical estimate, the operator's own (`Operator.classical`): bicubic upscaling (super-resolution),
    biharmonic inpainting, or the pseudo-inverse of another operator."""
    return op.classical(y)


def data_step(op: Operator, y: torch.Tensor, sigma_y: float, scheduler: DDPMScheduler, lam: float) -> X0Step:
    """The x0 step of the chain: the projection onto {A x = y} when y is noise-free (DDNM), else DiffPIR's
    proximal step argmin ||A x - y||^2 + rho_t ||x - x0||^2 with rho_t = lam sigma_y^2 / sigma_t^2,
    sigma_t^2 = (1 - abar_t) / abar_t (Zhu et al. 2023, Eq. 13): trust y less while the chain's noise is small."""
    if sigma_y == 0:
        return lambda x0, t: op.project(x0, y)

    def step(x0: torch.Tensor, t: int) -> torch.Tensor:
        a = abar(scheduler, t)
        return op.prox(x0, y, lam * sigma_y**2 * a / (1 - a))

    return step


def _chains(
    ctx: Context,
    job: Job,
    start: torch.Tensor,
    levels: list[int],
    chain: dict,
    consistent: bool = True,
    desc: str = "restore",
) -> torch.Tensor:
    """The mean of job.samples chains over `levels` from `start` forward-diffused to levels[0] (image i, chain k
    draws from seed i's generator, so the result does not depend on the batch), each a data step per call.
    `chain`: {"eta": DDIM's eta} or {"zeta": DiffPIR's zeta} (`sampling.ddim_step`, `diffpir_step`)."""
    y, op, sigma_y = _observation(job)
    gens = image_generators(job.seeds, ctx.device)
    out = torch.zeros_like(start)
    calls = (len(levels) - 1) * job.samples
    with progress_bar(ctx, calls * math.ceil(start.shape[0] / ctx.batch_size), desc) as bar:
        callback = after_each_step(ctx, bar)
        for sl in chunks(start.shape[0], ctx.batch_size):
            part = op.part(sl)
            step = data_step(part, y[sl], sigma_y, ctx.scheduler, defaults.RESTORE_LAMBDA) if consistent else None
            for _ in range(job.samples):
                x = start[sl]
                if levels[0] > 0:
                    x = q_sample(ctx.scheduler, x, levels[0], randn(tuple(x.shape[1:]), gens[sl], ctx.device))
                out[sl] += sample(
                    ctx.model,
                    x,
                    levels,
                    gens[sl],
                    rule=ddim_step(chain["eta"]) if "eta" in chain else diffpir_step(chain["zeta"]),
                    x0_step=step,
                    callback=callback,
                )
    return (out / job.samples).clamp(-1, 1)


def _kept(job: Job, out: torch.Tensor) -> torch.Tensor:
    """A one-shot estimate projected onto {A x = y} when y is noise-free: a noise-free observation is kept as it
    is, so known pixels come back unchanged (a noisy one is not: its noise would come back with it)."""
    y, op, sigma_y = _observation(job)
    return op.project(out, y).clamp(-1, 1) if sigma_y == 0 else out


def _result(
    name: str, job: Job, images: torch.Tensor, seconds: float, nfe: int, info: dict, dip: DIPResult | None = None
) -> Result:
    y, _, sigma_y = _observation(job)
    return Result(name, "blind", images.cpu(), seconds, nfe, nfe, y.cpu(), dip, info | {"sigma_y": sigma_y})


# ---------------------------------------------------------------------------------------- methods


def _classical_result(ctx: Context, job: Job, name: str) -> Result:
    y, op, _ = _observation(job)
    with timer(ctx.device) as tm:
        out = classical(y, op)
    return _result(name, job, out, tm[0], 0, {})


def bicubic(ctx: Context, job: Job) -> Result:
    """PIL's bicubic upscaling of the low-resolution image."""
    return _classical_result(ctx, job, "bicubic")


def biharmonic(ctx: Context, job: Job) -> Result:
    """scikit-image's biharmonic inpainting of the unknown pixels."""
    return _classical_result(ctx, job, "biharmonic")


def fit_through(ctx: Context, job: Job, cfg: DIPConfig) -> tuple[torch.Tensor, DIPResult]:
    """Algorithm 2 with A inside the loss: G_psi(z) fitted so that A G_psi(z) matches y (no clean image)."""
    y, op, _ = _observation(job)
    gens = image_generators([s + defaults.RESTORE_DIP_SEED for s in job.seeds], ctx.device)
    h, w = op.out_size(*y.shape[-2:])
    z = randn((y.shape[1], h, w), gens, ctx.device)
    res = fit(
        ctx,
        y,
        z,
        list(job.seeds),
        None,
        cfg,
        measure=lambda o, lo, hi: op.part(slice(lo, hi)).A(o),
        measure_key=op.key(),
    )
    return res.output.clamp(-1, 1), res


def dip(ctx: Context, job: Job) -> Result:
    """Deep Image Prior through the operator (ctx.dip: defaults.DIP["restore"], input noise and output averaging),
    projected onto {A x = y} when y is noise-free."""
    cfg = ctx.dip
    out, res = fit_through(ctx, job, cfg)
    return _result("dip", job, _kept(job, out), res.seconds, cfg.iters, {"dip_iters": cfg.iters}, res)


def _full_chain(ctx: Context, job: Job, name: str, steps: int, chain: dict) -> Result:
    y, op, _ = _observation(job)
    T = num_levels(ctx.scheduler)
    check_trained_level(ctx, T, f"{name} (a chain from pure noise)", "; use ccdf or tdpm-dip, or a DDPM of every level")
    levels = spaced_levels(T, steps)
    h, w = op.out_size(*y.shape[-2:])
    one = dataclasses.replace(job, samples=1)  # one chain from pure noise, as DDNM and DiffPIR run
    with timer(ctx.device) as tm:
        # From pure noise: x_T = q_sample(0, T) is N(0, (1 - abar_T) I), abar_T ~ 0.
        out = _chains(ctx, one, y.new_zeros((y.shape[0], y.shape[1], h, w)), levels, chain, desc=name)
    nfe = len(levels) - 1
    return _result(name, job, out, tm[0], nfe, {"steps": nfe, "samples": 1} | chain)


def ddnm(ctx: Context, job: Job) -> Result:
    """DDNM from pure noise: every predicted x0 projected onto {A x = y} (DiffPIR's proximal step when y is
    noisy), then a DDIM step with DDNM's eta = 0.85."""
    return _full_chain(ctx, job, "ddnm", job.ddim_steps or defaults.RESTORE_FULL_STEPS, {"eta": defaults.DDNM_ETA})


def diffpir(ctx: Context, job: Job) -> Result:
    """DiffPIR from pure noise: the proximal data step, then DiffPIR's mix of implied and fresh noise."""
    return _full_chain(
        ctx, job, "diffpir", job.ddim_steps or defaults.RESTORE_FULL_STEPS, {"zeta": defaults.DIFFPIR_ZETA}
    )


Start = Callable[[], tuple[torch.Tensor, dict, int, float]]  # () -> (estimate, info, its NFE, its seconds)


def _truncated(
    ctx: Context, job: Job, name: str, start: Start, consistent: bool = True, t0: int = defaults.RESTORE_T_TRUNC
) -> Result:
    """A start estimate forward-diffused to T_trunc (job.t_trunc, else t0), then the chain with a data step per
    call, K chains averaged."""
    t0 = job.t_trunc if job.t_trunc is not None else t0
    check_trained_level(ctx, t0, f"{name} from T_trunc", "; lower --t-trunc")
    steps = job.ddim_steps or defaults.RESTORE_STEPS
    levels = spaced_levels(t0, min(steps, t0)) if t0 else [0]
    x_hat, info, start_nfe, start_seconds = start()
    with timer(ctx.device) as tm:
        out = _chains(ctx, job, x_hat, levels, {"zeta": defaults.RESTORE_ZETA}, consistent, desc=name)
    nfe = start_nfe + (len(levels) - 1) * job.samples
    info = info | {"t_trunc": t0, "steps": len(levels) - 1, "samples": job.samples, "consistency": consistent}
    return _result(name, job, out, start_seconds + tm[0], nfe, info)


def ccdf(ctx: Context, job: Job) -> Result:
    """CCDF: the classical estimate (bicubic or biharmonic) as the start of the truncated chain."""
    y, op, _ = _observation(job)

    def start() -> tuple[torch.Tensor, dict, int, float]:
        with timer(ctx.device) as tm:
            x_hat = classical(y, op)
        return x_hat, {"start": "classical"}, 0, tm[0]

    return _truncated(ctx, job, "ccdf", start)


def _net_start(ctx: Context, job: Job) -> tuple[torch.Tensor, dict, int, float]:
    """The restoration network's estimate from the classical one, in batches: one network call per image."""
    y, op, sigma_y = _observation(job)
    net = ctx.restorer
    if net is None:
        raise UserError(f"this method needs {registry.NEED_TEXT['restorer']}")
    with timer(ctx.device) as tm:
        start = classical(y, op)
        out = torch.cat(
            [estimate(net, start[sl], op.part(sl), sigma_y, ctx.amp_dtype) for sl in chunks(len(y), ctx.batch_size)]
        )
    return out, {"start": "net"}, 1, tm[0]


def net(ctx: Context, job: Job) -> Result:
    """The restoration network alone, projected onto {A x = y} when y is noise-free."""
    out, info, nfe, seconds = _net_start(ctx, job)
    return _result("net", job, _kept(job, out), seconds, nfe, info)


def ccdf_net(ctx: Context, job: Job) -> Result:
    """CCDF from the restoration network's estimate: diffused to T_trunc, then the chains with their data step."""
    return _truncated(ctx, job, "ccdf-net", lambda: _net_start(ctx, job), t0=defaults.RESTORE_NET_T_TRUNC)


def _dip_start(ctx: Context, job: Job) -> tuple[torch.Tensor, dict, int, float]:
    """The DIP fitted through A (memoised: the dip row and both tdpm-dip rows share one fit; its own time counts)."""
    cfg = ctx.dip
    out, res = fit_through(ctx, job, cfg)
    return out, {"start": "dip", "dip_iters": cfg.iters}, cfg.iters, res.seconds


def tdpm_dip(ctx: Context, job: Job) -> Result:
    """TDPM-DIP for restoration: G_psi(z) fitted through A (Alg. 2 without the oracle), forward-diffused to
    T_trunc, then the truncated chain (Alg. 3) with a data step after every network call, K chains averaged."""
    return _truncated(ctx, job, "tdpm-dip", lambda: _dip_start(ctx, job))


def tdpm_dip_nodc(ctx: Context, job: Job) -> Result:
    """The ablation: TDPM-DIP's chain without the data step (the report's Alg. 3 from the DIP start)."""
    return _truncated(ctx, job, "tdpm-dip-nodc", lambda: _dip_start(ctx, job), consistent=False)

"""What the methods share: batching, reverse chains over groups of noise levels, the memoised DIP fit."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..dip import DIPConfig, DIPResult, Measure, fit_dip
from ..errors import UserError
from ..models import unet_size
from ..noise import num_levels, q_sample
from ..sampling import reverse_chain
from .types import Context


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of range(n), `size` at a time (the last may be shorter)."""
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def by_level(levels: list[int]) -> dict[int, list[int]]:
    """Image indices grouped by noise level, lowest level first: images of one level run as one batch."""
    groups: dict[int, list[int]] = {}
    for i, level in enumerate(levels):
        groups.setdefault(level, []).append(i)
    return dict(sorted(groups.items()))


def progress_bar(ctx: Context, total: int, desc: str) -> contextlib.AbstractContextManager:
    """A tqdm bar of `total` steps when the context shows progress, else a context that yields None."""
    if not ctx.progress:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def check_trained_level(ctx: Context, t: int, what: str = "a reverse chain", advice: str = "") -> None:
    """A chain from a level above those the DDPM has, or was trained on (a truncated DDPM), is a one-line error."""
    T = num_levels(ctx.scheduler)
    if t > T:
        raise UserError(f"{what} from level {t}, but this DDPM has levels 1..{T}{advice}")
    if ctx.levels is not None and t > ctx.levels[1]:
        raise UserError(
            f"{what} from level {t}, but this DDPM was trained on levels {ctx.levels[0]}..{ctx.levels[1]} "
            f"only (a truncated diffusion model){advice}"
        )


def after_each_step(ctx: Context, bar: tqdm | None) -> Callable[[int], None] | None:
    """A sampler's callback: advance the bar and run `ctx.interrupt` after every step (a chain is tens to hundreds of
    network calls: the app's time budget cannot wait for its end); None when there is neither."""
    if bar is None and ctx.interrupt is None:
        return None

    def step(_: int) -> None:
        if bar is not None:
            bar.update()
        if ctx.interrupt is not None:
            ctx.interrupt()

    return step


def chain(ctx: Context, x_t: torch.Tensor, t: int, gens: list[torch.Generator], desc: str) -> torch.Tensor:
    """Reverse chain from level t (`sampling.reverse_chain`), in batches of ctx.batch_size; `ctx.interrupt` runs
    after every step (`after_each_step`)."""
    check_trained_level(ctx, t)
    out = []
    with progress_bar(ctx, t * math.ceil(x_t.shape[0] / ctx.batch_size), desc) as bar:
        callback = after_each_step(ctx, bar)
        for sl in chunks(x_t.shape[0], ctx.batch_size):
            out.append(reverse_chain(ctx.model, x_t[sl], t, gens[sl], callback=callback))
    return torch.cat(out)


def chains_by_level(
    ctx: Context,
    levels: list[int],
    gens: list[torch.Generator],
    start: Callable[[list[int], int], torch.Tensor],
    desc: str,
) -> torch.Tensor:
    """Reverse chains for images whose start levels differ: images sharing level t share one chain,
    started from start(indices, t), and the outputs return in the images' order."""
    out: torch.Tensor | None = None
    for t, idx in by_level(levels).items():
        o = chain(ctx, start(idx, t), t, [gens[i] for i in idx], desc)
        if out is None:
            out = o.new_empty((len(levels), *o.shape[1:]))
        out[idx] = o
    assert out is not None
    return out


def fit(
    ctx: Context,
    target: torch.Tensor,
    z: torch.Tensor,
    seeds: list[int],
    reference: torch.Tensor | None,
    cfg: DIPConfig | None = None,
    measure: Measure | None = None,
    measure_key: str = "",
) -> DIPResult:
    """Algorithm 2 on a batch, memoised in ctx.dip_memo when the caller provides one.

    `measure` puts an observation operator inside the loss (`dip.fit_dip`); `measure_key` names it in the memo.

    The blind DIP does not depend on the DDPM, and the dip / tdpm-dip rows fit the same networks:
    a table computes each fit once. DIPResult.seconds keeps the fit's own time for honest timings.
    """
    cfg = cfg or ctx.dip
    memo = ctx.dip_memo
    key = None
    if memo is not None:
        h = hashlib.sha1()
        for t in (target, z) + ((reference,) if reference is not None else ()):
            h.update(t.detach().float().cpu().numpy().tobytes())
        key = (h.hexdigest(), tuple(seeds), cfg, str(ctx.amp_dtype), str(ctx.device), ctx.batch_size, measure_key)
        if key in memo:
            return memo[key]
    res = fit_dip(
        target,
        z,
        seeds,
        cfg,
        reference=reference,
        batch_size=ctx.batch_size,
        amp_dtype=ctx.amp_dtype,
        progress=ctx.progress,
        measure=measure,
        interrupt=ctx.interrupt,
    )
    if memo is not None:
        memo[key] = res
    return res


def image_shape(ctx: Context) -> tuple[int, int, int]:
    """[3, S, S]: the DDPM's image shape (generation and the paper protocol work at the model's size)."""
    s = unet_size(ctx.unet.config)
    return (3, s, s)


def need(value: torch.Tensor | None, what: str, method: str) -> torch.Tensor:
    """A job's input that this method cannot run without (one-line UserError when it is missing)."""
    if value is None:
        raise UserError(f"method {method} needs {what}")
    return value


def dip_target(scheduler: DDPMScheduler, x0: torch.Tensor, t_trunc: int, z: torch.Tensor) -> torch.Tensor:
    """Alg. 2 line 3: x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, with the DIP input's own z (the paper
    protocol's oracle builds it from the clean x0; blind TDPM-DIP from its estimate of x0)."""
    return q_sample(scheduler, x0, t_trunc, z)

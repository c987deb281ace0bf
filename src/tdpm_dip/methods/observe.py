"""The blind protocol's observation model: noisy 8-bit files, the clipping they suffer, and their noise level.

A user's noisy image is what a saved file holds: x0 + n on 0..255, rounded and clipped to 8 bits (`add_noise`,
model "clipped"), or the unclipped x0 + n of denoising papers (model "float"). Every blind diffusion method first
undoes what clipping did to the noise statistics (`declip`), then scales y to the level t* whose noise-to-signal
ratio matches sigma (`noise.sigma_to_level`): sqrt(abar_t*) y is then x_t*.
"""

from __future__ import annotations

import numpy as np
import pywt
import torch
from scipy import ndimage, special

from ..errors import UserError, check_sigma
from ..noise import image_generators, randn

SATURATED_WINDOW = 9  # px: the neighbourhood in which a saturated region is recognised
MIN_SAMPLES = 200  # pixels (or wavelet coefficients) below which an estimate is not trusted
IMPLAUSIBLE_SIGMA = 150.0  # 0..255: an estimate this high is warned about (`implausible_sigmas`)
DRAW_STRIDE = 1_000_003  # seed offset between declip draws of one image (a prime, far from any image's seed)


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
    """Per-image noise std on the 0..255 scale, aware of the clipping of 8-bit files (`sigma_255`)."""
    return [sigma_255(((img.permute(1, 2, 0) + 1.0) * 127.5).numpy()) for img in noisy.detach().float().cpu()]


def sigma_255(y: np.ndarray) -> float:
    """The noise std of one image y (H x W x C, 0..255) whose noise was clipped at 0 and 255.

    Saturated regions first: where the clean image sits on a bound (a white background, black ink), half the
    noise is clipped, so at least ~half of a neighbourhood is stored at the bound, and an unclipped pixel there
    is bound -/+ |n|: the half-normal |n| has median 0.6745 sigma (`_half_normal_sigma`). Elsewhere (no such region: a
    photo without saturation), Donoho's wavelet estimator, the MAD of the finest diagonal db2 coefficients / 0.6745
    (as skimage.restoration.estimate_sigma), on the blocks that no clipped pixel touches. A plain wavelet MAD
    reads the clipped noise of the saturated pixels and comes out far too low on such files.
    """
    y = np.asarray(y, dtype=np.float64)
    tails = []
    for c in range(y.shape[-1]):
        ch = y[..., c]
        for bound in (255.0, 0.0):
            stored = ch == bound
            near = ndimage.uniform_filter(stored.astype(np.float64), SATURATED_WINDOW, mode="reflect") >= 0.45
            tails.append(np.abs(bound - ch[near & ~stored]))
    tail = np.concatenate(tails)
    if tail.size >= MIN_SAMPLES:
        return _half_normal_sigma(tail)
    return _wavelet_sigma(y)


def _half_normal_sigma(tail: np.ndarray) -> float:
    """sigma from 8-bit samples round(|n|) of |n| > 0.5 (a pixel whose clean value sits on a bound is stored off
    it only when its noise exceeds half a level). The median of such integers is read between levels (the
    median of grouped data), then the truncated half-normal's median is solved for sigma:
    2 Phi(m / sigma) - 1 = Phi(0.5 / sigma), which tends to m / 0.6745 for sigma >> 1."""
    values, counts = np.unique(tail, return_counts=True)
    below = np.cumsum(counts) - counts
    k = int(np.searchsorted(np.cumsum(counts), tail.size / 2))
    m = values[k] - 0.5 + (tail.size / 2 - below[k]) / counts[k]
    lo, hi = 0.05, 255.0
    for _ in range(60):  # bisection: the left side falls as sigma grows faster than the right side does
        mid = (lo + hi) / 2
        if 2 * special.ndtr(m / mid) - 1 > special.ndtr(0.5 / mid):
            lo = mid
        else:
            hi = mid
    return float((lo + hi) / 2)


def _wavelet_sigma(y: np.ndarray) -> float:
    """Donoho's MAD estimator on the finest diagonal db2 coefficients of the blocks no clipped pixel touches."""
    coeffs = []
    for c in range(y.shape[-1]):
        _, (_, _, diag) = pywt.dwt2(y[..., c], "db2", mode="symmetric")
        clipped = (y[..., c] <= 0) | (y[..., c] >= 255)
        # db2's diagonal coefficient k spans pixels 2k-2 .. 2k+1 (symmetric extension at the border)
        touched = ndimage.maximum_filter(clipped, size=4, origin=(-2, -2))  # window p .. p+3
        idx = np.clip(2 * np.arange(diag.shape[0]) - 2, 0, y.shape[0] - 1)
        jdx = np.clip(2 * np.arange(diag.shape[1]) - 2, 0, y.shape[1] - 1)
        coeffs.append(diag[~touched[np.ix_(idx, jdx)]])
    d = np.concatenate(coeffs)
    if d.size < MIN_SAMPLES:  # nearly everything saturated: all coefficients, an underestimate
        d = np.concatenate([pywt.dwt2(y[..., c], "db2", mode="symmetric")[1][2].ravel() for c in range(y.shape[-1])])
    return float(np.median(np.abs(d)) / 0.6745)


def blind_sigmas(
    noisy: list[torch.Tensor], sigma: float | None, ask: str = "give --sigma", names: list[str] | None = None
) -> list[float]:
    """The given sigma for every image [3, H, W] (sizes may differ), or each image's own estimate
    (`estimate_sigma`); an estimate of ~0 means a clean-looking image, which blind denoising refuses, naming
    the images (`names`, else their places in the list)."""
    check_sigma(sigma)
    if sigma is not None:
        return [float(sigma)] * len(noisy)
    est = [estimate_sigma(x[None])[0] for x in noisy]
    clean = [names[i] if names is not None else f"image {i}" for i, s in enumerate(est) if s < 0.5]
    if clean:
        which = ", ".join(clean[:3]) + (f" and {len(clean) - 3} more" if len(clean) > 3 else "")
        looks = "looks" if len(clean) == 1 else "look"
        raise UserError(f"{which}: the estimated noise level is ~0 ({looks} clean); {ask}")
    return est


def implausible_sigmas(sigmas: list[float], names: list[str]) -> str | None:
    """A warning for estimates at or above IMPLAUSIBLE_SIGMA: what a binary (1-bit) or synthetic image reads as,
    rather than noise."""
    high = [f"{n} ({s:.0f})" for n, s in zip(names, sigmas) if s >= IMPLAUSIBLE_SIGMA]
    if not high:
        return None
    which = ", ".join(high[:3]) + (f" and {len(high) - 3} more" if len(high) > 3 else "")
    return (
        f"warning: {which}: an estimated sigma this high is more often a binary (1-bit) or synthetic image than "
        "noise; give --sigma if you know it"
    )

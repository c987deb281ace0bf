"""Blind denoising at photo size: quality and cost of the ensemble's symmetries on large images.

The first --n images of --data, padded to a square with white and resized to --side px (Lanczos), get 8-bit noise
of sigma --sigma (rounded and clipped; numpy seed 0), and are denoised by the shipped denoiser's `ensemble` with
all 8 symmetries, with the default for that size (`methods.blind.ensemble_size`) and with 1 (= tweedie). Prints
one line per image and setting: NFE, seconds, PSNR and SSIM (scikit-image defaults on uint8) against the resized
clean image, and the load average.

    python benchmarks/photo_size.py --data data/pokemon/test --n 2 --side 512 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tdpm_dip.api import Denoiser
from tdpm_dip.images import to_uint8


def photo(path: Path, side: int) -> np.ndarray:
    """The image padded to a square with white, resized to side x side (Lanczos), as uint8 HWC."""
    im = Image.open(path).convert("RGB")
    n = max(im.size)
    canvas = Image.new("RGB", (n, n), "white")
    canvas.paste(im, ((n - im.size[0]) // 2, (n - im.size[1]) // 2))
    return np.asarray(canvas.resize((side, side), Image.LANCZOS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean images (e.g. data/pokemon/test)")
    ap.add_argument("--n", type=int, default=2, help="images")
    ap.add_argument("--side", type=int, default=512, help="side of the square test images, px")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on 0..255")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    den = Denoiser.from_pretrained(None, "cpu", "auto", 8)
    rng = np.random.default_rng(0)
    files = sorted(p for p in Path(args.data).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for path in files[: args.n]:
        clean = photo(path, args.side)
        noisy = np.clip(np.round(clean + rng.normal(0, args.sigma, clean.shape)), 0, 255).astype(np.uint8)
        y = torch.from_numpy(noisy.copy()).permute(2, 0, 1).float() / 127.5 - 1
        for label, options in (("8 symmetries", {"symmetries": 8}), ("default", {}), ("1 symmetry", {"symmetries": 1})):
            t0 = time.perf_counter()
            out, _, nfe = den.denoise_tensors([y], [args.sigma], "ensemble", [0], **options)
            seconds = time.perf_counter() - t0
            o = to_uint8(out[0])
            psnr = peak_signal_noise_ratio(clean, o, data_range=255)
            ssim = structural_similarity(clean, o, channel_axis=2, data_range=255)
            print(
                f"{path.name} | ensemble, {label} | NFE {nfe:g} | {seconds:.1f} s | {psnr:.2f} / {ssim:.4f} | "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

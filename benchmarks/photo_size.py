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

import numpy as np
import torch
from denoise_files import score  # the sibling benchmark (this script's folder is on sys.path)
from PIL import Image

from tdpm_dip.api import Denoiser
from tdpm_dip.data import list_images, pil_to_tensor, square_resize


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
    files = list_images(args.data)
    for path in files[: args.n]:
        clean = np.asarray(square_resize(Image.open(path).convert("RGB"), args.side))
        noisy = np.clip(np.round(clean + rng.normal(0, args.sigma, clean.shape)), 0, 255).astype(np.uint8)
        y = pil_to_tensor(Image.fromarray(noisy))
        for label, options in (("8 symmetries", {"symmetries": 8}), ("default", {}), ("1 symmetry", {"symmetries": 1})):
            t0 = time.perf_counter()
            out, _, nfe = den.denoise_tensors([y], [args.sigma], "ensemble", [0], **options)
            seconds = time.perf_counter() - t0
            psnr, ssim = score(out, [clean])
            print(
                f"{path.name} | ensemble, {label} | NFE {nfe:g} | {seconds:.1f} s | {psnr:.2f} / {ssim:.4f} | "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

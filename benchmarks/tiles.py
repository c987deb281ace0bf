"""Tiled inference for large images: seams and cost.

Seams: the first --n test files (64 px) upsampled to --side px (Lanczos), 8-bit noise of sigma --sigma (numpy
seed 0), denoised by the shipped denoiser's `ensemble` whole and in tiles (`methods.dispatch.run_native`, the
default tiles), with the same symmetries (--symmetries); prints PSNR of each against the upsampled clean image
and their difference. Cost: seconds per megapixel of the tiled default at each --cost-sides (one image each, one
network call per pixel: --symmetries 1).

    python benchmarks/tiles.py --data data/pokemon/test --n 4 --side 512 --cost-sides 512,1024,3000
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from tdpm_dip.api import Denoiser
from tdpm_dip.data import list_images, pil_to_tensor
from tdpm_dip.images import to_uint8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean 64 px images (e.g. data/pokemon/test)")
    ap.add_argument("--n", type=int, default=4, help="images for the seam test (0: none)")
    ap.add_argument("--side", type=int, default=512, help="side the test images are upsampled to, px")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on 0..255")
    ap.add_argument("--symmetries", type=int, default=1, help="ensemble symmetries (the same whole and tiled)")
    ap.add_argument("--cost-sides", default="", help="comma-separated sides for the cost per megapixel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=8, help="images at once")
    ap.add_argument(
        "--no-declip",
        action="store_true",
        help="no declip draws: whole and tiled then see the same observation (the tiles draw their own excess)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    den = Denoiser.from_pretrained(None, "cpu", "auto", args.batch_size)
    den.max_pixels = 10**9
    rng = np.random.default_rng(0)
    diffs = []
    for path in list_images(args.data)[: args.n]:
        clean = np.asarray(Image.open(path).convert("RGB").resize((args.side, args.side), Image.Resampling.LANCZOS))
        noisy = np.clip(np.round(clean + rng.normal(0, args.sigma, clean.shape)), 0, 255).astype(np.uint8)
        y = pil_to_tensor(Image.fromarray(noisy))
        scores = {}
        for label, tile in (("whole", 10**9), ("tiled", None)):
            den.tile = tile
            t0 = time.perf_counter()
            out, _, _ = den.denoise_tensors(
                [y], [args.sigma], "ensemble", [0], symmetries=args.symmetries, declip=not args.no_declip
            )
            seconds = time.perf_counter() - t0
            scores[label] = peak_signal_noise_ratio(clean, to_uint8(out[0]), data_range=255)
            print(f"{path.name} | {label} | {scores[label]:.3f} dB | {seconds:.1f} s", flush=True)
        diffs.append(scores["tiled"] - scores["whole"])
        print(f"{path.name} | tiled - whole | {diffs[-1]:+.3f} dB | load {os.getloadavg()[0]:.2f}", flush=True)
    if diffs:
        print(
            f"mean tiled - whole over {len(diffs)} images: {np.mean(diffs):+.3f} dB (max |d| {np.abs(diffs).max():.3f})"
        )
    den.tile = None
    for side in [int(s) for s in args.cost_sides.split(",") if s]:
        y = pil_to_tensor(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        t0 = time.perf_counter()
        den.denoise_tensors([y], [args.sigma], "ensemble", [0], symmetries=1)
        seconds = time.perf_counter() - t0
        print(
            f"cost | {side}x{side} | {seconds:.1f} s | {seconds / (side * side / 1e6):.1f} s/Mpx | "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

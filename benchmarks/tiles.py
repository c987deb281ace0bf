"""Tiled inference for large images: seams and cost.

Seams: the first --n test files (64 px) upsampled to --side px (Lanczos), 8-bit noise of sigma --sigma (numpy
seed 0), denoised by the shipped denoiser's `ensemble` whole and in tiles (`methods.dispatch.run_native`, the
default tiles, or each side of --tiles), with the same symmetries (--symmetries); prints PSNR of each against the
upsampled clean image and their difference, over the whole image, over the pixels that no tile sees with its full
context (within every covering tile's blending ramp: where a seam would show) and over the rest. Cost: seconds
per megapixel of the tiles at each --cost-sides (one image each, one network call per pixel: --symmetries 1).

    python benchmarks/tiles.py --data data/pokemon/test --n 8 --side 512 --tiles 192,256 --cost-sides 512,3000
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
from tdpm_dip.methods.dispatch import TILE_OVERLAP_DIVISOR, tile_side
from tdpm_dip.methods.tiles import Tiling


def seam_pixels(side: int, tile: int) -> np.ndarray:
    """[side, side] True where every tile covering the pixel is within its blending ramp (no tile sees the pixel
    with its full context): where a seam would show. The image's own border is left out (the whole image has it
    too)."""
    tiling = Tiling(tile, tile // TILE_OVERLAP_DIVISOR)
    best = np.zeros((side, side))
    window = tiling.window(tile, tile).numpy()
    for y, x, th, tw in tiling.boxes(side, side):
        best[y : y + th, x : x + tw] = np.maximum(best[y : y + th, x : x + tw], window[:th, :tw])
    r = tiling.overlap
    inner = np.zeros((side, side), dtype=bool)
    inner[r:-r, r:-r] = True
    return (best < 1) & inner


def psnr_where(clean: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    err = (clean.astype(np.float64) - out.astype(np.float64))[mask]
    return float(10 * np.log10(255.0**2 / np.mean(err**2)))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean 64 px images (e.g. data/pokemon/test)")
    ap.add_argument("--n", type=int, default=4, help="images for the seam test (0: none)")
    ap.add_argument("--side", type=int, default=512, help="side the test images are upsampled to, px")
    ap.add_argument("--sigma", type=float, default=25.0, help="noise std on 0..255")
    ap.add_argument("--symmetries", type=int, default=1, help="ensemble symmetries (the same whole and tiled)")
    ap.add_argument("--cost-sides", default="", help="comma-separated sides for the cost per megapixel")
    ap.add_argument(
        "--tiles", default="", help="comma-separated tile sides for the seam test and the cost (default: the default)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=8, help="images at once")
    ap.add_argument(
        "--no-declip",
        action="store_true",
        help="no declip draws: whole and tiled then see the same observation (the tiles draw their own excess)",
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="also run the whole image with another seed (another declip draw): how far two whole runs differ",
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    den = Denoiser.from_pretrained(None, "cpu", "auto", args.batch_size)
    den.max_pixels = 10**9
    rng = np.random.default_rng(0)
    tiles = [int(t) for t in args.tiles.split(",") if t] or [None]
    seams(args, den, rng, tiles)
    cost(args, den, rng, tiles)


def seams(args: argparse.Namespace, den: Denoiser, rng: np.random.Generator, tiles: list[int | None]) -> None:
    """The seam test: each image whole and in tiles (and, with --control, whole with another seed)."""
    diffs: dict[int | None, list[float]] = {t: [] for t in tiles}
    control: list[float] = []
    for path in list_images(args.data)[: args.n]:
        clean = np.asarray(Image.open(path).convert("RGB").resize((args.side, args.side), Image.Resampling.LANCZOS))
        noisy = np.clip(np.round(clean + rng.normal(0, args.sigma, clean.shape)), 0, 255).astype(np.uint8)
        y = pil_to_tensor(Image.fromarray(noisy))
        scores, outs = {}, {}
        runs = [("whole", 10**9, 0)] + [(f"tiled {t or 'default'}", t, 0) for t in tiles]
        runs += [("whole, seed 1", 10**9, 1)] if args.control else []
        for label, tile, seed in runs:
            den.tile = tile
            t0 = time.perf_counter()
            out, _, _ = den.denoise_tensors(
                [y], [args.sigma], "ensemble", [seed], symmetries=args.symmetries, declip=not args.no_declip
            )
            seconds = time.perf_counter() - t0
            outs[label] = to_uint8(out[0])
            scores[label] = peak_signal_noise_ratio(clean, outs[label], data_range=255)
            print(f"{path.name} | {label} | {scores[label]:.3f} dB | {seconds:.1f} s", flush=True)
        for t in tiles:
            label = f"tiled {t or 'default'}"
            diffs[t].append(scores[label] - scores["whole"])
            band = seam_pixels(args.side, t or tile_side(den.ctx))
            # a seam would show near the tiles' edges: compare those pixels with the rest of the image
            d_band = (
                psnr_where(clean, outs[label], band) - psnr_where(clean, outs["whole"], band) if band.any() else 0.0
            )
            d_rest = psnr_where(clean, outs[label], ~band) - psnr_where(clean, outs["whole"], ~band)
            print(
                f"{path.name} | {label} - whole | {diffs[t][-1]:+.3f} dB | near tile edges {d_band:+.3f} dB, "
                f"elsewhere {d_rest:+.3f} dB ({band.mean():.0%} of the image near edges) | "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        if args.control:
            control.append(scores["whole, seed 1"] - scores["whole"])
            print(f"{path.name} | whole, seed 1 - whole | {control[-1]:+.3f} dB", flush=True)
    if control:
        print(f"another seed, whole: mean {np.mean(control):+.3f} dB (max |d| {np.abs(control).max():.3f})")
    for t, d in diffs.items():
        if d:
            print(
                f"tiles {t or 'default'}: mean tiled - whole over {len(d)} images: {np.mean(d):+.3f} dB "
                f"(max |d| {np.abs(d).max():.3f})"
            )


def cost(args: argparse.Namespace, den: Denoiser, rng: np.random.Generator, tiles: list[int | None]) -> None:
    """Seconds per megapixel at each --cost-sides, a random image each."""
    for tile, side in [(t, int(s)) for t in tiles for s in args.cost_sides.split(",") if s]:
        den.tile = tile
        y = pil_to_tensor(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        t0 = time.perf_counter()
        den.denoise_tensors([y], [args.sigma], "ensemble", [0], symmetries=1)
        seconds = time.perf_counter() - t0
        print(
            f"cost | tiles {tile or 'default'} | {side}x{side} | {seconds:.1f} s | "
            f"{seconds / (side * side / 1e6):.1f} s/Mpx | load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Blind denoising at the image's own size: quality and s/img against image size.

For each size S, the test images are resized (Lanczos, aspect kept, longer side S; not padded, so most
are not square), noised as 8-bit files (sigma on 0..255, rounded, clipped), and denoised two ways:
  native  `methods.run_native`: the networks run at the image's size (reflect-padded to their multiple);
  resize  what `denoise` did before: pad to a square, resize to the model's size, denoise, resize back.
PSNR/SSIM are against the clean image at size S.

    python benchmarks/native_size.py --model M --data DIR --n 4 --sizes 64,128,224 --method ensemble
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from tdpm_dip.data import list_images, pil_to_tensor, to_rgb
from tdpm_dip.methods import Context, Job, run_native
from tdpm_dip.metrics import psnr, ssim
from tdpm_dip.noise import add_noise
from tdpm_dip.outputs import markdown_table
from tdpm_dip.runtime import load_context


def resized(path: str, side: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = to_rgb(im)
        s = side / max(im.size)
        im = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.LANCZOS)
        return pil_to_tensor(im)


def via_model_size(ctx: Context, method: str, y: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Pad to a square with white, resize to the model's size, denoise, resize back, crop."""
    size = int(ctx.unet.config.sample_size)
    _, h, w = y.shape
    side = max(h, w)
    sq = torch.ones(3, side, side)
    top, left = (side - h) // 2, (side - w) // 2
    sq[:, top : top + h, left : left + w] = y
    small = torch.nn.functional.interpolate(sq[None], size=(size, size), mode="bicubic", antialias=True)
    # The noise std shrinks with the downscaling (about side / size pixels averaged per side).
    sig = sigma * size / side
    out = run_native(ctx, method, Job((seed,), noisy=small.clamp(-1, 1), sigma=(sig,))).images
    big = torch.nn.functional.interpolate(out, size=(side, side), mode="bicubic")[0]
    return big[:, top : top + h, left : left + w].clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--method", default="ensemble")
    ap.add_argument("--sigma", type=float, default=25.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # On the CPU in fp32, one image at a time, with the blind DIP settings of dip-small (and its plug-in DIP).
    ctx, _ = load_context(
        args.model, device="cpu", dtype="fp32", batch_size=1, dip_use="blind", dip_preset="dip-small", progress=False
    )
    files = list_images(args.data)[: args.n]
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        res = {"native": [], "resize": []}
        secs = {"native": 0.0, "resize": 0.0}
        shapes = []
        for i, f in enumerate(files):
            x = resized(str(f), side)
            shapes.append(tuple(x.shape[1:]))
            y = add_noise(x[None], args.sigma, [i], "clipped")[0]
            for how in ("native", "resize"):
                t0 = time.perf_counter()
                if how == "native":
                    out = run_native(ctx, args.method, Job((i,), noisy=y[None], sigma=(args.sigma,))).images[0]
                else:
                    out = via_model_size(ctx, args.method, y, args.sigma, i)
                secs[how] += time.perf_counter() - t0
                assert out.shape == x.shape
                res[how].append((float(psnr(out[None], x[None])), float(ssim(out[None], x[None]))))
        for how in ("native", "resize"):
            p, s = np.mean(res[how], axis=0)
            rows.append(
                {
                    "longer side": side,
                    "sizes": " ".join(f"{h}x{w}" for h, w in shapes[:3]),
                    "how": how,
                    "method": args.method,
                    "PSNR": round(p, 2),
                    "SSIM": round(s, 4),
                    "s/img": round(secs[how] / len(files), 2),
                }
            )
    print(f"load average {os.getloadavg()[0]:.2f}, n = {len(files)}, sigma {args.sigma:g}, clipped 8-bit")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

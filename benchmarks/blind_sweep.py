"""Blind denoising, quality against cost, over noise levels and noise models (one table, one figure).

Runs `tdpm-dip bench table2 --protocol blind` once per (sigma, noise model) into OUT/s<sigma>-<noise>
(rows are cached there, so a re-run or an interrupted sweep only computes what is missing), then
writes OUT/sweep.md (PSNR, SSIM, NFE, s/img of every method in every setting) and OUT/sweep_cost.png.

    python benchmarks/blind_sweep.py --model M --data DIR --n 32 --sigmas 15,25,50 --noises clipped,float \
        --methods tweedie,ensemble,ddim,bm3d --out runs/sweep
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tdpm_dip.cli import main as cli_main
from tdpm_dip.outputs import markdown_table, write_text
from tdpm_dip.reporting import cost_figure


def run_setting(args: argparse.Namespace, sigma: float, noise: str) -> Path:
    out = Path(args.out) / f"s{sigma:g}-{noise}"
    argv = [
        "bench",
        "table2",
        "--protocol",
        "blind",
        "--model",
        args.model,
        "--data",
        args.data,
        "--n",
        str(args.n),
        "--sigma",
        str(sigma),
        "--noise",
        noise,
        "--dip-preset",
        args.dip_preset,
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(out),
    ]
    if args.methods:
        argv += ["--methods", args.methods]
    try:
        cli_main(argv)
    except SystemExit as e:
        if e.code:
            raise
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="DDPM folder (diffusers layout)")
    ap.add_argument("--data", required=True, help="clean test images")
    ap.add_argument("--n", type=int, default=32, help="test images")
    ap.add_argument("--sigmas", default="15,25,50", help="noise std on 0..255, comma-separated")
    ap.add_argument("--noises", default="clipped,float", help="noise models, comma-separated")
    ap.add_argument("--methods", default="", help="blind methods (default: all of the registry)")
    ap.add_argument("--dip-preset", default="dip-small", help="DIP network of the dip / tdpm-dip rows")
    ap.add_argument("--batch-size", type=int, default=8, help="images at once")
    ap.add_argument("--out", required=True, help="sweep folder")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, points = [], []
    for noise in args.noises.split(","):
        for sigma in (float(s) for s in args.sigmas.split(",")):
            res = json.loads((run_setting(args, sigma, noise) / "table2.json").read_text())
            for r in res["rows"]:
                n = r["n"]
                rows.append(
                    {
                        "noise": noise,
                        "sigma": f"{sigma:g}",
                        "method": r["method"],
                        "n": n,
                        "input PSNR": round(r["input PSNR"], 2),
                        "PSNR": round(r[f"PSNR@{n}"], 2),
                        "SSIM": round(r[f"SSIM@{n}"], 4),
                        "NFE": r["NFE"],
                        "s/img": round(r["s/img"], 2),
                    }
                )
                points.append(
                    {
                        "label": f"{r['method']}",
                        "group": f"sigma {sigma:g} {noise}",
                        "PSNR": r[f"PSNR@{n}"],
                        "SSIM": r[f"SSIM@{n}"],
                        "NFE": r["NFE"],
                        "s/img": r["s/img"],
                    }
                )
    out = Path(args.out)
    load = os.getloadavg()
    write_text(
        out / "sweep.md",
        f"# Blind denoising: quality against cost\n\nmodel {args.model}, data {args.data}, "
        f"n = {args.n}, load average at the end {load[0]:.2f}\n\n" + markdown_table(rows) + "\n\n"
        "![quality against cost](sweep_cost.png)\n",
    )
    cost_figure(out / "sweep_cost.png", points, f"blind denoising, n = {args.n}")
    print((out / "sweep.md").read_text())


if __name__ == "__main__":
    main()

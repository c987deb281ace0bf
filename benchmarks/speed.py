#!/usr/bin/env python
"""Speed of TDPM-DIP denoising, DDPM generation and DDPM training, in one process, on one device.

    python benchmarks/speed.py --preset tiny                       # CPU smoke run
    python benchmarks/speed.py --preset paper --out speed.json     # GPU: the report's networks at 64x64

benchmarks/README.md says what each section and row measures, how the timing is done, and how to run this
on a GPU machine whose Python lacks diffusers.

Layout: shared pieces in speed_common.py (`Row`, `Table`, `Bench`: the options, the DDPM under test, the DIP's
inputs and the networks' FLOPs), one class per row family (`DipRows` in speed_dip.py, `DdpmRows` and `TrainRows`
in speed_ddpm.py), and here the floors, the Markdown table and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

# tdpm_dip from ../src needs no installation; fastdip and the speed_* modules sit next to this script
# (benchmarks/ is no package).
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent / "src", _HERE):
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from fastdip import IMPLS  # noqa: E402
from speed_common import Bench, Row, build_unet_meta, fmt  # noqa: E402
from speed_ddpm import DdpmRows, TrainRows  # noqa: E402
from speed_dip import DipRows  # noqa: E402

SECTIONS = ("baseline", "vmap", "fast", "compile", "ddpm", "train")

PRESET_SETS = {
    # CPU smoke run: tiny networks.
    "tiny": dict(
        dip="dip-tiny",
        vmap="dip-tiny",
        ddpm="tiny",
        size=32,
        n_images=4,
        baseline_images=2,
        slow_images=4,
        ddpm_batches="1,4",
        train_batch=16,
        baseline_ddpm_steps=10,
    ),
    # The report's networks at 64x64.
    "paper": dict(
        dip="paper-dip",
        vmap="paper-dip-noattn",
        ddpm="paper-ddpm",
        size=64,
        n_images=200,
        baseline_images=2,
        slow_images=32,
        ddpm_batches="64,256,auto",
        train_batch=128,
        baseline_ddpm_steps=20,
    ),
}

# HBM bandwidth (TB/s) of a few cards, for the optimizer-traffic floor printed with the DIP section.
_BANDWIDTH_TBS = {"H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8, "A100": 2.0, "L4": 0.3, "T4": 0.32}

# ---------------------------------------------------------------------------------------------- floors


def dip_floors(bench: Bench) -> dict:
    """Lower bounds per image for the DIP: FLOPs, and the optimizer-state traffic of fp32 Adam."""
    a = bench.args
    params = sum(p.numel() for p in build_unet_meta(a.dip_preset, a.size).parameters())
    # fused Adam reads p, g, m, v and writes p, m, v (7 x 4 bytes); the gradient is written once (4 bytes).
    bytes_per_img = 32 * params * a.iters
    out = {
        "dip_params": params,
        "dip_tflop_per_img": bench.dip_flops("dip", 1) / 1e12,
        "adam_state_traffic_gb_per_img": bytes_per_img / 1e9,
    }
    bw = a.mem_bw
    if bw is None and bench.cuda:
        name = torch.cuda.get_device_name(bench.dev)
        bw = next((v for k, v in _BANDWIDTH_TBS.items() if k in name), None)
    if bw:
        out["hbm_tb_per_s"] = bw
        out["adam_traffic_floor_ms_per_img"] = bytes_per_img / (bw * 1e12) * 1e3
    return out


# -------------------------------------------------------------------------------------------- output


def markdown(rows: list[Row]) -> str:
    head = [
        "section",
        "method",
        "preset",
        "batch",
        "dtype",
        "s/img",
        "speed-up",
        "TFLOP/s",
        "peak GiB",
        "PSNR",
        "dPSNR",
        "dSSIM",
        "warm-up s",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            cells = [r.section, r.method, r.preset, str(r.batch), r.dtype, "error", "", "", "", "", "", "", "", r.error]
        else:
            cells = [
                r.section,
                r.method,
                r.preset,
                str(r.batch),
                r.dtype,
                fmt(r.s_per_img, 4),
                "n/a" if r.ratio is None else f"{r.ratio:.3g}x",
                fmt(r.tflops),
                fmt(r.peak_mem_gib),
                fmt(r.psnr, 4),
                "n/a" if r.d_psnr is None else f"{r.d_psnr:+.3f}",
                "n/a" if r.d_ssim is None else f"{r.d_ssim:+.4f}",
                fmt(r.warmup_s),
                r.notes,
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def floors_line(args: argparse.Namespace, floors: dict) -> str:
    msg = (
        f"DIP floors per image ({args.dip_preset}, {floors['dip_params'] / 1e6:.1f}M params, {args.iters} it): "
        f"{fmt(floors['dip_tflop_per_img'])} TFLOP (DIP + chain); fp32 Adam state traffic "
        f"{fmt(floors['adam_state_traffic_gb_per_img'])} GB"
    )
    if "adam_traffic_floor_ms_per_img" in floors:
        msg += f" = {fmt(floors['adam_traffic_floor_ms_per_img'])} ms at {floors['hbm_tb_per_s']} TB/s"
    return msg


# -------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESET_SETS),
        default="tiny",
        help="tiny: CPU smoke (dip-tiny / tiny); paper: paper-dip (+ paper-dip-noattn for vmap) / paper-ddpm",
    )
    ap.add_argument("--size", type=int, default=None, help="image side (default: tiny 32, paper 64)")
    ap.add_argument("--n-images", type=int, default=None, help="images for the fast DIP rows (tiny 4, paper 200)")
    ap.add_argument("--baseline-images", type=int, default=None, help="images for the slow report-style loop")
    ap.add_argument("--slow-images", type=int, default=None, help="images for the fit_dip vmap rows (tiny 4, paper 32)")
    ap.add_argument("--batch", type=int, default=None, help="DIP batch for all batched rows (default: auto on CUDA)")
    ap.add_argument("--max-batch", type=int, default=64, help="cap of the automatic DIP batch")
    ap.add_argument("--cpu-batch", type=int, default=4, help="DIP batch on the CPU when --batch is not given")
    ap.add_argument("--iters", type=int, default=100, help="DIP Adam iterations")
    ap.add_argument("--t-trunc", type=int, default=10, help="truncated chain steps after the DIP")
    ap.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM generation steps (s/img scaled to this)")
    ap.add_argument(
        "--baseline-ddpm-steps",
        type=int,
        default=None,
        help="steps timed for the fp32 batch-1 DDPM baseline, extrapolated to --ddpm-steps",
    )
    ap.add_argument("--ddpm-batches", default=None, help="comma list; 'auto' = largest that fits (CUDA only)")
    ap.add_argument("--ddpm-max-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=None, help="DDPM training batch (tiny 16, paper 128)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--dip-preset", default=None, help="override the DIP network of the baseline / fast rows")
    ap.add_argument("--vmap-preset", default=None, help="override the DIP network of the fit_dip vmap rows")
    ap.add_argument("--ddpm-preset", default=None, help="override the DDPM network")
    ap.add_argument("--model", default=None, help="a diffusers DDPM folder to load instead of a random init")
    ap.add_argument("--impls", default=",".join(IMPLS), help="fastdip conv implementations to time in bf16")
    ap.add_argument(
        "--fast-init",
        choices=["auto", "cpu", "device"],
        default="auto",
        help="fastdip initialisation (auto: device on CUDA, cpu = build_unet(seed) as fit_dip)",
    )
    ap.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile rows (auto: CUDA only)"
    )
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    ap.add_argument("--skip", default="", help=f"comma list of {', '.join(SECTIONS)}, and dip (the whole DIP section)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--mem-bw", type=float, default=None, help="HBM TB/s for the Adam traffic floor (default: by card name)"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--out", default=None, help="write the rows and environment as JSON")
    return ap


def resolve_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill what --preset decides, turn the comma lists into lists and check them (ap.error on a bad one)."""
    d = PRESET_SETS[args.preset]
    for k in (
        "size",
        "n_images",
        "baseline_images",
        "slow_images",
        "ddpm_batches",
        "train_batch",
        "baseline_ddpm_steps",
    ):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    args.dip_preset = args.dip_preset or d["dip"]
    args.vmap_preset = args.vmap_preset or d["vmap"]
    args.ddpm_preset = args.ddpm_preset or d["ddpm"]
    args.skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    bad = set(args.skip) - set(SECTIONS) - {"dip"}
    if bad:
        ap.error(f"--skip: unknown {', '.join(sorted(bad))}")
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if set(args.impls) - set(IMPLS) or not args.impls:
        ap.error(f"--impls: choose among {', '.join(IMPLS)}")
    cuda = args.device.startswith("cuda")
    args.fast_init = ("device" if cuda else "cpu") if args.fast_init == "auto" else args.fast_init
    args.compile_on = args.compile == "on" or (args.compile == "auto" and cuda)
    for k in ("n_images", "baseline_images", "slow_images", "iters", "ddpm_steps", "train_batch", "train_steps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    return resolve_args(ap, ap.parse_args(argv))


# --------------------------------------------------------------------------------------- environment


def vmap_conv_autocast_dtype(dev: torch.device) -> str:
    """Dtype of a conv2d run under vmap inside bf16 autocast (float32 where vmap escapes autocast)."""
    try:
        from torch.func import vmap

        w, x = torch.randn(2, 4, 4, 3, 3, device=dev), torch.randn(2, 1, 4, 8, 8, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return str(vmap(lambda w_, x_: torch.nn.functional.conv2d(x_, w_, padding=1))(w, x).dtype)
    except Exception as e:
        return f"probe failed: {type(e).__name__}"


def environment(dev: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "vmap_conv_dtype_under_bf16_autocast": vmap_conv_autocast_dtype(dev),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        env.update(
            gpu=torch.cuda.get_device_name(dev),
            cuda=torch.version.cuda,
            gpu_mem_gib=torch.cuda.get_device_properties(dev).total_memory / 2**30,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return env


# ---------------------------------------------------------------------------------------------- main


def print_setup(bench: Bench, env: dict) -> None:
    print(
        f"  conv2d under vmap inside bf16 autocast runs in {env['vmap_conv_dtype_under_bf16_autocast']} "
        "(float32: fit_dip's vmap bf16 rows run their convolutions in fp32, as on the CPU, whose autocast "
        "list lacks aten::convolution, which vmap's conv batch rule calls)",
        flush=True,
    )
    print("  forward GFLOP at batch 1: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in bench.flops.items()), flush=True)


def run_sections(bench: Bench) -> None:
    """The sections in their fixed order (dip, ddpm, train), each unless --skip names it."""
    for name, section in (("dip", DipRows), ("ddpm", DdpmRows), ("train", TrainRows)):
        if name not in bench.skip:
            section(bench).run()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    env = environment(dev)
    print(
        f"speed.py --preset {args.preset} on {env.get('gpu', dev)} (torch {env['torch']}, "
        f"diffusers {env.get('diffusers')}); DIP {args.dip_preset} / vmap {args.vmap_preset}, DDPM "
        f"{args.model or args.ddpm_preset}, {args.size}x{args.size}",
        flush=True,
    )
    t0 = time.perf_counter()
    bench = Bench(args)
    print_setup(bench, env)
    run_sections(bench)
    floors = dip_floors(bench)
    table = markdown(bench.table.rows)
    print()
    print(table)
    print()
    print(floors_line(args, floors))
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    result = {
        "env": env,
        "args": dict(vars(args)),
        "flops_per_forward": bench.flops,
        "floors": floors,
        "batch_probes": bench.batch_probes,
        "images": bench.data.source,
        "rows": [asdict(r) for r in bench.table.rows],
        "markdown": table,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

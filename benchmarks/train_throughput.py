"""Training throughput of Algorithm 1: images/s, model TFLOP/s and peak memory for one preset.

Times the same step as `tdpm_dip.training.ddpm` (draws, add_noise, eps-MSE, backward, clipping, AdamW, EMA)
on synthetic data, without data loading, logging or checkpoints:

    python benchmarks/train_throughput.py --preset small --batch-size 32 --steps 20 --warmup 3 --device auto

FLOPs are counted once with torch.utils.flop_counter on a batch-1 forward+backward (convolutions, matmuls
and attention; FLOPs are linear in the batch) and scaled, so TFLOP/s is the model's useful work only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from tdpm_dip.config import PRESETS
from tdpm_dip.devices import synchronize, timer
from tdpm_dip.models import build_unet, count_params
from tdpm_dip.noise import make_scheduler
from tdpm_dip.training.ddpm import diffusion_loss, step_draws
from tdpm_dip.training.loop import EMA, resolve_mixed_precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision -> autocast dtype


def count_step_flops(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    size: int,
    device: torch.device,
    amp: contextlib.AbstractContextManager,
) -> int:
    """Model FLOPs of one forward+backward at batch 1 (the optimizer and EMA are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, t, eps = step_draws(0, 1, size, 0, None, device)
    x0 = torch.zeros(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with amp:
            loss = diffusion_loss(unet, scheduler, x0, t, eps)
        loss.backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotune)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        ap.error("--batch-size and --steps must be > 0, --warmup >= 0")
    return args


def _setup_device(args: argparse.Namespace) -> tuple[torch.device, str]:
    """The device and the mixed precision the training loop would pick there (auto: none on the CPU)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    mixed = (
        resolve_mixed_precision(args.mixed_precision)
        if device.type == "cuda"
        else ("no" if args.mixed_precision == "auto" else args.mixed_precision)
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training/ddpm.py does
        torch.backends.cudnn.allow_tf32 = True
    return device, mixed


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def _train_step(
    args: argparse.Namespace, unet: torch.nn.Module, scheduler: DDPMScheduler, device: torch.device, mixed: str
) -> Callable[[int], None]:
    """Step i of `tdpm_dip.training.ddpm` (draws, flips, eps-MSE, backward, clipping, AdamW, EMA) on a fixed set
    of random images, batch i taken from them in turn."""
    amp_dtype = AMP_DTYPES.get(mixed)
    ema = EMA(unet, 0.999)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed == "fp16")
    images = torch.rand(max(args.batch_size, 64), 3, args.size, args.size, device=device) * 2 - 1

    def step(i: int) -> None:
        flips, t, eps = step_draws(i, args.batch_size, args.size, 0, None, device)
        x0 = images[torch.arange(i, i + args.batch_size, device=device) % len(images)]
        x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        with _autocast(device, amp_dtype):
            loss = diffusion_loss(unet, scheduler, x0, t, eps)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(unet)

    return step


def _time_steps(step: Callable[[int], None], args: argparse.Namespace, device: torch.device) -> float:
    """Seconds of --steps steps after --warmup untimed ones (peak memory counted from the first timed step)."""
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timer(device) as tm:
        for i in range(args.steps):
            step(args.warmup + i)
    return tm[0]


def main() -> None:
    args = _parse_args()
    device, mixed = _setup_device(args)
    amp_dtype = AMP_DTYPES.get(mixed)
    scheduler = make_scheduler("linear")
    unet = build_unet(args.preset, seed=0, sample_size=args.size).to(device).train()
    step = _train_step(args, unet, scheduler, device, mixed)
    flops_per_image = count_step_flops(unet, scheduler, args.size, device, _autocast(device, amp_dtype))
    dt = _time_steps(step, args, device)

    img_s = args.steps * args.batch_size / dt
    res = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"),
        "preset": args.preset,
        "params_m": round(count_params(unet) / 1e6, 2),
        "batch_size": args.batch_size,
        "size": args.size,
        "mixed_precision": mixed,
        "steps": args.steps,
        "s_per_step": round(dt / args.steps, 4),
        "images_per_s": round(img_s, 2),
        "gflop_per_image_fwd_bwd": round(flops_per_image / 1e9, 2),
        "tflop_s": round(img_s * flops_per_image / 1e12, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()

"""The edge where devices, dtypes, threads and processes are chosen, and the one place that builds a Context.

Everything below this module takes a device and a dtype as given; the commands, the app and the Python API
call `load_context` with the user's choices ("auto" resolves them here).
"""

from __future__ import annotations

import os

import torch

from . import defaults
from .dip import DIPConfig, dip_defaults
from .embedded import resolve_model
from .errors import UserError, check_positive
from .methods import Context
from .methods.shard import Shard, launched
from .models import load_ddpm, trained_levels
from .restoration_net import model_restorer


def pick_device(name: str) -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'; a one-line UserError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    return dev


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16; Linux reports it in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_amp(name: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision for the networks: 'auto' is bf16 autocast on GPUs and on CPUs that compute bf16 natively
    (there the UNets run 2-4x faster at the same PSNR to 0.01 dB), else fp32."""
    if name not in defaults.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(defaults.DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_dip_preset(name: str, device: torch.device) -> str:
    """'auto': the report's DIP on a GPU; on a CPU, where it takes about a minute per image, dip-small."""
    if name not in ("auto", *defaults.DIP_PRESETS):
        raise UserError(f"--dip-preset must be one of auto, {', '.join(defaults.DIP_PRESETS)}, got {name!r}")
    if name != "auto":
        return name
    return "paper-dip" if device.type == "cuda" else "dip-small"


def pick_threads(threads: int = 0) -> int:
    """CPU threads for torch: `threads` if > 0; else all cores on an idle machine, 1 on a busy one.

    A second intra-op thread speeds small networks up when the cores are free, but on cores that other
    processes keep busy, OpenMP threads that wait for each other are catastrophically slow (tens of times
    slower), so a machine whose 1-minute load average reaches half its cores gets one thread.
    """
    cpus = os.cpu_count() or 1
    if not 0 <= threads <= cpus:  # more threads than CPUs only wait for each other (and OpenMP may run out of memory)
        raise UserError(f"--threads must be in 0..{cpus} (this machine's CPUs; 0: chosen by load), got {threads}")
    if threads > 0:
        return threads
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1
    cores = torch.get_num_threads()  # torch's default: one thread per physical core
    return cores if load < cores / 2 else 1


def dip_config(use: str, preset: str, iters: int | None = None, lr: float | None = None) -> DIPConfig:
    """The DIP settings of a protocol (paper | blind | plugin, defaults.DIP), with the user's overrides."""
    if iters is not None and iters < 1:
        raise UserError(f"--dip-iters must be >= 1, got {iters}")
    check_positive("--dip-lr", lr)
    return dip_defaults(use, preset, iters, lr)


def load_context(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = defaults.BATCH_SIZE,
    dip_use: str = "paper",
    dip_preset: str = "auto",
    dip_iters: int | None = None,
    dip_lr: float | None = None,
    progress: bool = True,
    task: str = "generate",
) -> tuple[Context, Shard | None]:
    """The DDPM (`model`, or the embedded default of `task`: denoise | generate) and everything a method needs,
    on the chosen device.

    `dip_use` picks the DIP settings (paper | blind); blind also sets the plug-in DIP of blind TDPM-DIP.
    Under `accelerate launch` / torchrun the shard says which images this process runs (else None).
    """
    check_positive("--batch-size", batch_size)
    dev, shard = pick_device(device), None
    if launched():  # accelerate launch / torchrun: this process's device, and its share of the images
        shard, dev = Shard.start(dev)
    source = resolve_model(model, task)
    unet, scheduler = load_ddpm(source, device=dev)
    amp = pick_amp(dtype, dev)
    if amp is not None:  # reduced-precision convolutions run fastest on channels-last weights (oneDNN, cuDNN)
        unet = unet.to(memory_format=torch.channels_last)
    preset = pick_dip_preset(dip_preset, dev)
    ctx = Context(
        unet,
        scheduler,
        dip_config(dip_use, preset, dip_iters, dip_lr),
        dev,
        amp,
        batch_size,
        progress=progress,
        levels=trained_levels(source, scheduler),
        restorer=model_restorer(source, dev),
    )
    if dip_use == "blind":
        ctx.dip_plugin = dip_config("plugin", preset, dip_iters, dip_lr)
    return ctx, shard

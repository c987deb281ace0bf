"""What every section of benchmarks/speed.py shares: the `Row` and `Table` of results, device helpers, the
networks' FLOPs, the batch probes, the DIP section's inputs, the DDPM under test and `Bench`, which holds them.

Not a script: speed.py puts this folder on `sys.path` (and sets HF_HUB_OFFLINE) before importing it.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, UNet2DModel

from tdpm_dip.config import get_preset
from tdpm_dip.devices import synchronize
from tdpm_dip.models import build_unet, load_ddpm
from tdpm_dip.noise import image_generators, make_scheduler, q_sample, randn

# ----------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table (and of the JSON's rows): a method's s/img, speed and, for DIP rows, quality."""

    section: str
    method: str
    preset: str
    batch: int | None
    dtype: str
    n: int = 0  # images measured (per-image times are extrapolated from them)
    s_per_img: float | None = None
    ratio: float | None = None  # baseline s/img / this row's s/img (speed-up)
    tflops: float | None = None  # achieved model TFLOP/s
    peak_mem_gib: float | None = None  # torch.cuda.max_memory_allocated; None on the CPU
    psnr: float | None = None  # final output vs the clean images (dip rows)
    ssim: float | None = None
    d_psnr: float | None = None  # vs the fp32 batched row of the same network and init, same seeds
    d_ssim: float | None = None
    warmup_s: float | None = None  # untimed warm-up (includes torch.compile for compiled rows)
    notes: str = ""
    extra: dict = field(default_factory=dict)
    error: str | None = None


def cleanup(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def amp_name(amp: torch.dtype | None) -> str:
    return "fp32" if amp in (None, torch.float32) else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def dynamo_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0)) if "stats" in counters else 0
    except Exception:
        return None


def add_note(row: Row, note: str) -> None:
    row.notes = (row.notes + f"; {note}").lstrip("; ")


def note_recompiles(row: Row, graphs_before: int | None) -> None:
    """Flag a row whose timed region compiled again: its s/img then includes compilation."""
    after = dynamo_graphs()
    if graphs_before is not None and after is not None and after != graphs_before:
        add_note(row, f"{after - graphs_before} dynamo (re)compiles during timing")


class Table:
    """The rows of one run in the order measured, each printed as it lands; a failed row is kept as an error."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        msg = f"  {row.section:5s} {row.method:38s} b={row.batch!s:>4} {row.dtype:4s} "
        msg += f"{fmt(row.s_per_img, 4)} s/img" if row.error is None else f"ERROR {row.error}"
        print(msg, flush=True)
        return row

    def guarded(
        self, section: str, method: str, preset: str, batch: int | None, dtype: str, fn: Callable[[], Row]
    ) -> Row:
        """fn()'s row, or an error row: a failed row must not stop the benchmark."""
        try:
            row = fn()
        except Exception as e:
            traceback.print_exc(limit=3, file=sys.stderr)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            row = Row(section, method, preset, batch, dtype, error=f"{type(e).__name__}: {first}")
        cleanup(self.dev)
        return self.add(row)

    def ok(self, section: str) -> list[Row]:
        return [r for r in self.rows if r.section == section and r.error is None]

    def set_ratios(self, section: str, base: Row | None) -> None:
        """Speed-up of every row of a section over its baseline row (none without one)."""
        if base is None:
            return
        for r in self.ok(section):
            if r.s_per_img:
                r.ratio = base.s_per_img / r.s_per_img


# ---------------------------------------------------------------------------------------------- FLOPs


def forward_flops(config: dict, size: int) -> int:
    """FLOPs of one batch-1 forward (FlopCounterMode on meta tensors: no memory, no init)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = UNet2DModel.from_config({**dict(config), "sample_size": size})
        x = torch.zeros(1, 3, size, size)
        t = torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            net(x, t)
    return int(fc.get_total_flops())


def preset_config(name: str, size: int) -> dict:
    return get_preset(name).unet_kwargs(size)


def build_unet_meta(preset: str, size: int) -> torch.nn.Module:
    with torch.device("meta"):
        return UNet2DModel(**get_preset(preset).unet_kwargs(size))


# --------------------------------------------------------------------------------------- batch choice


def probe_batch(
    dev: torch.device, fn: Callable[[int], None], cap: int, label: str, log: dict, sizes: tuple[int, int] = (2, 4)
) -> int:
    """Largest batch <= cap whose extrapolated peak fits 85% of free GPU memory (two short probes)."""
    if cap <= sizes[0]:
        return cap
    peaks = []
    for b in sizes:
        cleanup(dev)
        base = torch.cuda.memory_allocated(dev)
        reset_peak(dev)
        fn(b)
        synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
    per = max((peaks[1] - peaks[0]) / (sizes[1] - sizes[0]), 1.0)
    fixed = max(peaks[0] - per * sizes[0], 0.0)
    cleanup(dev)
    free = torch.cuda.mem_get_info(dev)[0]
    b = int(max(1, min(cap, (0.85 * free - fixed) // per)))
    log[label] = {
        "probe_peaks_gib": [p / 2**30 for p in peaks],
        "per_item_gib": per / 2**30,
        "free_gib": free / 2**30,
        "chosen": b,
        "cap": cap,
    }
    return b


def with_oom_retry(dev: torch.device, fn: Callable[[int], Row], batch: int) -> Row:
    """Run fn(batch); on CUDA out-of-memory halve the batch (at most 4 times) and note it."""
    tried = []
    while True:
        try:
            row = fn(batch)
            if tried:
                add_note(row, f"OOM at batch {tried}")
            return row
        except Exception as e:
            if not is_oom(e) or batch <= 1 or len(tried) >= 4:
                raise
            tried.append(batch)
            cleanup(dev)
            batch //= 2


# ------------------------------------------------------------------------------- what sections share


def make_test_images(n: int, size: int) -> tuple[torch.Tensor, str]:
    """Deterministic test images in [-1, 1]: the package's procedural sprites (PIL), or smooth blobs."""
    try:
        from tdpm_dip.data import make_sprites

        return make_sprites(n, size).images, "tdpm_dip.data.make_sprites"
    except ImportError:
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        imgs = []
        for _ in range(n):
            c, r = torch.rand(2, generator=g) - 0.5, 0.3 + 0.3 * torch.rand(1, generator=g)
            col = torch.rand(3, 1, 1, generator=g)
            mask = (((xx - c[0]) ** 2 + (yy - c[1]) ** 2) < r**2).float()
            imgs.append((mask * col + (1 - mask)) * 2 - 1)
        return torch.stack(imgs), "torch discs (PIL unavailable)"


@dataclass
class DipInputs:
    """The DIP section's data on the device. Image i depends on seed i only, whatever the batch."""

    clean: torch.Tensor  # x_0 in [-1, 1]: what PSNR / SSIM are measured against
    target: torch.Tensor  # x_{T_trunc} = q(x_0, T_trunc): the oracle target each DIP is fitted to
    z: torch.Tensor  # each DIP's fixed input
    seeds: list[int]
    source: str  # where the clean images come from


def draw_dip_inputs(args: argparse.Namespace, sched: DDPMScheduler, dev: torch.device) -> DipInputs:
    n = max(args.n_images, args.slow_images, args.baseline_images)
    s = args.size
    clean, source = make_test_images(n, s)
    clean = clean.to(dev)
    seeds = list(range(n))
    # Drawn on the device from per-image generators, so the data do not depend on the batch of a row.
    eps = randn((3, s, s), image_generators([i + 10_000 for i in seeds], dev), dev)
    z = randn((3, s, s), image_generators([i + 20_000 for i in seeds], dev), dev)
    return DipInputs(clean, q_sample(sched, clean, args.t_trunc, eps), z, seeds, source)


@dataclass
class DDPMUnderTest:
    """The DDPM that the chains, generation and training rows run: --model, or a random --ddpm-preset."""

    unet: UNet2DModel
    sched: DDPMScheduler
    name: str

    @classmethod
    def load(cls, args: argparse.Namespace, dev: torch.device) -> DDPMUnderTest:
        # Speed does not depend on the weights, so without --model a random init of the preset will do.
        if args.model:
            unet, sched = load_ddpm(args.model, device=dev)
            name = f"model:{args.model}"
        else:
            unet = build_unet(args.ddpm_preset, seed=0, sample_size=args.size).to(dev).eval()
            sched, name = make_scheduler("linear"), args.ddpm_preset + " (random init)"
        unet.requires_grad_(False)
        return cls(unet, sched, name)


class Bench:
    """What every section shares: options, device, the DDPM under test, the DIP's inputs, forward FLOPs
    per network (batch 1), the batch probes' log and the table of rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.skip = set(args.skip)
        self.table = Table(self.dev)
        self.batch_probes: dict = {}
        s = args.size
        self.flops = {
            "dip": forward_flops(preset_config(args.dip_preset, s), s),
            "vmap": forward_flops(preset_config(args.vmap_preset, s), s),
        }
        self.ddpm = DDPMUnderTest.load(args, self.dev)
        self.flops["ddpm"] = forward_flops(self.ddpm.unet.config, s)
        self.data = draw_dip_inputs(args, self.ddpm.sched, self.dev)

    def dip_flops(self, key: str, n: int) -> float:
        """Model FLOPs of TDPM-DIP on n images: 3 x forward per DIP iteration (forward + backward), the final
        forward of G_psi(z), and T_trunc DDPM forwards."""
        a = self.args
        return n * (3 * self.flops[key] * a.iters + self.flops[key] + self.flops["ddpm"] * a.t_trunc)


# ---------------------------------------------------------------------------------------- formatting


def fmt(v: float | None, digits: int = 3) -> str:
    """A number of the table: `digits` significant digits, scientific notation when very large or small."""
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000 or (abs(v) < 10 ** -(digits - 1) and v != 0):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"

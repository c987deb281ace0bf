#!/usr/bin/env python
"""Speed of TDPM-DIP denoising, DDPM generation and DDPM training, in one process, on one device.

    python benchmarks/speed.py --preset tiny                       # CPU smoke run
    python benchmarks/speed.py --preset paper --out speed.json     # GPU: the report's networks at 64x64

benchmarks/README.md says what each section and row measures, how the timing is done, and how to run this
on a GPU machine whose Python lacks diffusers.

Layout: shared pieces (`Row`, `Table`, `Bench`: the options, the DDPM under test, the DIP's inputs and the
networks' FLOPs), then one class per row family (`DipRows`, `DdpmRows`, `TrainRows`), the floors, the
Markdown table and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# tdpm_dip from ../src needs no installation; fastdip sits next to this script (benchmarks/ is no package).
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent / "src", _HERE):
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from fastdip import IMPLS, fit_dip_fast  # noqa: E402

from tdpm_dip.config import get_preset  # noqa: E402
from tdpm_dip.devices import synchronize, timer  # noqa: E402
from tdpm_dip.dip import DIPConfig, DIPResult, fit_dip  # noqa: E402
from tdpm_dip.metrics import psnr, ssim  # noqa: E402
from tdpm_dip.models import build_unet, count_params, load_ddpm  # noqa: E402
from tdpm_dip.noise import image_generators, make_scheduler, q_sample, randn  # noqa: E402
from tdpm_dip.sampling import EpsModel, reverse_chain  # noqa: E402

if TYPE_CHECKING:  # only an annotation: diffusers has moved this class between modules before
    from diffusers.models.unets.unet_2d import UNet2DOutput

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

# (target x_{T_trunc}, DIP input z, seeds, DIP settings, batch) -> the fitted DIPs: fit_dip and fastdip alike.
FitFn = Callable[[torch.Tensor, torch.Tensor, list[int], DIPConfig, int], DIPResult]


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


# ------------------------------------------------------------------------------------- section: dip


def report_loop_fit(target: torch.Tensor, z: torch.Tensor, seeds: list[int], cfg: DIPConfig, batch: int) -> DIPResult:
    """The report's loop: a fresh network and Adam per image, batch 1, whatever `batch` says."""
    return fit_dip(target, z, seeds, cfg, batch_size=1, batched=False)


def vmap_fit(amp: torch.dtype | None) -> FitFn:
    """fit_dip's batched path: the B networks' weights stacked, called through vmap(functional_call)."""

    def fit(target: torch.Tensor, z: torch.Tensor, seeds: list[int], cfg: DIPConfig, batch: int) -> DIPResult:
        return fit_dip(target, z, seeds, cfg, batch_size=batch, batched=True, amp_dtype=amp)

    return fit


def fast_fit(impl: str, amp: torch.dtype | None, compile_arg: bool | str, init: str) -> FitFn:
    """fastdip: every conv / linear of the B networks as one batched matmul."""

    def fit(target: torch.Tensor, z: torch.Tensor, seeds: list[int], cfg: DIPConfig, batch: int) -> DIPResult:
        return fit_dip_fast(
            target, z, seeds, cfg, batch_size=batch, amp_dtype=amp, impl=impl, init=init, compile=compile_arg
        )

    return fit


@dataclass(frozen=True)
class DipVariant:
    """One DIP row: how its DIPs are fitted, on how many images, and which rows it is compared with."""

    method: str
    preset: str
    flops_key: str  # "dip" or "vmap": the network whose FLOPs the row's TFLOP/s counts
    n: int  # images timed
    amp: torch.dtype | None
    fit: FitFn
    ref_key: tuple[str, str]  # (network, init): rows with the same key start from the same weights
    chain_batch: int | None = None  # batch of the T_trunc chain (None: the DIP's)
    full_warm: bool = False  # warm up at the timed batch (compiled rows: static shapes)


@dataclass
class DipScores:
    """Per-image PSNR / SSIM of a row against the clean images, kept for the deltas between rows."""

    psnr: torch.Tensor
    ssim: torch.Tensor
    ref_key: tuple[str, str]


class DipRows:
    """TDPM-DIP denoising (Algorithm 2, --iters Adam steps, then the truncated chain of --t-trunc steps):
    the report's loop, fit_dip under vmap (fp32, bf16) and fastdip (fp32, bf16 per impl, compiled)."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.scores: dict[int, DipScores] = {}  # id(row) -> its per-image scores
        self.bf16_batch: int | None = None  # probed once, shared by every bf16 fastdip row

    def run(self) -> None:
        a, skip = self.b.args, self.b.skip
        print(
            f"[dip] TDPM-DIP denoising: {a.iters} DIP iterations + T_trunc={a.t_trunc} chain steps, "
            f"{a.size}x{a.size}, images: {self.b.data.source}",
            flush=True,
        )
        if "baseline" not in skip:
            self.baseline()
        if "vmap" not in skip:
            self.vmap()
        self.fast()
        self.deltas()

    def baseline(self) -> None:
        """The report's loop (fp32, batch 1, the chain at batch 1) on --baseline-images, extrapolated."""
        a = self.b.args
        v = DipVariant(
            "baseline: report loop (fit_dip batched=False)",
            a.dip_preset,
            "dip",
            a.baseline_images,
            None,
            report_loop_fit,
            (a.dip_preset, "cpu"),
            chain_batch=1,
        )
        self.b.table.guarded("dip", v.method, v.preset, 1, "fp32", lambda: self.measure(v, 1))

    def vmap(self) -> None:
        """tdpm_dip.dip.fit_dip in fp32 and bf16 autocast on --slow-images (the attention-free preset)."""
        a = self.b.args
        for amp in (None, torch.bfloat16):
            v = DipVariant(
                f"fit_dip vmap {amp_name(amp)}",
                a.vmap_preset,
                "vmap",
                a.slow_images,
                amp,
                vmap_fit(amp),
                (a.vmap_preset, "cpu"),
            )
            self.b.table.guarded(
                "dip",
                v.method,
                v.preset,
                None,
                amp_name(amp),
                lambda v=v: self.measure_largest(v, self.choose_batch(v)),
            )

    def fast_variants(self) -> list[tuple[str, torch.dtype | None, bool]]:
        """(impl, autocast dtype, compiled): the fp32 "taps" reference, bf16 per --impls, then compiled."""
        a, skip = self.b.args, self.b.skip
        out: list[tuple[str, torch.dtype | None, bool]] = []
        if "fast" not in skip:
            out += [(IMPLS[0], None, False)] + [(impl, torch.bfloat16, False) for impl in a.impls]
        if "compile" not in skip and a.compile_on:
            out.append((a.impls[0], torch.bfloat16, True))
        return out

    def fast(self) -> None:
        """fastdip.fit_dip_fast on --n-images: its fp32 reference, its bf16 rows, its compiled row."""
        a = self.b.args
        for impl, amp, compiled in self.fast_variants():
            name = f"fastdip {impl} {amp_name(amp)}" + (" compiled" if compiled else "")
            compile_arg: bool | str = (a.compile_mode or True) if compiled else False
            v = DipVariant(
                name,
                a.dip_preset,
                "dip",
                a.n_images,
                amp,
                fast_fit(impl, amp, compile_arg, a.fast_init),
                (a.dip_preset, a.fast_init),
                full_warm=compiled,
            )
            self.b.table.guarded(
                "dip",
                name,
                a.dip_preset,
                None,
                amp_name(amp),
                lambda v=v: self.measure_largest(v, self.shared_batch(v)),
            )

    def shared_batch(self, v: DipVariant) -> int:
        # One probe per dtype family: the bf16 rows (every impl, compiled or not) share the first one's batch.
        if v.amp is None:
            return self.choose_batch(v)
        if self.bf16_batch is None:
            self.bf16_batch = self.choose_batch(v)
        return self.bf16_batch

    def choose_batch(self, v: DipVariant) -> int:
        """--batch; on the CPU --cpu-batch; on CUDA the largest batch that fits (probe_batch)."""
        a, d = self.b.args, self.b.data
        if a.batch is not None:
            return min(a.batch, v.n)
        if not self.b.cuda:
            return min(v.n, a.cpu_batch)

        def probe(b: int) -> None:
            v.fit(d.target[:b], d.z[:b], d.seeds[:b], DIPConfig(preset=v.preset, iters=2), b)

        return probe_batch(self.b.dev, probe, min(a.max_batch, v.n), v.method, self.b.batch_probes)

    def measure_largest(self, v: DipVariant, batch: int) -> Row:
        return with_oom_retry(self.b.dev, lambda bb: self.measure(v, bb), batch)

    def chain(self, x: torch.Tensor, seeds: list[int], batch: int, amp: torch.dtype | None) -> torch.Tensor:
        """Algorithm 3's T_trunc reverse steps from the DIP outputs, `batch` images at a time."""
        model = EpsModel(self.b.ddpm.unet, self.b.ddpm.sched, amp)
        outs = []
        for lo in range(0, x.shape[0], batch):
            gens = image_generators([s + 30_000 for s in seeds[lo : lo + batch]], self.b.dev)
            outs.append(reverse_chain(model, x[lo : lo + batch], self.b.args.t_trunc, gens))
        return torch.cat(outs)

    def warm_up(self, v: DipVariant, batch: int) -> float:
        """Untimed seconds of a short run: CUDA context, allocator, cuBLAS heuristics, lazy imports, vmap
        tracing. A compiled row warms up at the timed batch (static shapes), the others on at most 2 images."""
        a, d = self.b.args, self.b.data
        wb = min(batch, v.n) if v.full_warm else min(batch, v.n, 2)
        with timer(self.b.dev) as tw:
            w = v.fit(d.target[:wb], d.z[:wb], d.seeds[:wb], DIPConfig(preset=v.preset, iters=min(2, a.iters)), wb)
            self.chain(w.output, d.seeds[:wb], min(v.chain_batch or batch, wb), v.amp)
        return tw[0]

    def measure(self, v: DipVariant, batch: int) -> Row:
        """s/img of fitting v.n DIPs (--iters iterations) plus their T_trunc chains, at `batch`; TFLOP/s, peak
        memory, and PSNR / SSIM of the final outputs against the clean images."""
        a, dev, d = self.b.args, self.b.dev, self.b.data
        n = v.n
        warm_s = self.warm_up(v, batch)
        graphs = dynamo_graphs()
        cleanup(dev)
        reset_peak(dev)
        with timer(dev) as t_dip:
            res = v.fit(d.target[:n], d.z[:n], d.seeds[:n], DIPConfig(preset=v.preset, iters=a.iters), batch)
        with timer(dev) as t_chain:
            out = self.chain(res.output, d.seeds[:n], v.chain_batch or batch, v.amp)
        total = t_dip[0] + t_chain[0]
        row = Row(
            "dip",
            v.method,
            v.preset,
            batch,
            amp_name(v.amp),
            n=n,
            s_per_img=total / n,
            tflops=self.b.dip_flops(v.flops_key, n) / total / 1e12,
            peak_mem_gib=peak_gib(dev),
            warmup_s=warm_s,
        )
        p, s_ = psnr(out, d.clean[:n]).cpu(), ssim(out, d.clean[:n]).cpu()
        row.psnr, row.ssim = float(p.mean()), float(s_.mean())
        row.extra = {
            "dip_s_per_img": t_dip[0] / n,
            "chain_s_per_img": t_chain[0] / n,
            "psnr_dip_output": float(psnr(res.output, d.clean[:n]).mean()),
            "ref_key": list(v.ref_key),
        }
        note_recompiles(row, graphs)
        self.scores[id(row)] = DipScores(p, s_, v.ref_key)
        return row

    def reference(self, row: Row, rows: list[Row]) -> Row | None:
        """The first fp32 batched row that starts from the same weights as `row` (the report loop is none)."""
        key = self.scores[id(row)].ref_key
        return next(
            (
                q
                for q in rows
                if self.scores[id(q)].ref_key == key and q.dtype == "fp32" and not q.method.startswith("baseline")
            ),
            None,
        )

    def deltas(self) -> None:
        """dPSNR / dSSIM against each row's reference on the images both measured; speed-up vs the baseline."""
        rows = self.b.table.ok("dip")
        for r in rows:
            ref = self.reference(r, rows)
            if ref is not None and ref is not r:
                m = min(r.n, ref.n)
                mine, theirs = self.scores[id(r)], self.scores[id(ref)]
                r.d_psnr = float((mine.psnr[:m] - theirs.psnr[:m]).mean())
                r.d_ssim = float((mine.ssim[:m] - theirs.ssim[:m]).mean())
                r.extra["delta_vs"] = f"{ref.method} (first {m} images)"
                r.extra["max_abs_d_psnr"] = float((mine.psnr[:m] - theirs.psnr[:m]).abs().max())
            elif ref is r:
                r.d_psnr, r.d_ssim = 0.0, 0.0
                r.extra["delta_vs"] = "itself (reference)"
        self.b.table.set_ratios("dip", next((r for r in rows if r.method.startswith("baseline")), None))


# ------------------------------------------------------------------------------------ section: ddpm


class _DeviceTimestep(torch.nn.Module):
    """Wraps a UNet so an int timestep becomes a device tensor by a fill kernel: UNet2DModel would copy
    `torch.tensor([t])` host->device at each call, a synchronising copy. Optionally compiles the UNet."""

    def __init__(self, unet: torch.nn.Module, compile_mode: str | None = None) -> None:
        super().__init__()
        self.unet = unet
        mode = None if compile_mode == "default" else compile_mode
        self.fwd = torch.compile(unet, mode=mode) if compile_mode else unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> UNet2DOutput:
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        return self.fwd(x.contiguous(memory_format=torch.channels_last), t)


class DdpmRows:
    """DDPM generation: --ddpm-steps ancestral steps from N(0, I) (tdpm_dip.sampling.reverse_chain). An fp32
    batch-1 baseline (few steps, extrapolated), bf16 autocast per --ddpm-batches, then bf16 weights +
    channels-last (+ torch.compile) at the fastest batch."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench

    def run(self) -> None:
        a, skip, table = self.b.args, self.b.skip, self.b.table
        print(f"[ddpm] generation: {a.ddpm_steps} steps, {self.b.ddpm.name}", flush=True)
        if "baseline" not in skip:
            self.baseline()
        batches = self.batches()
        for b in batches:
            self.autocast(b)
        if "fast" not in skip or "compile" not in skip:
            self.bf16_weights(self.best_batch(batches))
        table.set_ratios("ddpm", next((r for r in table.ok("ddpm") if r.method.startswith("baseline")), None))

    def baseline(self) -> None:
        """fp32, batch 1, --baseline-ddpm-steps timed (it is slow) and extrapolated to --ddpm-steps."""
        method, steps = "baseline: reverse_chain fp32", min(self.b.args.ddpm_steps, self.b.args.baseline_ddpm_steps)
        self.b.table.guarded(
            "ddpm",
            method,
            self.b.ddpm.name,
            1,
            "fp32",
            lambda: self.measure(method, self.b.ddpm.unet, 1, steps, None, "fp32"),
        )

    def autocast(self, batch: int) -> None:
        """bf16 autocast over the fp32 weights at `batch` (halved on CUDA out-of-memory)."""
        method, steps = "reverse_chain bf16 autocast", self.b.args.ddpm_steps
        self.b.table.guarded(
            "ddpm",
            method,
            self.b.ddpm.name,
            batch,
            "bf16",
            lambda: with_oom_retry(
                self.b.dev, lambda bb: self.measure(method, self.b.ddpm.unet, bb, steps, torch.bfloat16, "bf16"), batch
            ),
        )

    def batches(self) -> list[int]:
        """--ddpm-batches, sorted and unique; "auto" is the largest batch that fits (CUDA only)."""
        out: list[int] = []
        for tok in self.b.args.ddpm_batches.split(","):
            tok = tok.strip()
            if tok == "auto":
                if self.b.cuda:
                    out += self.probe()
            elif tok:
                out.append(int(tok))
        return sorted(set(out))

    def probe(self) -> list[int]:
        """[the largest bf16 autocast batch that fits], or [] when the probe fails (the other batches still run)."""
        a, dev = self.b.args, self.b.dev
        model = EpsModel(self.b.ddpm.unet, self.b.ddpm.sched, torch.bfloat16)

        def two_steps(b: int) -> None:
            gens = image_generators(range(b), dev)
            reverse_chain(model, randn((3, a.size, a.size), gens, dev), 2, gens)

        try:
            return [probe_batch(dev, two_steps, a.ddpm_max_batch, "ddpm", self.b.batch_probes, (8, 16))]
        except Exception as e:
            print(f"  ddpm batch probe failed: {e}", file=sys.stderr)
            return []

    def best_batch(self, batches: list[int]) -> int:
        """The batch of the fastest bf16 autocast row (else the largest asked for, else 1)."""
        ok = [r for r in self.b.table.ok("ddpm") if not r.method.startswith("baseline")]
        return min(ok, key=lambda r: r.s_per_img).batch if ok else (batches[-1] if batches else 1)

    def bf16_weights(self, best: int) -> None:
        """bf16 weights + channels-last with a device timestep, then the same compiled, at `best`."""
        a, skip, table, name = self.b.args, self.b.skip, self.b.table, self.b.ddpm.name
        fast = copy.deepcopy(self.b.ddpm.unet).to(torch.bfloat16, memory_format=torch.channels_last)
        if "fast" not in skip:
            table.guarded(
                "ddpm",
                "reverse_chain bf16 weights, channels-last",
                name,
                best,
                "bf16",
                lambda: self.measure(
                    "reverse_chain bf16 weights, channels-last", _DeviceTimestep(fast), best, a.ddpm_steps, None, "bf16"
                ),
            )
        if "compile" not in skip and a.compile_on:
            net = _DeviceTimestep(fast, compile_mode=a.compile_mode or "default")
            table.guarded(
                "ddpm",
                "  + torch.compile",
                name,
                best,
                "bf16",
                lambda: self.measure("  + torch.compile", net, best, a.ddpm_steps, None, "bf16"),
            )

    def measure(
        self,
        method: str,
        net: torch.nn.Module,
        batch: int,
        steps: int,
        amp: torch.dtype | None,
        dtype: str,
        warm_steps: int = 3,
    ) -> Row:
        """s/img of `steps` ancestral steps at `batch`, scaled to --ddpm-steps; TFLOP/s and peak memory."""
        a, dev = self.b.args, self.b.dev
        model = EpsModel(net, self.b.ddpm.sched, amp)
        gens = image_generators([i + 40_000 for i in range(batch)], dev)
        x_T = randn((3, a.size, a.size), gens, dev)
        with timer(dev) as tw:
            reverse_chain(model, x_T, min(warm_steps, steps), image_generators(range(batch), dev))
        graphs = dynamo_graphs()
        cleanup(dev)
        reset_peak(dev)
        with timer(dev) as t:
            reverse_chain(model, x_T, steps, gens)
        row = Row(
            "ddpm",
            method,
            self.b.ddpm.name,
            batch,
            dtype,
            n=batch,
            warmup_s=tw[0],
            s_per_img=t[0] / batch * a.ddpm_steps / steps,
            tflops=self.b.flops["ddpm"] * steps * batch / t[0] / 1e12,
            peak_mem_gib=peak_gib(dev),
            extra={"steps_timed": steps, "steps_reported": a.ddpm_steps},
        )
        if steps != a.ddpm_steps:
            row.notes = f"{steps} steps timed, x{a.ddpm_steps / steps:g} extrapolated"
        note_recompiles(row, graphs)
        return row


# ----------------------------------------------------------------------------------- section: train


class TrainRows:
    """DDPM training throughput at --train-batch: Algorithm 1's step (forward + backward + AdamW) in fp32,
    bf16 autocast, bf16 + channels-last, and that compiled."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench

    def variants(self) -> list[tuple[str, torch.dtype | None, bool, str | None]]:
        """(method, autocast dtype, channels-last, torch.compile mode)."""
        a, skip = self.b.args, self.b.skip
        out: list[tuple[str, torch.dtype | None, bool, str | None]] = [("AdamW fp32", None, False, None)]
        if "fast" not in skip:
            out += [
                ("AdamW bf16 autocast", torch.bfloat16, False, None),
                ("AdamW bf16 autocast, channels-last", torch.bfloat16, True, None),
            ]
        if "compile" not in skip and a.compile_on:
            out.append(("  + torch.compile", torch.bfloat16, True, a.compile_mode or "default"))
        return out

    def run(self) -> None:
        a, table = self.b.args, self.b.table
        print(f"[train] DDPM training, batch {a.train_batch}, {a.size}x{a.size}", flush=True)
        for name, amp, cl, cm in self.variants():
            table.guarded(
                "train",
                name,
                self.b.ddpm.name,
                a.train_batch,
                amp_name(amp),
                lambda name=name, amp=amp, cl=cl, cm=cm: self.measure(name, amp, cl, cm),
            )
        table.set_ratios("train", next((r for r in table.ok("train") if r.dtype == "fp32"), None))

    def network(self, channels_last: bool) -> UNet2DModel:
        """A fresh trainable copy of the DDPM's architecture (--model's config, or --ddpm-preset, seed 1)."""
        a, dev = self.b.args, self.b.dev
        if a.model:
            net = UNet2DModel.from_config(self.b.ddpm.unet.config).to(dev)
        else:
            net = build_unet(a.ddpm_preset, seed=1, sample_size=a.size).to(dev)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net.train()

    def step_fn(
        self, net: UNet2DModel, amp: torch.dtype | None, channels_last: bool, compile_mode: str | None
    ) -> Callable[[], None]:
        """One training step on a fixed batch: random t and eps drawn on the device, eps-MSE, AdamW. Nothing
        in it waits for the host, so the timer measures the device's throughput."""
        a, dev = self.b.args, self.b.dev
        b, s = a.train_batch, a.size
        fwd = torch.compile(net, mode=compile_mode) if compile_mode else net
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if self.b.cuda else {}))
        acp = self.b.ddpm.sched.alphas_cumprod.to(dev, torch.float32)
        T = len(acp)
        g = torch.Generator(device=dev).manual_seed(0)
        x0 = torch.rand(b, 3, s, s, device=dev, generator=g) * 2 - 1
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else contextlib.nullcontext

        def step() -> None:
            t = torch.randint(0, T, (b,), device=dev, generator=g)
            eps = torch.randn(x0.shape, device=dev, generator=g)
            ab = acp[t].view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            with ctx():
                pred = fwd(xt, t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def measure(self, method: str, amp: torch.dtype | None, channels_last: bool, compile_mode: str | None) -> Row:
        """s/img and img/s of --train-steps steps after --train-warmup untimed ones; TFLOP/s, peak memory."""
        a, dev = self.b.args, self.b.dev
        b = a.train_batch
        net = self.network(channels_last)
        step = self.step_fn(net, amp, channels_last, compile_mode)
        with timer(dev) as tw:
            for _ in range(a.train_warmup):
                step()
        graphs = dynamo_graphs()
        reset_peak(dev)
        with timer(dev) as t:
            for _ in range(a.train_steps):
                step()
        row = Row(
            "train",
            method,
            self.b.ddpm.name.replace(" (random init)", ""),
            b,
            amp_name(amp),
            n=b * a.train_steps,
            warmup_s=tw[0],
            s_per_img=t[0] / (b * a.train_steps),
            tflops=3 * self.b.flops["ddpm"] * b * a.train_steps / t[0] / 1e12,
            peak_mem_gib=peak_gib(dev),
        )
        row.extra = {
            "images_per_s": 1 / row.s_per_img,
            "steps_timed": a.train_steps,
            "params_m": count_params(net) / 1e6,
        }
        row.notes = f"{1 / row.s_per_img:.1f} img/s"
        note_recompiles(row, graphs)
        return row


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


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000 or (abs(v) < 10 ** -(digits - 1) and v != 0):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


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

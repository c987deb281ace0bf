#!/usr/bin/env python
"""Speed of TDPM-DIP denoising, DDPM generation and DDPM training, in one process, on one device.

    python benchmarks/speed.py --preset tiny                       # CPU smoke run
    python benchmarks/speed.py --preset paper --out speed.json     # GPU: the report's networks at 64x64

benchmarks/README.md says what each section and row measures, how the timing is done, and how to run this
on a GPU machine whose Python lacks diffusers.
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

# tdpm_dip from ../src needs no installation; fastdip sits next to this script (benchmarks/ is no package).
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent / "src", _HERE):
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fastdip import IMPLS, fit_dip_fast  # noqa: E402
from tdpm_dip.config import get_preset  # noqa: E402
from tdpm_dip.devices import synchronize, timer  # noqa: E402
from tdpm_dip.dip import DIPConfig, fit_dip  # noqa: E402
from tdpm_dip.metrics import psnr, ssim  # noqa: E402
from tdpm_dip.models import build_unet, count_params, load_ddpm  # noqa: E402
from tdpm_dip.noise import image_generators, make_scheduler, q_sample, randn  # noqa: E402
from tdpm_dip.sampling import reverse_chain  # noqa: E402

SECTIONS = ("baseline", "vmap", "fast", "compile", "ddpm", "train")

PRESET_SETS = {
    # CPU smoke run: tiny networks.
    "tiny": dict(dip="dip-tiny", vmap="dip-tiny", ddpm="tiny", size=32, n_images=4, baseline_images=2,
                 slow_images=4, ddpm_batches="1,4", train_batch=16, baseline_ddpm_steps=10),
    # The report's networks at 64x64.
    "paper": dict(dip="paper-dip", vmap="paper-dip-noattn", ddpm="paper-ddpm", size=64, n_images=200,
                  baseline_images=2, slow_images=32, ddpm_batches="64,256,auto", train_batch=128,
                  baseline_ddpm_steps=20),
}

# HBM bandwidth (TB/s) of a few cards, for the optimizer-traffic floor printed with the DIP section.
_BANDWIDTH_TBS = {"H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8, "A100": 2.0, "L4": 0.3, "T4": 0.32}


# ----------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    section: str
    method: str
    preset: str
    batch: int | None
    dtype: str
    n: int = 0                          # images measured (per-image times are extrapolated from them)
    s_per_img: float | None = None
    ratio: float | None = None          # baseline s/img / this row's s/img (speed-up)
    tflops: float | None = None         # achieved model TFLOP/s
    peak_mem_gib: float | None = None   # torch.cuda.max_memory_allocated; None on the CPU
    psnr: float | None = None           # final output vs the clean images (dip rows)
    ssim: float | None = None
    d_psnr: float | None = None         # vs the fp32 batched row of the same network and init, same seeds
    d_ssim: float | None = None
    warmup_s: float | None = None       # untimed warm-up (includes torch.compile for compiled rows)
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
    except Exception:  # noqa: BLE001 (an introspection aid only)
        return None


# ---------------------------------------------------------------------------------------------- FLOPs

def forward_flops(config: dict, size: int) -> int:
    """FLOPs of one batch-1 forward (FlopCounterMode on meta tensors: no memory, no init)."""
    from diffusers import UNet2DModel
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


# --------------------------------------------------------------------------------------- batch choice

def probe_batch(dev: torch.device, fn: Callable[[int], None], cap: int, label: str, log: dict,
                sizes: tuple[int, int] = (2, 4)) -> int:
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
    log[label] = {"probe_peaks_gib": [p / 2**30 for p in peaks], "per_item_gib": per / 2**30,
                  "free_gib": free / 2**30, "chosen": b, "cap": cap}
    return b


def with_oom_retry(dev: torch.device, fn: Callable[[int], Row], batch: int) -> Row:
    """Run fn(batch); on CUDA out-of-memory halve the batch (at most 4 times) and note it."""
    tried = []
    while True:
        try:
            row = fn(batch)
            if tried:
                row.notes = (row.notes + f"; OOM at batch {tried}").lstrip("; ")
            return row
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or batch <= 1 or len(tried) >= 4:
                raise
            tried.append(batch)
            cleanup(dev)
            batch //= 2


# --------------------------------------------------------------------------------------------- images

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


# ------------------------------------------------------------------------------------ the speed run

class SpeedRun:
    """The rows of one speed.py run: test data, networks' FLOPs, and one method per section."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.rows: list[Row] = []
        self.per_image: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row index -> (psnr, ssim)
        self.log: dict = {"batch_probes": {}}
        self.cuda = self.dev.type == "cuda"
        s = args.size
        self.flops = {"dip": forward_flops(preset_config(args.dip_preset, s), s),
                      "vmap": forward_flops(preset_config(args.vmap_preset, s), s)}
        if args.model:
            self.ddpm, self.sched = load_ddpm(args.model, device=self.dev)
            self.ddpm_name = f"model:{args.model}"
        else:
            self.ddpm = build_unet(args.ddpm_preset, seed=0, sample_size=s).to(self.dev).eval()
            self.sched = make_scheduler("linear")
            self.ddpm_name = args.ddpm_preset + " (random init)"
        self.ddpm.requires_grad_(False)
        self.flops["ddpm"] = forward_flops(self.ddpm.config, s)
        # Test data, all drawn on the device from per-image generators (image i depends on seed i only).
        n = max(args.n_images, args.slow_images, args.baseline_images)
        clean, self.image_source = make_test_images(n, s)
        self.clean = clean.to(self.dev)
        self.seeds = list(range(n))
        eps = randn((3, s, s), image_generators([i + 10_000 for i in self.seeds], self.dev), self.dev)
        self.target = q_sample(self.sched, self.clean, args.t_trunc, eps)
        self.z = randn((3, s, s), image_generators([i + 20_000 for i in self.seeds], self.dev), self.dev)

    # -------------------------------------------------------------- helpers
    def add(self, row: Row) -> Row:
        self.rows.append(row)
        msg = f"  {row.section:5s} {row.method:38s} b={row.batch!s:>4} {row.dtype:4s} "
        msg += f"{fmt(row.s_per_img, 4)} s/img" if row.error is None else f"ERROR {row.error}"
        print(msg, flush=True)
        return row

    def guarded(self, section: str, method: str, preset: str, batch: int | None, dtype: str,
                fn: Callable[[], Row]) -> Row | None:
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 (a failed row must not stop the benchmark)
            traceback.print_exc(limit=3, file=sys.stderr)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            row = Row(section, method, preset, batch, dtype, error=f"{type(e).__name__}: {first}")
        cleanup(self.dev)
        return self.add(row)

    def chain(self, x: torch.Tensor, seeds: list[int], batch: int, amp: torch.dtype | None) -> torch.Tensor:
        outs = []
        for lo in range(0, x.shape[0], batch):
            gens = image_generators([s + 30_000 for s in seeds[lo:lo + batch]], self.dev)
            outs.append(reverse_chain(self.ddpm, self.sched, x[lo:lo + batch], self.args.t_trunc, gens, amp))
        return torch.cat(outs)

    def dip_flops(self, key: str, n: int) -> float:
        a = self.args
        return n * (3 * self.flops[key] * a.iters + self.flops[key] + self.flops["ddpm"] * a.t_trunc)

    # -------------------------------------------------------------- one DIP row
    def dip_row(self, method: str, preset: str, flops_key: str, n: int, batch: int, amp: torch.dtype | None,
                fit: Callable[..., object], ref_key: tuple, chain_batch: int | None = None,
                full_warm: bool = False) -> Row:
        a, dev = self.args, self.dev
        cfg = DIPConfig(preset=preset, iters=a.iters)
        # Untimed warm-up: CUDA context, allocator, cuBLAS heuristics, lazy imports, vmap tracing; a
        # compiled row warms up at the timed batch (static shapes), the others on at most 2 images.
        wb = min(batch, n) if full_warm else min(batch, n, 2)
        with timer(dev) as tw:
            w = fit(self.target[:wb], self.z[:wb], self.seeds[:wb], DIPConfig(preset=preset, iters=min(2, a.iters)), wb)
            self.chain(w.output, self.seeds[:wb], min(chain_batch or batch, wb), amp)
        warm_s = tw[0]
        del w
        graphs0 = dynamo_graphs()
        cleanup(dev)
        reset_peak(dev)
        with timer(dev) as t_dip:
            res = fit(self.target[:n], self.z[:n], self.seeds[:n], cfg, batch)
        with timer(dev) as t_chain:
            out = self.chain(res.output, self.seeds[:n], chain_batch or batch, amp)
        row = Row("dip", method, preset, batch, amp_name(amp), n=n, warmup_s=warm_s)
        total = t_dip[0] + t_chain[0]
        row.s_per_img = total / n
        row.tflops = self.dip_flops(flops_key, n) / total / 1e12
        row.peak_mem_gib = peak_gib(dev)
        p, s_ = psnr(out, self.clean[:n]).cpu(), ssim(out, self.clean[:n]).cpu()
        row.psnr, row.ssim = float(p.mean()), float(s_.mean())
        row.extra = {"dip_s_per_img": t_dip[0] / n, "chain_s_per_img": t_chain[0] / n,
                     "psnr_dip_output": float(psnr(res.output, self.clean[:n]).mean()), "ref_key": list(ref_key)}
        g1 = dynamo_graphs()
        if graphs0 is not None and g1 is not None and g1 != graphs0:
            row.notes = f"{g1 - graphs0} dynamo (re)compiles during timing"
        self.per_image[id(row)] = (p, s_)
        row.extra["_ref_key"] = ref_key
        return row

    # -------------------------------------------------------------- section: dip
    def choose_batch(self, label: str, fit: Callable[..., object], preset: str, amp: torch.dtype | None,
                     n: int, cap: int) -> int:
        a = self.args
        if a.batch is not None:
            return min(a.batch, n)
        if not self.cuda:
            return min(n, a.cpu_batch)

        def probe(b: int) -> None:
            fit(self.target[:b], self.z[:b], self.seeds[:b], DIPConfig(preset=preset, iters=2), b)

        return probe_batch(self.dev, probe, min(cap, n), label, self.log["batch_probes"])

    def run_dip(self) -> None:
        a = self.args
        skip = set(a.skip)
        print(f"[dip] TDPM-DIP denoising: {a.iters} DIP iterations + T_trunc={a.t_trunc} chain steps, "
              f"{a.size}x{a.size}, images: {self.image_source}", flush=True)
        base_key = (a.dip_preset, "cpu")
        if "baseline" not in skip:
            k = a.baseline_images

            def baseline_fit(target, z, seeds, cfg, batch):  # noqa: ANN001, ANN202 (fresh network per image)
                return fit_dip(target, z, seeds, cfg, batch_size=1, batched=False)

            self.guarded("dip", "baseline: report loop (fit_dip batched=False)", a.dip_preset, 1, "fp32",
                         lambda: self.dip_row("baseline: report loop (fit_dip batched=False)", a.dip_preset, "dip",
                                              k, 1, None, baseline_fit, base_key, chain_batch=1))
        if "vmap" not in skip:
            n = a.slow_images
            for amp in (None, torch.bfloat16):
                def vfit(target, z, seeds, cfg, batch, amp=amp):  # noqa: ANN001, ANN202
                    return fit_dip(target, z, seeds, cfg, batch_size=batch, batched=True, amp_dtype=amp)

                name = f"fit_dip vmap {amp_name(amp)}"

                def run(amp=amp, vfit=vfit, name=name) -> Row:
                    b = self.choose_batch(name, vfit, a.vmap_preset, amp, n, a.max_batch)
                    return with_oom_retry(self.dev, lambda bb: self.dip_row(
                        name, a.vmap_preset, "vmap", n, bb, amp, vfit, (a.vmap_preset, "cpu")), b)

                self.guarded("dip", name, a.vmap_preset, None, amp_name(amp), run)
        fast_variants: list[tuple[str, torch.dtype | None, bool]] = []
        if "fast" not in skip:
            fast_variants += [(IMPLS[0], None, False)] + [(impl, torch.bfloat16, False) for impl in a.impls]
        if "compile" not in skip and a.compile_on:
            fast_variants.append((a.impls[0], torch.bfloat16, True))
        fast_batch: int | None = None
        for impl, amp, comp in fast_variants:
            name = f"fastdip {impl} {amp_name(amp)}" + (" compiled" if comp else "")
            compile_arg: bool | str = (a.compile_mode or True) if comp else False

            def ffit(target, z, seeds, cfg, batch, impl=impl, amp=amp, compile_arg=compile_arg):  # noqa: ANN001, ANN202
                return fit_dip_fast(target, z, seeds, cfg, batch_size=batch, amp_dtype=amp, impl=impl,
                                    init=a.fast_init, compile=compile_arg)

            def run(name=name, ffit=ffit, amp=amp, comp=comp) -> Row:
                nonlocal fast_batch
                if amp is None or fast_batch is None:  # probe once per dtype family (bf16 rows share it)
                    b = self.choose_batch(name, ffit, a.dip_preset, amp, a.n_images, a.max_batch)
                    if amp is not None:
                        fast_batch = b
                else:
                    b = fast_batch
                return with_oom_retry(self.dev, lambda bb: self.dip_row(
                    name, a.dip_preset, "dip", a.n_images, bb, amp, ffit, (a.dip_preset, a.fast_init),
                    full_warm=comp), b)

            self.guarded("dip", name, a.dip_preset, None, amp_name(amp), run)
        self.dip_deltas()

    def dip_deltas(self) -> None:
        """Deltas vs the first fp32 batched row of the same (network, init); speed-up vs the baseline."""
        dip = [r for r in self.rows if r.section == "dip" and r.error is None]
        base = next((r for r in dip if r.method.startswith("baseline")), None)
        for r in dip:
            key = r.extra.pop("_ref_key", None)
            r.extra["_key"] = key
        for r in dip:
            ref = next((q for q in dip if q.extra["_key"] == r.extra["_key"] and q.dtype == "fp32"
                        and not q.method.startswith("baseline")), None)
            if ref is not None and ref is not r:
                m = min(r.n, ref.n)
                (p, s_), (pr, sr) = self.per_image[id(r)], self.per_image[id(ref)]
                r.d_psnr = float((p[:m] - pr[:m]).mean())
                r.d_ssim = float((s_[:m] - sr[:m]).mean())
                r.extra["delta_vs"] = f"{ref.method} (first {m} images)"
                r.extra["max_abs_d_psnr"] = float((p[:m] - pr[:m]).abs().max())
            elif ref is r:
                r.d_psnr, r.d_ssim = 0.0, 0.0
                r.extra["delta_vs"] = "itself (reference)"
            if base is not None and r.s_per_img:
                r.ratio = base.s_per_img / r.s_per_img
        for r in dip:
            r.extra.pop("_key", None)

    # -------------------------------------------------------------- section: ddpm generation
    def ddpm_row(self, method: str, net: torch.nn.Module, batch: int, steps: int, amp: torch.dtype | None,
                 dtype: str, warm_steps: int = 3) -> Row:
        a, dev = self.args, self.dev
        s = a.size
        gens = image_generators([i + 40_000 for i in range(batch)], dev)
        x_T = randn((3, s, s), gens, dev)
        with timer(dev) as tw:
            reverse_chain(net, self.sched, x_T, min(warm_steps, steps), image_generators(range(batch), dev), amp)
        g0 = dynamo_graphs()
        cleanup(dev)
        reset_peak(dev)
        with timer(dev) as t:
            reverse_chain(net, self.sched, x_T, steps, gens, amp)
        row = Row("ddpm", method, self.ddpm_name, batch, dtype, n=batch, warmup_s=tw[0])
        row.s_per_img = t[0] / batch * a.ddpm_steps / steps
        row.tflops = self.flops["ddpm"] * steps * batch / t[0] / 1e12
        row.peak_mem_gib = peak_gib(dev)
        row.extra = {"steps_timed": steps, "steps_reported": a.ddpm_steps}
        if steps != a.ddpm_steps:
            row.notes = f"{steps} steps timed, x{a.ddpm_steps / steps:g} extrapolated"
        g1 = dynamo_graphs()
        if g0 is not None and g1 is not None and g1 != g0:
            row.notes = (row.notes + f"; {g1 - g0} dynamo (re)compiles during timing").lstrip("; ")
        return row

    def run_ddpm(self) -> None:
        a, dev = self.args, self.dev
        skip = set(a.skip)
        print(f"[ddpm] generation: {a.ddpm_steps} steps, {self.ddpm_name}", flush=True)
        if "baseline" not in skip:
            steps = min(a.ddpm_steps, a.baseline_ddpm_steps)
            self.guarded("ddpm", "baseline: reverse_chain fp32", self.ddpm_name, 1, "fp32",
                         lambda: self.ddpm_row("baseline: reverse_chain fp32", self.ddpm, 1, steps, None, "fp32"))
        batches: list[int] = []
        for tok in a.ddpm_batches.split(","):
            tok = tok.strip()
            if tok == "auto":
                if not self.cuda:
                    continue
                try:
                    def probe(b: int) -> None:
                        gens = image_generators(range(b), dev)
                        x = randn((3, a.size, a.size), gens, dev)
                        reverse_chain(self.ddpm, self.sched, x, 2, gens, torch.bfloat16)
                    batches.append(probe_batch(dev, probe, a.ddpm_max_batch, "ddpm", self.log["batch_probes"], (8, 16)))
                except Exception as e:  # noqa: BLE001
                    print(f"  ddpm batch probe failed: {e}", file=sys.stderr)
            elif tok:
                batches.append(int(tok))
        batches = sorted(set(batches))
        for b in batches:
            self.guarded("ddpm", "reverse_chain bf16 autocast", self.ddpm_name, b, "bf16",
                         lambda b=b: with_oom_retry(dev, lambda bb: self.ddpm_row(
                             "reverse_chain bf16 autocast", self.ddpm, bb, a.ddpm_steps, torch.bfloat16, "bf16"), b))
        ok = [r for r in self.rows if r.section == "ddpm" and r.error is None and not r.method.startswith("baseline")]
        best = min(ok, key=lambda r: r.s_per_img).batch if ok else (batches[-1] if batches else 1)
        if "fast" not in skip or "compile" not in skip:
            fast = copy.deepcopy(self.ddpm).to(torch.bfloat16, memory_format=torch.channels_last)
            if "fast" not in skip:
                self.guarded("ddpm", "reverse_chain bf16 weights, channels-last", self.ddpm_name, best, "bf16",
                             lambda: self.ddpm_row("reverse_chain bf16 weights, channels-last",
                                                   _DeviceTimestep(fast), best, a.ddpm_steps, None, "bf16"))
            if "compile" not in skip and a.compile_on:
                net = _DeviceTimestep(fast, compile_mode=a.compile_mode or "default")
                self.guarded("ddpm", "  + torch.compile", self.ddpm_name, best, "bf16",
                             lambda: self.ddpm_row("  + torch.compile", net, best, a.ddpm_steps, None, "bf16"))
            del fast
        base = next((r for r in self.rows if r.section == "ddpm" and r.method.startswith("baseline")
                     and r.error is None), None)
        for r in self.rows:
            if r.section == "ddpm" and r.error is None and base is not None:
                r.ratio = base.s_per_img / r.s_per_img

    # -------------------------------------------------------------- section: training
    def train_row(self, method: str, amp: torch.dtype | None, channels_last: bool, compile_mode: str | None) -> Row:
        a, dev = self.args, self.dev
        b, s = a.train_batch, a.size
        if a.model:
            from diffusers import UNet2DModel
            net = UNet2DModel.from_config(self.ddpm.config).to(dev)
        else:
            net = build_unet(a.ddpm_preset, seed=1, sample_size=s).to(dev)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        fwd = torch.compile(net, mode=compile_mode) if compile_mode else net
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if self.cuda else {}))
        acp = self.sched.alphas_cumprod.to(dev, torch.float32)
        T = len(acp)
        g = torch.Generator(device=dev).manual_seed(0)
        x0 = torch.rand(b, 3, s, s, device=dev, generator=g) * 2 - 1
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else contextlib.nullcontext

        def step() -> None:
            # Algorithm 1's step: random t and eps drawn on the device, eps-MSE, AdamW (no host sync).
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

        with timer(dev) as tw:
            for _ in range(a.train_warmup):
                step()
        g0 = dynamo_graphs()
        reset_peak(dev)
        with timer(dev) as t:
            for _ in range(a.train_steps):
                step()
        row = Row("train", method, self.ddpm_name.replace(" (random init)", ""), b, amp_name(amp), n=b * a.train_steps,
                  warmup_s=tw[0])
        row.s_per_img = t[0] / (b * a.train_steps)
        row.tflops = 3 * self.flops["ddpm"] * b * a.train_steps / t[0] / 1e12
        row.peak_mem_gib = peak_gib(dev)
        row.extra = {"images_per_s": 1 / row.s_per_img, "steps_timed": a.train_steps,
                     "params_m": count_params(net) / 1e6}
        row.notes = f"{1 / row.s_per_img:.1f} img/s"
        g1 = dynamo_graphs()
        if g0 is not None and g1 is not None and g1 != g0:
            row.notes += f"; {g1 - g0} dynamo (re)compiles during timing"
        return row

    def run_train(self) -> None:
        a = self.args
        skip = set(a.skip)
        print(f"[train] DDPM training, batch {a.train_batch}, {a.size}x{a.size}", flush=True)
        variants = [("AdamW fp32", None, False, None)]
        if "fast" not in skip:
            variants += [("AdamW bf16 autocast", torch.bfloat16, False, None),
                         ("AdamW bf16 autocast, channels-last", torch.bfloat16, True, None)]
        if "compile" not in skip and a.compile_on:
            variants.append(("  + torch.compile", torch.bfloat16, True, a.compile_mode or "default"))
        for name, amp, cl, cm in variants:
            self.guarded("train", name, self.ddpm_name, a.train_batch, amp_name(amp),
                         lambda name=name, amp=amp, cl=cl, cm=cm: self.train_row(name, amp, cl, cm))
        base = next((r for r in self.rows if r.section == "train" and r.dtype == "fp32" and r.error is None), None)
        for r in self.rows:
            if r.section == "train" and r.error is None and base is not None:
                r.ratio = base.s_per_img / r.s_per_img

    # -------------------------------------------------------------- floors
    def floors(self) -> dict:
        """Lower bounds per image for the DIP: FLOPs, and the optimizer-state traffic of fp32 Adam."""
        a = self.args
        params = sum(p.numel() for p in build_unet_meta(a.dip_preset, a.size).parameters())
        # fused Adam reads p, g, m, v and writes p, m, v (7 x 4 bytes); the gradient is written once (4 bytes).
        bytes_per_img = 32 * params * a.iters
        out = {"dip_params": params, "dip_tflop_per_img": self.dip_flops("dip", 1) / 1e12,
               "adam_state_traffic_gb_per_img": bytes_per_img / 1e9}
        bw = a.mem_bw
        if bw is None and self.cuda:
            name = torch.cuda.get_device_name(self.dev)
            bw = next((v for k, v in _BANDWIDTH_TBS.items() if k in name), None)
        if bw:
            out["hbm_tb_per_s"] = bw
            out["adam_traffic_floor_ms_per_img"] = bytes_per_img / (bw * 1e12) * 1e3
        return out


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

    def forward(self, x: torch.Tensor, t: int | torch.Tensor):  # noqa: ANN201
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        return self.fwd(x.contiguous(memory_format=torch.channels_last), t)


def build_unet_meta(preset: str, size: int) -> torch.nn.Module:
    from diffusers import UNet2DModel
    with torch.device("meta"):
        return UNet2DModel(**get_preset(preset).unet_kwargs(size))


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
    head = ["section", "method", "preset", "batch", "dtype", "s/img", "speed-up", "TFLOP/s", "peak GiB",
            "PSNR", "dPSNR", "dSSIM", "warm-up s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            cells = [r.section, r.method, r.preset, str(r.batch), r.dtype, "error", "", "", "", "", "", "", "", r.error]
        else:
            cells = [r.section, r.method, r.preset, str(r.batch), r.dtype, fmt(r.s_per_img, 4),
                     "n/a" if r.ratio is None else f"{r.ratio:.3g}x", fmt(r.tflops), fmt(r.peak_mem_gib),
                     fmt(r.psnr, 4), "n/a" if r.d_psnr is None else f"{r.d_psnr:+.3f}",
                     "n/a" if r.d_ssim is None else f"{r.d_ssim:+.4f}", fmt(r.warmup_s), r.notes]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESET_SETS), default="tiny",
                    help="tiny: CPU smoke (dip-tiny / tiny); "
                         "paper: paper-dip (+ paper-dip-noattn for vmap) / paper-ddpm")
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
    ap.add_argument("--baseline-ddpm-steps", type=int, default=None,
                    help="steps timed for the fp32 batch-1 DDPM baseline, extrapolated to --ddpm-steps")
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
    ap.add_argument("--fast-init", choices=["auto", "cpu", "device"], default="auto",
                    help="fastdip initialisation (auto: device on CUDA, cpu = build_unet(seed) as fit_dip)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile rows (auto: CUDA only)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    ap.add_argument("--skip", default="",
                    help=f"comma list of {', '.join(SECTIONS)}, and dip (the whole DIP section)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-bw", type=float, default=None,
                    help="HBM TB/s for the Adam traffic floor (default: by card name)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("--out", default=None, help="write the rows and environment as JSON")
    args = ap.parse_args(argv)
    d = PRESET_SETS[args.preset]
    for k in ("size", "n_images", "baseline_images", "slow_images", "ddpm_batches", "train_batch",
              "baseline_ddpm_steps"):
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


def vmap_conv_autocast_dtype(dev: torch.device) -> str:
    """Dtype of a conv2d run under vmap inside bf16 autocast (float32 where vmap escapes autocast)."""
    try:
        from torch.func import vmap
        w, x = torch.randn(2, 4, 4, 3, 3, device=dev), torch.randn(2, 1, 4, 8, 8, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return str(vmap(lambda w_, x_: torch.nn.functional.conv2d(x_, w_, padding=1))(w, x).dtype)
    except Exception as e:  # noqa: BLE001
        return f"probe failed: {type(e).__name__}"


def environment(dev: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(dev),
           "platform": platform.platform(), "threads": torch.get_num_threads(),
           "vmap_conv_dtype_under_bf16_autocast": vmap_conv_autocast_dtype(dev)}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   gpu_mem_gib=torch.cuda.get_device_properties(dev).total_memory / 2**30,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    return env


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    env = environment(dev)
    print(f"speed.py --preset {args.preset} on {env.get('gpu', dev)} (torch {env['torch']}, "
          f"diffusers {env.get('diffusers')}); DIP {args.dip_preset} / vmap {args.vmap_preset}, DDPM "
          f"{args.model or args.ddpm_preset}, {args.size}x{args.size}", flush=True)
    t0 = time.perf_counter()
    speed = SpeedRun(args)
    print(f"  conv2d under vmap inside bf16 autocast runs in {env['vmap_conv_dtype_under_bf16_autocast']} "
          "(float32: fit_dip's vmap bf16 rows run their convolutions in fp32, as on the CPU, whose autocast "
          "list lacks aten::convolution, which vmap's conv batch rule calls)", flush=True)
    print("  forward GFLOP at batch 1: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in speed.flops.items()), flush=True)
    if "dip" not in args.skip:
        speed.run_dip()
    if "ddpm" not in args.skip:
        speed.run_ddpm()
    if "train" not in args.skip:
        speed.run_train()
    floors = speed.floors()
    table = markdown(speed.rows)
    print()
    print(table)
    print()
    msg = (f"DIP floors per image ({args.dip_preset}, {floors['dip_params'] / 1e6:.1f}M params, {args.iters} it): "
           f"{fmt(floors['dip_tflop_per_img'])} TFLOP (DIP + chain); fp32 Adam state traffic "
           f"{fmt(floors['adam_state_traffic_gb_per_img'])} GB")
    if "adam_traffic_floor_ms_per_img" in floors:
        msg += f" = {fmt(floors['adam_traffic_floor_ms_per_img'])} ms at {floors['hbm_tb_per_s']} TB/s"
    print(msg)
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    result = {"env": env, "args": {k: v for k, v in vars(args).items()}, "flops_per_forward": speed.flops,
              "floors": floors, "batch_probes": speed.log["batch_probes"], "images": speed.image_source,
              "rows": [asdict(r) for r in speed.rows], "markdown": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

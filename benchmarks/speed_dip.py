"""benchmarks/speed.py's DIP section: TDPM-DIP denoising (Algorithm 2's DIP fits, then Algorithm 3's truncated
chain) with the report's loop, `tdpm_dip.dip.fit_dip` under vmap, and fastdip's batched matmuls.

Not a script: speed.py puts this folder on `sys.path` (and sets HF_HUB_OFFLINE) before importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from fastdip import IMPLS, fit_dip_fast
from speed_common import (
    Bench,
    Row,
    amp_name,
    cleanup,
    dynamo_graphs,
    note_recompiles,
    peak_gib,
    probe_batch,
    reset_peak,
    with_oom_retry,
)

from tdpm_dip.devices import timer
from tdpm_dip.dip import DIPConfig, DIPResult, fit_dip
from tdpm_dip.metrics import psnr, ssim
from tdpm_dip.noise import image_generators
from tdpm_dip.sampling import EpsModel, reverse_chain

# (target x_{T_trunc}, DIP input z, seeds, DIP settings, batch) -> the fitted DIPs: fit_dip and fastdip alike.
FitFn = Callable[[torch.Tensor, torch.Tensor, list[int], DIPConfig, int], DIPResult]


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

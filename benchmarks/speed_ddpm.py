"""benchmarks/speed.py's DDPM sections: generation (ancestral steps from pure noise) and training throughput
(Algorithm 1's step), each in fp32, bf16 autocast, bf16 weights + channels-last and compiled.

Not a script: speed.py puts this folder on `sys.path` (and sets HF_HUB_OFFLINE) before importing it.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DModel
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
from tdpm_dip.models import build_unet, count_params
from tdpm_dip.noise import image_generators, randn
from tdpm_dip.sampling import EpsModel, reverse_chain

if TYPE_CHECKING:  # only an annotation: diffusers has moved this class between modules before
    from diffusers.models.unets.unet_2d import UNet2DOutput

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

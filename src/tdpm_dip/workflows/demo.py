"""`tdpm-dip demo`: the whole method end to end, offline, in minutes on two CPU cores.

Phases (each timed, each with a progress bar where it takes a while):
  data        procedural sprites made in code (`data.make_sprites`), or the images of `--data`;
              the first n are the test images, the rest the training set (written to RUN/data/)
  train       a small DDPM (Algorithm 1, `training.ddpm.train`) on RUN/data/train; skipped with `--model`
  generation  DDPM from pure noise (a DDPM of every level only) vs TDPM-DIP (paper protocol: it reconstructs
              training images), amortized TDPM with the shipped generator, DDIM of the model trained here
  denoising   the registry's paper methods (t = 600, or the DDPM's highest trained level) and every blind
              method on 8-bit noise (sigma 25)
  report      RUN/report.md with the figures, one metric table per task and the phase times

Everything the report shows is computed by the registry's methods (`methods.run`) and rendered by
`reporting`; this module only wires them together (the run's options and record: `demo_setup`; the page:
`demo_report`). The whole run folder (data/, train/,
figures, report) is built beside RUN and replaces an earlier run only when complete, so an interrupted demo
leaves the earlier run as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import defaults, registry
from ..embedded import default_ddpm, resolve_generator
from ..errors import UserError
from ..generator import load_generator
from ..methods import Context, Job, run
from ..models import load_ddpm, trained_levels, unet_size
from ..noise import add_noise, check_level, check_t_trunc, num_levels
from ..outputs import prepare_out_dir, staged_dir, write_text
from ..runtime import dip_config, load_context
from ..training.ddpm import train
from ..training.options import TrainConfig
from .demo_report import loss_figure, report_md, write_report
from .demo_setup import DIP_PRESETS, DemoConfig, DemoData, DemoRun, Phases, loadavg, make_data

__all__ = [
    "DEMO_FILES",
    "DIP_PRESETS",
    "DemoConfig",
    "DemoData",
    "DemoRun",
    "Phases",
    "loss_figure",
    "make_data",
    "report_md",
    "run_demo",
]

# What a demo writes in RUN: with --overwrite, a new run replaces these whole (other files stay).
DEMO_FILES = (
    "data",
    "train",
    "report.md",
    "metrics.json",
    "test_images.png",
    "train_loss.png",
    "generation.png",
    "denoise_paper.png",
    "denoise_blind.png",
    "dip_curves.png",
)


# ---------------------------------------------------------------------------------------------- the run


def run_demo(cfg: DemoConfig, device: str, threads: int, echo: Callable[[str], None]) -> Path:
    """Run every phase into `cfg.out`; returns the path of report.md.

    The run is built in a folder beside `cfg.out` and replaces an earlier run there only once complete
    (`outputs.staged_dir`): interrupted, it is removed and the earlier run stays as it was."""
    cfg.validate()
    final = prepare_out_dir(cfg.out, cfg.overwrite)
    # vmap over the DIPs' attention falls back to a per-image loop on the CPU; correct, only slower.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    with staged_dir(final, owned=DEMO_FILES) as stage:
        d = DemoRun(cfg, stage, final, Phases(echo), device, threads, loadavg())
        echo(f"tdpm-dip demo -> {final}  (device {device}, {threads} CPU thread(s), load average {d.load_start})")
        _load_model(d)
        _make_data(d)
        _train(d)
        _settings(d)
        _generate(d)
        _denoise(d)
        write_report(d)
        echo(f"demo finished in {d.phases.total:.0f} s")
        _relocate(stage / "train", stage, final)
    return final / "report.md"


def _context(d: DemoRun, model: str) -> Context:
    """The demo's context for `model`: the paper DIP settings, and the blind ones' iterations for TDPM-DIP."""
    cfg = d.cfg
    ctx, _ = load_context(model, d.device, "auto", cfg.batch_size, "paper", cfg.dip_preset, cfg.dip_iters)
    ctx.dip_plugin = dip_config("plugin", cfg.dip_preset, cfg.blind_dip_iters)
    return ctx


def _load_model(d: DemoRun) -> None:
    """The model decides the image size: load it first when one is given (or the embedded default is used)."""
    if d.cfg.model is None and not d.cfg.uses_embedded:
        d.size = d.cfg.size
        return
    source = d.cfg.model if d.cfg.model is not None else str(default_ddpm())
    with d.phases("load model") as note:
        d.ctx = _context(d, source)
        d.size = unet_size(d.ctx.unet.config)
        note["note"] = f"{source}, {d.size}x{d.size}"
    if d.cfg.model is not None and d.size != d.cfg.size:  # --size is for a model trained here
        d.phases.echo(f"note: --model is {d.size} px, so the demo runs at {d.size} px, not --size {d.cfg.size}")
    d.model_label = d.cfg.model or "embedded default (tdpm_dip/weights/ddpm-sprites32)"


def _make_data(d: DemoRun) -> None:
    with d.phases("data") as note:
        d.data = make_data(d.cfg, d.size, d.stage)
        note["note"] = f"{d.data.source}: {d.cfg.n} test images" + (
            f", {d.data.train.shape[0]} training images" if d.data.train is not None else ""
        )


def _train(d: DemoRun) -> None:
    """Algorithm 1 on RUN/data/train (without --model); its model does the rest unless the embedded one does."""
    cfg = d.cfg
    if cfg.model is not None:
        return
    tcfg = TrainConfig(
        data=str(d.stage / "data" / "train"),
        out=str(d.stage / "train"),
        preset=cfg.preset,
        size=d.size,
        steps=cfg.steps,
        batch_size=cfg.train_batch,
        lr=cfg.train_lr,
        warmup_steps=min(50, cfg.steps // 5),
        ema_decay=0.99,
        seed=cfg.seed,
        log_every=max(1, min(10, cfg.steps // 10)),
        checkpoint_every=0,
        sample_every=0,
        n_samples=0,
        overwrite=True,
    )
    with d.phases("train") as note:
        if d.device != "auto" and not d.device.startswith("cuda") and torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"  # accelerate picks the GPU unless told otherwise
        model_dir = train(tcfg)
        recs = [json.loads(x) for x in (d.stage / "train" / "metrics.jsonl").read_text().splitlines() if x]
        img_s = [r["img_s"] for r in recs if r.get("img_s")]
        d.train_info = {
            "steps": cfg.steps,
            "batch": cfg.train_batch,
            "lr": cfg.train_lr,
            "preset": cfg.preset,
            "final_loss": recs[-1]["loss"] if recs else None,
            "img_s": sorted(img_s)[len(img_s) // 2] if img_s else None,
        }
        note["note"] = (
            f"{cfg.steps} steps x batch {cfg.train_batch}, preset {cfg.preset}, median {d.train_info['img_s']} img/s"
        )
    if cfg.uses_embedded:
        d.short_model = str(model_dir)
    else:
        d.ctx = _context(d, str(model_dir))
        d.model_label = str(d.final / model_dir.relative_to(d.stage))


def _settings(d: DemoRun) -> None:
    """The levels and step counts of the options against the model's T (one-line errors)."""
    assert d.ctx is not None
    T = num_levels(d.ctx.scheduler)
    top = T if d.ctx.levels is None else d.ctx.levels[1]
    # The report's level, unless the DDPM was not trained that high (a truncated DDPM).
    d.t_noisy = min(defaults.T_NOISY, top) if d.cfg.t_noisy is None else d.cfg.t_noisy
    check_level(d.ctx.scheduler, d.t_noisy, "--t-noisy")
    check_t_trunc(d.ctx.scheduler, d.cfg.t_trunc)
    if d.cfg.ddpm_steps > T:
        raise UserError(f"--ddpm-steps must be <= {T}")


def _generate(d: DemoRun) -> None:
    """DDPM from noise (unless the DDPM is truncated: trained below level T only), TDPM-DIP (paper protocol),
    amortized TDPM with the shipped generator, and DDIM-50 of the model trained here (with the embedded default)."""
    cfg, ctx, data = d.cfg, d.ctx, d.data
    assert ctx is not None and data is not None
    T = num_levels(ctx.scheduler)
    if "all-levels" in ctx.provides:
        _generate_from_noise(d, ctx, T)
    with d.phases("generation: TDPM-DIP") as note:
        r = run(ctx, "generate", "paper", "tdpm-dip", Job(d.seeds, reference=data.reference, t_trunc=cfg.t_trunc))
        d.gen.append((f"TDPM-DIP (T_trunc={cfg.t_trunc})", r))
        note["note"] = f"DIP {cfg.dip_iters} it + {cfg.t_trunc} steps, {r.seconds_per_image:.2f} s/img"
    shipped = resolve_generator(None, None) if cfg.uses_embedded else None
    if shipped is not None:
        with d.phases("generation: amortized TDPM") as note:
            ctx.generator = load_generator(shipped, ctx.unet, ctx.scheduler, ctx.device)
            r = run(ctx, "generate", "unconditional", "tdpm", Job(d.seeds))
            d.gen.append((f"TDPM amortized (T_trunc={ctx.generator.t_trunc})", r))
            note["note"] = f"G_psi(z) + {ctx.generator.reverse_steps} steps, {r.seconds_per_image:.3f} s/img"
    if d.short_model is not None:
        with d.phases(f"generation: the model trained here (DDIM {defaults.QUICK_DDIM_STEPS})") as note:
            short_unet, short_sched = load_ddpm(d.short_model, device=ctx.device)
            short = dataclasses.replace(ctx, unet=short_unet, levels=trained_levels(d.short_model, short_sched))
            quick = defaults.QUICK_DDIM_STEPS
            r = run(short, "generate", "unconditional", "ddim", Job(d.seeds, ddim_steps=quick))
            r.method = f"ddim-{quick}, {cfg.steps}-step model"
            label = f"DDIM {quick}, the {cfg.steps}-step model"
            d.gen.append((label, r))
            # A few hundred steps teach a DDPM to denoise, not to generate from pure noise: its samples are noise,
            # which in the figure would read as a bug. The table keeps its row.
            d.off_figure[label] = (
                f"the `{cfg.preset}` DDPM trained here for {cfg.steps} steps has not learned the high noise levels "
                f"that generation from pure noise starts from: its DDIM-{quick} samples are noise"
            )
            note["note"] = f"{r.seconds_per_image:.2f} s/img"


def _generate_from_noise(d: DemoRun, ctx: Context, T: int) -> None:
    """The DDPM row: T ancestral steps, or --ddpm-steps strided ones (DDIM with eta = 1)."""
    cfg = d.cfg
    with d.phases("generation: DDPM") as note:
        if cfg.ddpm_steps == T:
            r = run(ctx, "generate", "unconditional", "ddpm", Job(d.seeds))
        else:
            r = run(ctx, "generate", "unconditional", "ddim", Job(d.seeds, ddim_steps=cfg.ddpm_steps, eta=1.0))
            r.method = f"ddpm ({cfg.ddpm_steps} strided steps)"
        d.gen.append((f"DDPM ({r.reverse_steps} steps)", r))
        note["note"] = f"{r.reverse_steps} reverse steps, {r.seconds_per_image:.2f} s/img"


def _denoise(d: DemoRun) -> None:
    """The registry's paper methods (the report's oracle, t = t_noisy), then every blind method that needs no
    optional extra, on 8-bit noise."""
    cfg, ctx, data = d.cfg, d.ctx, d.data
    assert ctx is not None and data is not None
    with d.phases(f"denoising, paper protocol (t={d.t_noisy})") as note:
        job = Job(d.seeds, clean=data.test, t_noisy=d.t_noisy, t_trunc=cfg.t_trunc)
        d.paper = [run(ctx, "denoise", "paper", m, job) for m in registry.names("denoise", "paper")]
        note["note"] = ", ".join(f"{r.method} {r.seconds_per_image:.2f} s/img" for r in d.paper)
    blind = dataclasses.replace(ctx, dip=dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters))
    d.noisy = add_noise(data.test, cfg.sigma, list(d.seeds), "clipped")  # what a saved 8-bit noisy file holds
    with d.phases(f"denoising, blind protocol (sigma={cfg.sigma:g}, clipped 8-bit)") as note:
        job = Job(d.seeds, noisy=d.noisy, sigma=(cfg.sigma,), clean=data.test, samples=cfg.samples)
        d.blind = [
            run(blind, "denoise", "blind", m.name, job) for m in registry.methods("denoise", "blind") if m.extra is None
        ]
        note["note"] = ", ".join(f"{r.method} {r.seconds_per_image:.2f} s/img" for r in d.blind)


def _relocate(folder: Path, stage: Path, final: Path) -> None:
    """The training run's records name the staging folder it ran in: name the run folder instead."""
    old, new = json.dumps(str(stage))[1:-1], json.dumps(str(final))[1:-1]
    for p in [folder / "config.json", *folder.glob("checkpoints/*/training_state.json")]:
        if p.is_file():
            write_text(p, p.read_text().replace(old, new))

"""`tdpm-dip demo`: the whole method end to end, offline, in minutes on two CPU cores.

Phases (each timed, each with a progress bar where it takes a while):
  data        procedural sprites made in code (`data.make_sprites`), or the images of `--data`;
              the first n are the test images, the rest the training set (written to RUN/data/)
  train       a small DDPM (Algorithm 1, `training.ddpm.train`) on RUN/data/train; skipped with `--model`
  generation  DDPM from pure noise vs TDPM-DIP (paper protocol: it reconstructs training images), and
              amortized TDPM with the shipped generator
  denoising   the registry's paper methods (t = 600) and every blind method on 8-bit noise (sigma 25)
  report      RUN/report.md with the figures, one metric table per task and the phase times

Everything the report shows is computed by the registry's methods (`methods.run`) and rendered by
`reporting`; this module only wires them together and writes the page. The whole run folder (data/, train/,
figures, report) is built beside RUN and replaces an earlier run only when complete, so an interrupted demo
leaves the earlier run as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .. import defaults, registry
from ..config import get_preset
from ..data import load_images, make_sprites
from ..embedded import default_ddpm, default_size, resolve_generator
from ..errors import UserError
from ..generator import load_generator
from ..images import save_grid, save_set
from ..methods import Context, Job, Result, run
from ..metrics import copy_rate
from ..models import load_ddpm, trained_levels, unet_size
from ..noise import add_noise, check_level, check_t_trunc, num_levels
from ..outputs import prepare_out_dir, staged_dir, write_json, write_text
from ..reporting import curves_figure, labelled_comparison, result_row, save_figure, table
from ..runtime import dip_config, load_context
from ..training.ddpm import train
from ..training.options import TrainConfig

# The DIP presets the demo offers; their settings come from defaults.DIP (paper and blind rows).
DIP_PRESETS = ("dip-tiny", "dip-small", "paper-dip-noattn", "paper-dip")
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


@dataclass(frozen=True)
class DemoConfig:
    """Options of `tdpm-dip demo` (the CLI documents each one)."""

    out: str
    data: str | None = None  # None: procedural sprites
    model: str | None = None  # None: train the demo DDPM first
    n: int = 8  # test images (denoising) and generated images
    steps: int = 200  # training steps
    size: int = 32  # image side when training (a --model fixes its own)
    seed: int = 0
    train_images: int = 256  # sprites in the training set (without --data)
    train_batch: int = 16
    train_lr: float = 2e-3
    preset: str = "demo"  # DDPM preset when training
    sigma: float = defaults.SIGMA  # blind protocol noise (0..255)
    t_noisy: int | None = None  # paper protocol noise level; None: the report's 600, or the DDPM's top trained level
    t_trunc: int = defaults.T_TRUNC  # TDPM-DIP T_trunc (generation and paper denoising)
    ddpm_steps: int = defaults.DDPM_STEPS  # generation DDPM steps (< 1000: strided ancestral sampler)
    dip_preset: str = "dip-tiny"
    dip_iters: int = defaults.DIP["paper"]["iters"]  # paper protocol and generation (the report's 100)
    blind_dip_iters: int = 200
    samples: int = defaults.SAMPLES  # blind TDPM-DIP chains averaged per image
    batch_size: int = defaults.BATCH_SIZE  # images processed (DIPs fitted) at once
    overwrite: bool = False
    embedded: bool = True  # sprites without --model: generate and denoise with the shipped DDPM

    @property
    def uses_embedded(self) -> bool:
        """Generation and denoising use the embedded default DDPM; the run still trains (Algorithm 1)."""
        return self.embedded and self.model is None and self.data is None

    def validate(self) -> None:
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        for name in (
            "n",
            "steps",
            "train_images",
            "train_batch",
            "dip_iters",
            "blind_dip_iters",
            "samples",
            "batch_size",
            "ddpm_steps",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if not self.train_lr > 0:
            raise UserError(f"--train-lr must be > 0, got {self.train_lr}")
        if not 0 < self.sigma <= 255:
            raise UserError(f"--sigma must be in (0, 255], got {self.sigma}")
        if self.ddpm_steps > 1000:
            raise UserError(f"--ddpm-steps must be <= 1000, got {self.ddpm_steps}")
        if self.t_noisy is not None and not 1 <= self.t_noisy <= 1000:
            raise UserError(f"--t-noisy must be in [1, 1000], got {self.t_noisy}")
        if not 0 <= self.t_trunc < 1000:
            raise UserError(f"--t-trunc must be in [0, 999], got {self.t_trunc}")
        if self.dip_preset not in DIP_PRESETS:
            raise UserError(f"--dip-preset must be one of {', '.join(DIP_PRESETS)}, got {self.dip_preset!r}")
        if self.uses_embedded:
            if self.size != default_size():
                raise UserError(
                    f"--size {self.size}: the embedded default model is {default_size()} px; pass "
                    "--no-embedded to generate and denoise with the model trained here at another size"
                )
        if self.model is None:
            factor = 2 ** (len(get_preset(self.preset).block_out_channels) - 1)
            if self.size < 8 or self.size % factor:
                raise UserError(f"--size must be >= 8 and a multiple of {factor}, got {self.size}")
            if self.data is None and self.train_batch > self.train_images:
                raise UserError(
                    f"--train-batch {self.train_batch} is larger than the training set ({self.train_images} sprites)"
                )


# ---------------------------------------------------------------------------------------------- phases


class Phases:
    """Wall time of each phase; echoed as it ends and listed in the report."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.times: list[tuple[str, float, str]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[dict]:
        note: dict = {"note": ""}
        self.echo(f"[{len(self.times) + 1}] {name} ...")
        t0 = time.perf_counter()
        yield note
        dt = time.perf_counter() - t0
        self.times.append((name, dt, note["note"]))
        self.echo(f"[{len(self.times)}] {name}: {dt:.1f} s" + (f" ({note['note']})" if note["note"] else ""))

    @property
    def total(self) -> float:
        return sum(t for _, t, _ in self.times)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class DemoData:
    test: torch.Tensor  # [n, 3, S, S]: the images to denoise
    reference: torch.Tensor  # what TDPM-DIP generation reconstructs (paper protocol)
    train: torch.Tensor | None  # the training set (copy-rate reference); None with --model
    source: str


def make_data(cfg: DemoConfig, size: int, run: Path) -> DemoData:
    """The test images and the training / reference set (procedural sprites or --data), saved under RUN/data."""
    if cfg.data is None:
        test_set = make_sprites(cfg.n, size, seed=cfg.seed + 1)  # another seed: held out, never trained on
        if cfg.model is None:
            train = make_sprites(cfg.train_images, size, seed=cfg.seed)
            ref, src = train.images[: cfg.n], f"{cfg.train_images} procedural sprites (seed {cfg.seed})"
        else:
            train, ref, src = None, make_sprites(cfg.n, size, seed=cfg.seed).images, "procedural sprites"
        save_set(test_set.images, test_set.names, run / "data" / "test")
        if train is not None:
            save_set(train.images, train.names, run / "data" / "train")
        return DemoData(test_set.images, ref, train.images if train is not None else None, src)

    allset = load_images(cfg.data, size, progress=True)
    n_all = len(allset)
    if n_all <= cfg.n:
        raise UserError(
            f"{cfg.data}: {n_all} images; the demo needs more than --n {cfg.n} "
            "(the first n are the test images, the rest the training / reference set)"
        )
    test, rest = allset.images[: cfg.n], allset.images[cfg.n :]
    save_set(test, allset.names[: cfg.n], run / "data" / "test")
    if cfg.model is None:
        if rest.shape[0] < cfg.train_batch:
            raise UserError(
                f"{cfg.data}: {rest.shape[0]} training images (after {cfg.n} test images), fewer "
                f"than --train-batch {cfg.train_batch}"
            )
        save_set(rest, allset.names[cfg.n :], run / "data" / "train")
    ref = rest[: cfg.n] if rest.shape[0] >= cfg.n else test
    return DemoData(test, ref, rest if cfg.model is None else None, f"{n_all} images from {cfg.data}")


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class DemoRun:
    """What the phases hand on: the run folder being built, the model, the data, and every result."""

    cfg: DemoConfig
    stage: Path  # the staged run folder (moved to `final` when complete)
    final: Path
    phases: Phases
    device: str
    threads: int
    load_start: str
    ctx: Context | None = None
    size: int = 32
    data: DemoData | None = None
    model_label: str = ""
    train_info: dict = field(default_factory=dict)
    short_model: str | None = None  # the model trained here, when the embedded default does the rest
    gen: list[tuple[str, Result]] = field(default_factory=list)  # (figure label, generation result)
    # Generation rows left out of generation.png (label -> why): they stay in the table and the report says why.
    off_figure: dict[str, str] = field(default_factory=dict)
    paper: list[Result] = field(default_factory=list)
    blind: list[Result] = field(default_factory=list)
    noisy: torch.Tensor | None = None
    t_noisy: int = defaults.T_NOISY  # the paper protocol's level, resolved against the DDPM (_settings)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.cfg.seed, self.cfg.seed + self.cfg.n))


def run_demo(cfg: DemoConfig, device: str, threads: int, echo: Callable[[str], None]) -> Path:
    """Run every phase into `cfg.out`; returns the path of report.md.

    The run is built in a folder beside `cfg.out` and replaces an earlier run there only once complete
    (`outputs.staged_dir`): interrupted, it is removed and the earlier run stays as it was."""
    cfg.validate()
    final = prepare_out_dir(cfg.out, cfg.overwrite)
    # vmap over the DIPs' attention falls back to a per-image loop on the CPU; correct, only slower.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    with staged_dir(final, owned=DEMO_FILES) as stage:
        d = DemoRun(cfg, stage, final, Phases(echo), device, threads, _loadavg())
        echo(f"tdpm-dip demo -> {final}  (device {device}, {threads} CPU thread(s), load average {d.load_start})")
        _load_model(d)
        _make_data(d)
        _train(d)
        _settings(d)
        _generate(d)
        _denoise(d)
        _report(d)
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
        with d.phases("generation: the model trained here (DDIM 50)") as note:
            short_unet, short_sched = load_ddpm(d.short_model, device=ctx.device)
            short = dataclasses.replace(ctx, unet=short_unet, levels=trained_levels(d.short_model, short_sched))
            r = run(short, "generate", "unconditional", "ddim", Job(d.seeds, ddim_steps=50))
            r.method = f"ddim-50, {cfg.steps}-step model"
            label = f"DDIM 50, the {cfg.steps}-step model"
            d.gen.append((label, r))
            # A few hundred steps teach a DDPM to denoise, not to generate from pure noise: its samples are noise,
            # which in the figure would read as a bug. The table keeps its row.
            d.off_figure[label] = (
                f"the `{cfg.preset}` DDPM trained here for {cfg.steps} steps has not learned the high noise levels "
                "that generation from pure noise starts from: its DDIM-50 samples are noise"
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


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _relocate(folder: Path, stage: Path, final: Path) -> None:
    """The training run's records name the staging folder it ran in: name the run folder instead."""
    old, new = json.dumps(str(stage))[1:-1], json.dumps(str(final))[1:-1]
    for p in [folder / "config.json", *folder.glob("checkpoints/*/training_state.json")]:
        if p.is_file():
            write_text(p, p.read_text().replace(old, new))


# ---------------------------------------------------------------------------------------------- the report


def loss_figure(path: Path, metrics_jsonl: Path) -> bool:
    """The training loss per logged window (False when there is nothing to plot)."""
    recs = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not recs:
        return False
    fig = Figure(figsize=(4.5, 3))
    ax = fig.subplots()
    ax.semilogy([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="step", ylabel="eps-MSE (mean over log interval)", title="DDPM training loss")
    save_figure(fig, path)
    return True


def _generation_rows(d: DemoRun) -> list[dict]:
    """One row per generation result, with its copy-rate against the training (or reference) images."""
    assert d.data is not None
    copy_ref = d.data.train if d.data.train is not None else d.data.reference
    rows = []
    for _, r in d.gen:
        row = result_row(r, None, task="generation")
        cr = copy_rate(r.images, copy_ref)
        row["copy-rate"] = cr["rate"]
        row["NN PSNR"] = sum(cr["nearest_psnr"]) / len(cr["nearest_psnr"])
        rows.append(row)
    return rows


def _figures(d: DemoRun) -> dict[str, str]:
    """Every figure of the report, written into the staged run folder; returns {what: file}."""
    cfg, data, stage = d.cfg, d.data, d.stage
    assert data is not None
    upscale = max(1, round(128 / d.size))
    figs = {"test": "test_images.png"}
    save_grid(data.test[:16], stage / "test_images.png", nrow=8, upscale=upscale)
    if cfg.model is None and loss_figure(stage / "train_loss.png", stage / "train" / "metrics.jsonl"):
        figs["loss"] = "train_loss.png"
    # The reconstructions (paper protocol) beside what they reconstruct and their DIP outputs, then the new samples
    # beside held-out real images, so that a person can judge whether they pass for real.
    fitted = [(label, r) for label, r in d.gen if "dip_output" in r.info]
    labelled_comparison(
        stage / "generation.png",
        [
            ("held-out images (real, never trained on)", data.test),
            ("training images" if data.train is not None else "reference images", data.reference),
            *[("G_psi(z): DIP output", r.info["dip_output"]) for _, r in fitted],
            *[(label, r.images) for label, r in fitted],
            *[(label, r.images) for label, r in d.gen if "dip_output" not in r.info and label not in d.off_figure],
        ],
        upscale=upscale,
    )
    paper_noisy = d.paper[0].inputs
    assert paper_noisy is not None and d.noisy is not None  # the denoising phases ran before the figures
    labelled_comparison(
        stage / "denoise_paper.png",
        [
            ("clean", data.test),
            (f"x_{d.t_noisy} (noisy)", paper_noisy),
            *[
                (f"{r.method} (oracle)" if r.dip is not None else f"{r.method} ({r.reverse_steps} steps)", r.images)
                for r in d.paper
            ],
        ],
        upscale=upscale,
    )
    labelled_comparison(
        stage / "denoise_blind.png",
        [
            ("clean", data.test),
            (f"noisy (sigma {cfg.sigma:g})", d.noisy),
            *[(r.method, r.images) for r in d.blind],
        ],
        upscale=upscale,
    )
    curves = {f"generation {label}": r.dip.mean_curves() for label, r in d.gen if r.dip is not None}
    curves.update({f"{r.protocol} {r.method}": r.dip.mean_curves() for r in d.paper + d.blind if r.dip is not None})
    curves_figure(stage / "dip_curves.png", curves)
    figs["curves"] = "dip_curves.png"
    return figs


def _report(d: DemoRun) -> None:
    """metrics.json and report.md, with the figures (into the staged run folder)."""
    cfg = d.cfg
    with d.phases("report"):
        figs = _figures(d)
        gen_rows = _generation_rows(d)
        den_rows = [result_row(r, d.data.test, task="denoising") for r in d.paper + d.blind]  # type: ignore[union-attr]
        paper_dip = dataclasses.asdict(d.ctx.dip)  # type: ignore[union-attr]
        blind_dip = dataclasses.asdict(dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters))
        env = {
            "device": str(d.ctx.device),  # type: ignore[union-attr]
            "threads": d.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_start": d.load_start,
            "load_average_end": _loadavg(),
        }
        config = dataclasses.asdict(cfg) | {
            "model_used": d.model_label,
            "size_used": d.size,
            "dip_paper": paper_dip,
            "dip_blind": blind_dip,
        }
        write_json(
            d.stage / "metrics.json",
            {
                "generation": gen_rows,
                "denoising": den_rows,
                "train": d.train_info,
                "phases": [{"phase": p, "seconds": s, "note": nt} for p, s, nt in d.phases.times],
                "config": config,
                "environment": env,
            },
        )
        write_text(d.stage / "report.md", report_md(d, figs, env, gen_rows, den_rows))


def report_md(d: DemoRun, figs: dict[str, str], env: dict, gen_rows: list[dict], den_rows: list[dict]) -> str:
    """report.md: the run's header and phases, training, protocols, generation, denoising, how to read it."""
    return "\n".join(
        _md_header(d, figs, env)
        + _md_training(d, figs)
        + PROTOCOLS_MD
        + _md_generation(d, gen_rows)
        + _md_denoising(d, figs, den_rows)
        + READING_MD
        + _md_reproduce(d)
    )


def _md_header(d: DemoRun, figs: dict[str, str], env: dict) -> list[str]:
    cfg = d.cfg
    if cfg.uses_embedded:
        model = (
            f"every figure and row below except the training section and the `ddim-50, {cfg.steps}-step model` "
            "row comes from the **embedded default DDPM** shipped in the package "
            "(`tdpm_dip/weights/ddpm-sprites32`, trained by `recipes/embedded_default.sh` on 16384 sprites, on "
            "noise levels 1..500 only: a truncated DDPM, so no row starts from pure noise with it); "
            f"the `{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`) shows Algorithm 1."
        )
    elif cfg.model is None:
        model = f"a `{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`)."
    else:
        model = f"`{d.model_label}`."
    assert d.data is not None
    return [
        "# TDPM-DIP demo",
        "",
        f"Data: {d.data.source}, {d.size}x{d.size} px. Model: {model}",
        f"Device: {env['device']}, {env['threads']} CPU thread(s), torch {env['torch']}; "
        f"load average at start {env['load_average_start']} on {env['cpu_count']} cores (other work on the "
        "machine slows every phase).",
        "",
        "## Phases",
        "",
        "| phase | seconds | what |",
        "|---|---|---|",
        *[f"| {p} | {s:.1f} | {nt} |" for p, s, nt in d.phases.times],
        f"| total (without this page) | {d.phases.total:.1f} | |",
        "",
        f"![test images]({figs['test']})",
        "",
        f"*The {cfg.n} test images (held out: never trained on).*",
        "",
    ]


def _md_training(d: DemoRun, figs: dict[str, str]) -> list[str]:
    cfg, info = d.cfg, d.train_info
    if cfg.model is not None:
        return []
    lines = [
        "## Training (Algorithm 1)",
        "",
        f"`{cfg.preset}` UNet, {cfg.steps} AdamW steps at batch {cfg.train_batch}, lr {cfg.train_lr:g}, "
        f"EMA weights exported; median throughput {info.get('img_s')} images/s, final loss "
        f"{info.get('final_loss', float('nan')):.4f}. A few hundred steps give a usable denoiser "
        "at small noise levels; its samples from pure noise stay rough"
        + (
            " (its DDIM-50 row below, beside the embedded default's samples)." if cfg.uses_embedded else " (see below)."
        ),
        "",
    ]
    if "loss" in figs:
        lines += [f"![training loss]({figs['loss']})", ""]
    return lines


PROTOCOLS_MD = [
    "## Protocols",
    "",
    "Every row of the tables says which protocol produced it.",
    "",
    "- **paper** (the report's, an *oracle*): the DIP target is built from the **clean** image, "
    'x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, with the DIP\'s own input z. Its "denoising" never '
    "looks at the noisy image, so DIP / TDPM-DIP PSNR measures how well a small network reproduces a "
    'known image in a fixed number of iterations; its "generation" reconstructs the reference images '
    "(the copy-rate shows it).",
    "- **blind** (an honest denoiser): only the noisy image y = x0 + n and its noise level are used; "
    "the clean image is used only to score the result.",
    "- **unconditional**: generation from pure noise N(0, I); no reference image is involved.",
    "",
]


def _md_generation(d: DemoRun, gen_rows: list[dict]) -> list[str]:
    cfg = d.cfg
    ref = "training" if d.cfg.model is None else "reference"
    return [
        "## Generation",
        "",
        "![generation](generation.png)",
        "",
        f"Rows: the {ref} images the DIPs were fitted to (paper protocol), the fitted DIP outputs G_psi(z) (the "
        f"truncated chain's start x_{cfg.t_trunc}), then each method: "
        + "; ".join(label for label, _ in d.gen if label not in d.off_figure)
        + ". "
        + "".join(f"Not in the figure, only in the table: {lab}, because {why}. " for lab, why in d.off_figure.items())
        + "Amortized TDPM makes new images (the shipped generator's "
        "G_psi(z), z ~ N(0, I), then the DDPM's reverse steps from its T_trunc). copy-rate: share of images within "
        f"25 dB PSNR of a {ref} image (NN PSNR: mean PSNR to the nearest one). "
        'TDPM-DIP "generates" copies by construction.',
        "",
        table(gen_rows),
    ]


def _md_denoising(d: DemoRun, figs: dict[str, str], den_rows: list[dict]) -> list[str]:
    cfg = d.cfg
    paper_dip = d.ctx.dip  # type: ignore[union-attr]
    blind_dip = dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters)
    # The chain length of blind TDPM-DIP (the method whose DIP fits the plug-in target): one, or one per image.
    chained = [r.info["t_trunc"] for r in d.blind if registry.get("denoise", "blind", r.method).dip == "plugin"]
    t_used = next((f"{min(t)}-{max(t)} (per image)" if isinstance(t, list) else t for t in chained), "automatic")
    lines = [
        "## Denoising",
        "",
        f"Paper protocol (x0 noised to level t={d.t_noisy}, then each method):",
        "",
        "![denoising, paper protocol](denoise_paper.png)",
        "",
        f"Blind protocol (Gaussian noise of sigma {cfg.sigma:g} on 0..255, rounded and clipped to 8 bits as in a "
        "saved noisy file; rows: the registry's blind methods, best first):",
        "",
        "![denoising, blind protocol](denoise_blind.png)",
        "",
        table(den_rows),
        f"Settings: DIP `{paper_dip.preset}`; paper protocol {paper_dip.iters} iterations at lr {paper_dip.lr:g}; "
        f"blind {blind_dip.iters} iterations at lr {blind_dip.lr:g} with input noise {blind_dip.input_noise:g} and "
        f"an output average ({blind_dip.average}). Every blind diffusion method first gives clipped pixels back the "
        "noise that clipping removed (declip), then scales y to the level t* whose noise-to-signal ratio matches "
        "sigma. ensemble: one Tweedie call at t* per flip/transpose, averaged (8 calls); tweedie: one call; ddpm: "
        f"the mean of {cfg.samples} chains of t* steps. Blind TDPM-DIP: Algorithm 2 with the ensemble estimate in "
        f"place of the clean image, then T reverse steps (here T = {t_used}), {cfg.samples} chains averaged. "
        f"PSNR/SSIM on [0, 1] images; s/img is wall time per image for {cfg.n} images processed together.",
        "",
    ]
    if "curves" in figs:
        lines += [
            "![DIP curves](dip_curves.png)",
            "",
            "*DIP fitting: MSE to its target and, where the clean image is known, PSNR of the raw DIP "
            "output to it, per iteration (mean over images).*",
            "",
        ]
    return lines


READING_MD = [
    "## Reading these numbers",
    "",
    "- Paper-protocol DIP / TDPM-DIP numbers are not a denoiser's: the target they fit is the clean image "
    "(lightly noised at T_trunc). DDPM from t_noisy must invent most of the image and scores far lower.",
    "- Blind numbers are what a user with only a noisy photo gets; compare them with the noisy input's "
    "PSNR (`input PSNR`).",
    "- These are tiny networks trained for seconds on tiny images: the orders of magnitude, not the "
    "report's values, are the point. `tdpm-dip bench` runs the report's tables on real data.",
    "",
]


def _md_reproduce(d: DemoRun) -> list[str]:
    cfg = d.cfg
    paper_dip = d.ctx.dip  # type: ignore[union-attr]
    blind_dip = dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters)
    model = "" if cfg.uses_embedded else f" --model {d.model_label}"
    test = Path(cfg.out) / "data" / "test"
    return [
        "## Reproduce single steps with the CLI",
        "",
        "```",
        f"tdpm-dip denoise{model} --clean {test} --protocol paper --t-noisy {d.t_noisy} "
        f"--dip-preset {paper_dip.preset} --dip-iters {paper_dip.iters} --dip-lr {paper_dip.lr:g} --seed {cfg.seed} "
        "--out den_paper",
        f"tdpm-dip denoise{model} --clean {test} --sigma {cfg.sigma:g} --method ensemble --method tdpm-dip "
        f"--dip-preset {blind_dip.preset} --dip-iters {blind_dip.iters} --seed {cfg.seed} --out den_blind",
        "```",
        "",
    ]

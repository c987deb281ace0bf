"""`tdpm-dip demo`: the whole method end to end, offline, in minutes on two CPU cores.

Phases (each timed, each with a progress bar where it takes a while):
  data        procedural sprites made in code (`data.make_sprites`), or the images of `--data`;
              the first n are the test images, the rest the training set (written to RUN/data/)
  train       a small DDPM (Algorithm 1, `train.train`) on RUN/data/train; skipped with `--model`
  generation  DDPM from pure noise vs TDPM-DIP (paper protocol: it reconstructs training images)
  denoising   DDPM, DIP, TDPM-DIP under the paper protocol (t = 600); every blind method of the
              registry on 8-bit noise (sigma 25)
  report      RUN/report.md with the figures, one metric table per task and the phase times

Everything the report shows is computed by the library's task functions (`tasks.generate`,
`tasks.denoise_paper`, `tasks.denoise_blind`) and rendered by `reporting`; this module only wires
them together and writes the page. The whole run folder (data/, train/, figures, report) is built
beside RUN and replaces an earlier run only when complete, so an interrupted demo leaves the earlier
run as it was.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import get_preset
from .dip import DIPConfig, dip_defaults
from .errors import UserError

# The DIP presets the demo offers; their settings come from dip.DIP_DEFAULTS (paper and blind rows).
DIP_PRESETS = ("dip-tiny", "dip-small", "paper-dip-noattn", "paper-dip")
# What a demo writes in RUN: with --overwrite, a new run replaces these whole (other files stay).
DEMO_FILES = ("data", "train", "report.md", "metrics.json", "test_images.png", "train_loss.png", "generation.png",
              "denoise_paper.png", "denoise_blind.png", "dip_curves.png")


@dataclass(frozen=True)
class DemoConfig:
    """Options of `tdpm-dip demo` (the CLI documents each one)."""

    out: str
    data: str | None = None          # None: procedural sprites
    model: str | None = None         # None: train the demo DDPM first
    n: int = 8                       # test images (denoising) and generated images
    steps: int = 200                 # training steps
    size: int = 32                   # image side when training (a --model fixes its own)
    seed: int = 0
    train_images: int = 256          # sprites in the training set (without --data)
    train_batch: int = 16
    train_lr: float = 2e-3
    preset: str = "demo"             # DDPM preset when training
    sigma: float = 25.0              # blind protocol noise (0..255)
    t_noisy: int = 600               # paper protocol noise level
    t_trunc: int = 10                # TDPM-DIP T_trunc (generation and paper denoising)
    ddpm_steps: int = 1000           # generation DDPM steps (< 1000: strided ancestral sampler)
    dip_preset: str = "dip-tiny"
    dip_iters: int = 100             # paper protocol and generation (the report's 100)
    blind_dip_iters: int = 200
    samples: int = 4                 # blind TDPM-DIP chains averaged per image
    batch_size: int = 16             # images processed (DIPs fitted) at once
    overwrite: bool = False
    embedded: bool = True            # sprites without --model: generate and denoise with the shipped DDPM

    @property
    def uses_embedded(self) -> bool:
        """Generation and denoising use the embedded default DDPM; the run still trains (Algorithm 1)."""
        return self.embedded and self.model is None and self.data is None

    def validate(self) -> None:
        for name in ("n", "steps", "train_images", "train_batch", "dip_iters", "blind_dip_iters", "samples",
                     "batch_size", "ddpm_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if not self.train_lr > 0:
            raise UserError(f"--train-lr must be > 0, got {self.train_lr}")
        if not 0 < self.sigma <= 255:
            raise UserError(f"--sigma must be in (0, 255], got {self.sigma}")
        if self.ddpm_steps > 1000:
            raise UserError(f"--ddpm-steps must be <= 1000, got {self.ddpm_steps}")
        if not 1 <= self.t_noisy <= 1000:
            raise UserError(f"--t-noisy must be in [1, 1000], got {self.t_noisy}")
        if not 0 <= self.t_trunc < 1000:
            raise UserError(f"--t-trunc must be in [0, 999], got {self.t_trunc}")
        if self.dip_preset not in DIP_PRESETS:
            raise UserError(f"--dip-preset must be one of {', '.join(DIP_PRESETS)}, got {self.dip_preset!r}")
        if self.uses_embedded:
            from .embedded import default_size

            if self.size != default_size():
                raise UserError(f"--size {self.size}: the embedded default model is {default_size()} px; pass "
                                "--no-embedded to generate and denoise with the model trained here at another size")
        if self.model is None:
            factor = 2 ** (len(get_preset(self.preset).block_out_channels) - 1)
            if self.size < 8 or self.size % factor:
                raise UserError(f"--size must be >= 8 and a multiple of {factor}, got {self.size}")
            if self.data is None and self.train_batch > self.train_images:
                raise UserError(f"--train-batch {self.train_batch} is larger than the training set "
                                f"({self.train_images} sprites)")


def pick_threads(threads: int) -> int:
    """CPU threads for torch: `threads` if > 0; else all cores on an idle machine, 1 on a busy one.

    A second intra-op thread speeds the demo's 0.69M networks up by a third when the cores are free,
    but on cores that other processes keep busy, OpenMP threads that wait for each other are
    catastrophically slow (tens of times slower), so a busy machine gets one thread.
    """
    if threads > 0:
        return threads
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1
    cores = torch.get_num_threads()
    return cores if load < cores / 2 else 1


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
    test: torch.Tensor            # [n, 3, S, S]: the images to denoise
    reference: torch.Tensor       # what TDPM-DIP generation reconstructs (paper protocol)
    train: torch.Tensor | None    # the training set (copy-rate reference); None with --model
    source: str


def make_data(cfg: DemoConfig, size: int, run: Path) -> DemoData:
    from .data import load_images, make_sprites
    from .outputs import save_set

    if cfg.data is None:
        test = make_sprites(cfg.n, size, seed=cfg.seed + 1)  # another seed: held out, never trained on
        if cfg.model is None:
            train = make_sprites(cfg.train_images, size, seed=cfg.seed)
            ref, src = train.images[: cfg.n], f"{cfg.train_images} procedural sprites (seed {cfg.seed})"
        else:
            train, ref, src = None, make_sprites(cfg.n, size, seed=cfg.seed).images, "procedural sprites"
        save_set(test.images, test.names, run / "data" / "test")
        if train is not None:
            save_set(train.images, train.names, run / "data" / "train")
        return DemoData(test.images, ref, train.images if train is not None else None, src)

    allset = load_images(cfg.data, size, progress=True)
    n_all = len(allset)
    if n_all <= cfg.n:
        raise UserError(f"{cfg.data}: {n_all} images; the demo needs more than --n {cfg.n} "
                        "(the first n are the test images, the rest the training / reference set)")
    test, rest = allset.images[: cfg.n], allset.images[cfg.n:]
    save_set(test, allset.names[: cfg.n], run / "data" / "test")
    if cfg.model is None:
        if rest.shape[0] < cfg.train_batch:
            raise UserError(f"{cfg.data}: {rest.shape[0]} training images (after {cfg.n} test images), fewer "
                            f"than --train-batch {cfg.train_batch}")
        save_set(rest, allset.names[cfg.n:], run / "data" / "train")
    ref = rest[: cfg.n] if rest.shape[0] >= cfg.n else test
    return DemoData(test, ref, rest if cfg.model is None else None, f"{n_all} images from {cfg.data}")


# ---------------------------------------------------------------------------------------------- figures

def loss_figure(path: Path, metrics_jsonl: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.semilogy([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="step", ylabel="eps-MSE (mean over log interval)", title="DDPM training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- the run

def run_demo(cfg: DemoConfig, device: torch.device, amp_dtype: torch.dtype | None, threads: int,
             echo: Callable[[str], None]) -> Path:
    """Run every phase into `cfg.out`; returns the path of report.md.

    The run is built in a folder beside `cfg.out` and replaces an earlier run there only once complete
    (`outputs.staged_dir`): interrupted, it is removed and the earlier run stays as it was."""
    from .outputs import prepare_out_dir, staged_dir

    cfg.validate()
    final = prepare_out_dir(cfg.out, cfg.overwrite)
    with staged_dir(final, owned=DEMO_FILES) as run:
        _run_phases(cfg, run, final, device, amp_dtype, threads, echo)
        _relocate(run / "train", run, final)
    return final / "report.md"


def _relocate(folder: Path, stage: Path, final: Path) -> None:
    """The training run's records name the staging folder it ran in: name the run folder instead."""
    from .outputs import write_text

    old, new = json.dumps(str(stage))[1:-1], json.dumps(str(final))[1:-1]
    for p in [folder / "config.json", *folder.glob("checkpoints/*/training_state.json")]:
        if p.is_file():
            write_text(p, p.read_text().replace(old, new))


def _run_phases(cfg: DemoConfig, run: Path, final: Path, device: torch.device, amp_dtype: torch.dtype | None,
                threads: int, echo: Callable[[str], None]) -> None:
    """Every phase, written into `run`: the staging folder of the run folder `final`."""
    from .metrics import copy_rate
    from .models import load_ddpm, unet_size
    from .noise import check_level, num_levels
    from .outputs import save_grid, write_json, write_text
    from .reporting import curves_figure, result_row, table
    from .registry import methods
    from .reporting import labelled_comparison
    from .tasks import Context, Result, add_noise, denoise_blind, denoise_paper, generate
    from .tasks import validate_t_trunc

    # vmap over the DIPs' attention falls back to a per-image loop on the CPU; correct, only slower.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    load_start = _loadavg()
    phases = Phases(echo)
    echo(f"tdpm-dip demo -> {final}  (device {device}, {threads} CPU thread(s), load average {load_start})")

    # The model decides the image size; load it first when one is given (or the embedded default is used).
    unet = scheduler = None
    size = cfg.size
    if cfg.model is not None or cfg.uses_embedded:
        from .embedded import default_ddpm

        source = cfg.model if cfg.model is not None else default_ddpm()
        with phases("load model") as note:
            unet, scheduler = load_ddpm(source, device=device)
            size = unet_size(unet.config)
            note["note"] = f"{source}, {size}x{size}"

    with phases("data") as note:
        data = make_data(cfg, size, run)
        note["note"] = (f"{data.source}: {cfg.n} test images"
                        + (f", {data.train.shape[0]} training images" if data.train is not None else ""))

    train_info: dict = {}
    short_unet = None  # the model trained here, when the embedded default does the generating and denoising
    if cfg.model is None:
        from .train import TrainConfig, train

        tcfg = TrainConfig(
            data=str(run / "data" / "train"), out=str(run / "train"), preset=cfg.preset, size=size,
            steps=cfg.steps, batch_size=cfg.train_batch, lr=cfg.train_lr, warmup_steps=min(50, cfg.steps // 5),
            ema_decay=0.99, seed=cfg.seed, log_every=max(1, min(10, cfg.steps // 10)), checkpoint_every=0,
            sample_every=0, n_samples=0, overwrite=True)
        with phases("train") as note:
            cpu_only = device.type == "cpu" and torch.cuda.is_available()
            if cpu_only:  # accelerate picks the GPU unless told otherwise
                os.environ["ACCELERATE_USE_CPU"] = "true"
            model_dir = train(tcfg)
            recs = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines() if x]
            img_s = [r["img_s"] for r in recs if r.get("img_s")]
            train_info = {"steps": cfg.steps, "batch": cfg.train_batch, "lr": cfg.train_lr, "preset": cfg.preset,
                          "final_loss": recs[-1]["loss"] if recs else None,
                          "img_s": sorted(img_s)[len(img_s) // 2] if img_s else None}
            note["note"] = (f"{cfg.steps} steps x batch {cfg.train_batch}, preset {cfg.preset}, "
                            f"median {train_info['img_s']} img/s")
        trained_label = str(final / model_dir.relative_to(run))
        if cfg.uses_embedded:
            short_unet, _ = load_ddpm(model_dir, device=device)
            model_label = "embedded default (tdpm_dip/weights/ddpm-sprites32)"
        else:
            unet, scheduler = load_ddpm(model_dir, device=device)
            model_label = trained_label
    else:
        model_label = cfg.model

    assert unet is not None and scheduler is not None
    T = num_levels(scheduler)
    check_level(scheduler, cfg.t_noisy, "--t-noisy")
    validate_t_trunc(scheduler, cfg.t_trunc)
    if cfg.ddpm_steps > T:
        raise UserError(f"--ddpm-steps must be <= {T}")
    paper_dip = dip_defaults("paper", cfg.dip_preset, cfg.dip_iters)
    blind_dip = dip_defaults("blind", cfg.dip_preset, cfg.blind_dip_iters)
    ctx = Context(unet, scheduler, paper_dip, device, amp_dtype, cfg.batch_size, progress=True,
                  dip_plugin=dip_defaults("plugin", cfg.dip_preset, cfg.blind_dip_iters))
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    upscale = max(1, round(128 / size))

    # -------------------------------------------------------------- generation
    gen: list[Result] = []
    with phases("generation: DDPM") as note:
        if cfg.ddpm_steps == T:
            r = generate(ctx, "ddpm", seeds)
        else:
            r = generate(ctx, "ddim", seeds, ddim_steps=cfg.ddpm_steps, ddim_eta=1.0)
            r.method = f"ddpm ({cfg.ddpm_steps} strided steps)"
        gen.append(r)
        note["note"] = f"{r.steps} reverse steps, {r.seconds_per_image:.2f} s/img"
    with phases("generation: TDPM-DIP") as note:
        r = generate(ctx, "tdpm-dip", seeds, t_trunc=cfg.t_trunc, reference=data.reference)
        gen.append(r)
        note["note"] = f"DIP {cfg.dip_iters} it + {cfg.t_trunc} steps, {r.seconds_per_image:.2f} s/img"
    from .embedded import resolve_generator

    shipped_gen = resolve_generator(None, None) if cfg.uses_embedded else None
    if shipped_gen is not None:
        from .generator import load_generator

        with phases("generation: amortized TDPM") as note:
            ctx.generator = load_generator(shipped_gen, unet, scheduler, device)
            r = generate(ctx, "tdpm", seeds)
            gen.append(r)
            note["note"] = f"G_psi(z) + {ctx.generator.t_trunc} steps, {r.seconds_per_image:.3f} s/img"
    if short_unet is not None:
        with phases("generation: the model trained here (DDIM 50)") as note:
            r = generate(dataclasses.replace(ctx, unet=short_unet), "ddim", seeds, ddim_steps=50)
            r.method = f"ddim-50, {cfg.steps}-step model"
            gen.append(r)
            note["note"] = f"{r.seconds_per_image:.2f} s/img"
    copy_ref = data.train if data.train is not None else data.reference
    gen_rows = []
    for r in gen:
        row = result_row(r, None, task="generation")
        cr = copy_rate(r.images, copy_ref)
        row["copy-rate"] = cr["rate"]
        row["NN PSNR"] = sum(cr["nearest_psnr"]) / len(cr["nearest_psnr"])
        gen_rows.append(row)

    # -------------------------------------------------------------- denoising, paper protocol
    paper: list[Result] = []
    with phases(f"denoising, paper protocol (t={cfg.t_noisy})") as note:
        for m in ("ddpm", "dip", "tdpm-dip"):
            paper.append(denoise_paper(ctx, data.test, m, seeds, cfg.t_noisy, cfg.t_trunc))
        note["note"] = ", ".join(f"{r.method} {r.seconds_per_image:.2f} s/img" for r in paper)

    # -------------------------------------------------------------- denoising, blind protocol
    ctx.dip = blind_dip
    noisy = add_noise(data.test, cfg.sigma, seeds, "clipped")  # what a saved 8-bit noisy file holds
    with phases(f"denoising, blind protocol (sigma={cfg.sigma:g}, clipped 8-bit)") as note:
        # Every blind method of the registry that needs no optional extra, best first.
        blind = [denoise_blind(ctx, noisy, m.name, seeds, cfg.sigma, samples=cfg.samples, clean=data.test)
                 for m in methods("denoise", "blind") if m.extra is None]
        by_name = {r.method: r for r in blind}
        r_dip, r_tdpm = by_name["dip"], by_name["tdpm-dip"]
        note["note"] = ", ".join(f"{r.method} {r.seconds_per_image:.2f} s/img" for r in blind)
    den_rows = [result_row(r, data.test, task="denoising") for r in paper + blind]

    # -------------------------------------------------------------- report
    with phases("report"):
        tmp = run  # the report and its figures: straight into the staged run folder
        figs: dict[str, str] = {}
        ref_label = "training images" if data.train is not None else "reference images"
        save_grid(data.test[:16], tmp / "test_images.png", nrow=8, upscale=upscale)
        figs["test"] = "test_images.png"
        if cfg.model is None and loss_figure(tmp / "train_loss.png", run / "train" / "metrics.jsonl"):
            figs["loss"] = "train_loss.png"
        labelled_comparison(tmp / "generation.png", [
            (ref_label, data.reference), ("G_psi(z): DIP output", gen[1].info["dip_output"]),
            (f"TDPM-DIP (T_trunc={cfg.t_trunc})", gen[1].images), (f"DDPM ({gen[0].steps} steps)", gen[0].images),
            *[(f"TDPM amortized (T_trunc={r.info['t_trunc']})" if r.method == "tdpm" else
               f"DDIM 50, the {cfg.steps}-step model", r.images) for r in gen[2:]],
        ], upscale=upscale)
        labelled_comparison(tmp / "denoise_paper.png", [
            ("clean", data.test), (f"x_{cfg.t_noisy} (noisy)", paper[0].inputs), (f"DDPM ({cfg.t_noisy} steps)",
                                                                                paper[0].images),
            ("DIP (oracle target)", paper[1].images), ("TDPM-DIP (oracle)", paper[2].images),
        ], upscale=upscale)
        labelled_comparison(tmp / "denoise_blind.png", [
            ("clean", data.test), (f"noisy (sigma {cfg.sigma:g})", noisy), *[(r.method, r.images) for r in blind],
        ], upscale=upscale)
        curves = {"generation TDPM-DIP": gen[1].dip.mean_curves()} if gen[1].dip is not None else {}
        curves.update({f"paper {r.method}": r.dip.mean_curves() for r in paper if r.dip is not None})
        curves["blind DIP"] = r_dip.dip.mean_curves()
        curves_figure(tmp / "dip_curves.png", curves)
        if (tmp / "dip_curves.png").exists():
            figs["curves"] = "dip_curves.png"
        env = {"device": str(device), "threads": threads, "torch": torch.__version__,
               "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "load_average_start": load_start, "load_average_end": _loadavg()}
        config = dataclasses.asdict(cfg) | {"model_used": model_label, "size_used": size,
                                            "dip_paper": dataclasses.asdict(paper_dip),
                                            "dip_blind": dataclasses.asdict(blind_dip)}
        write_json(tmp / "metrics.json", {"generation": gen_rows, "denoising": den_rows, "train": train_info,
                                          "phases": [{"phase": p, "seconds": s, "note": nt} for p, s, nt in
                                                     phases.times], "config": config, "environment": env})
        outcome = DemoOutcome(cfg, data, size, model_label, gen, gen_rows, den_rows, paper_dip, blind_dip, r_tdpm,
                              phases, figs, env, train_info)
        write_text(tmp / "report.md", _report_md(outcome, table))
    echo(f"demo finished in {phases.total:.0f} s")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass
class DemoOutcome:
    """Everything a finished demo hands to its report page."""

    cfg: DemoConfig
    data: DemoData
    size: int
    model_label: str
    gen: list                      # generation Results: DDPM, TDPM-DIP
    gen_rows: list[dict]
    den_rows: list[dict]
    paper_dip: DIPConfig
    blind_dip: DIPConfig
    r_tdpm: object                 # the blind TDPM-DIP Result
    phases: Phases
    figs: dict[str, str]
    env: dict
    train_info: dict


def _report_md(o: DemoOutcome, table: Callable[[list[dict]], str]) -> str:
    cfg, data, size, model_label, gen, gen_rows, den_rows = o.cfg, o.data, o.size, o.model_label, o.gen, o.gen_rows, \
        o.den_rows
    paper_dip, blind_dip, r_tdpm, phases, figs, env, train_info = o.paper_dip, o.blind_dip, o.r_tdpm, o.phases, \
        o.figs, o.env, o.train_info
    trained = cfg.model is None
    t_used = r_tdpm.info.get("t_trunc")
    t_used_s = t_used if not isinstance(t_used, list) else f"{min(t_used)}-{max(t_used)} (per image)"
    lines = [
        "# TDPM-DIP demo",
        "",
        f"Data: {data.source}, {size}x{size} px. Model: "
        + (f"every figure and row below except the training section and the `ddim-50, {cfg.steps}-step model` row "
           "comes from the **embedded default DDPM** shipped in the package (`tdpm_dip/weights/ddpm-sprites32`, "
           "trained by `recipes/embedded_default.sh` on 4096 sprites); the "
           f"`{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`) shows Algorithm 1."
           if cfg.uses_embedded else
           f"a `{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`)." if trained
           else f"`{model_label}`."),
        f"Device: {env['device']}, {env['threads']} CPU thread(s), torch {env['torch']}; "
        f"load average at start {env['load_average_start']} on {env['cpu_count']} cores (other work on the "
        "machine slows every phase).",
        "",
        "## Phases",
        "",
        "| phase | seconds | what |",
        "|---|---|---|",
        *[f"| {p} | {s:.1f} | {nt} |" for p, s, nt in phases.times],
        f"| total (without this page) | {phases.total:.1f} | |",
        "",
        f"![test images]({figs['test']})",
        "",
        f"*The {cfg.n} test images (held out: never trained on).*",
        "",
    ]
    if trained:
        lines += ["## Training (Algorithm 1)", "",
                  f"`{cfg.preset}` UNet, {cfg.steps} AdamW steps at batch {cfg.train_batch}, lr {cfg.train_lr:g}, "
                  f"EMA weights exported; median throughput {train_info.get('img_s')} images/s, final loss "
                  f"{train_info.get('final_loss', float('nan')):.4f}. A few hundred steps give a usable denoiser "
                  "at small noise levels; its samples from pure noise stay rough"
                  + (" (its DDIM-50 row below, beside the embedded default's samples)." if cfg.uses_embedded
                     else " (see below)."), ""]
        if "loss" in figs:
            lines += [f"![training loss]({figs['loss']})", ""]
    lines += [
        "## Protocols",
        "",
        "Every row of the tables says which protocol produced it.",
        "",
        "- **paper** (the report's, an *oracle*): the DIP target is built from the **clean** image, "
        "x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, with the DIP's own input z. Its \"denoising\" never "
        "looks at the noisy image, so DIP / TDPM-DIP PSNR measures how well a small network reproduces a "
        "known image in a fixed number of iterations; its \"generation\" reconstructs the reference images "
        "(the copy-rate shows it).",
        "- **blind** (an honest denoiser): only the noisy image y = x0 + n and its noise level are used; "
        "the clean image is used only to score the result.",
        "- **noise**: DDPM generation from pure noise N(0, I); no reference image is involved.",
        "",
        "## Generation",
        "",
        "![generation](generation.png)",
        "",
        f"Rows: the {'training' if trained else 'reference'} images the DIPs were fitted to (paper protocol), "
        f"the fitted DIP outputs G_psi(z) (the truncated chain's start x_{cfg.t_trunc}), TDPM-DIP after "
        f"{cfg.t_trunc} reverse steps, and DDPM samples from pure noise after {gen[0].steps} steps"
        + ("; then amortized TDPM (new images: the shipped generator's G_psi(z), z ~ N(0, I), and "
           f"{next((r.info['t_trunc'] for r in gen if r.method == 'tdpm'), 0)} reverse steps)"
           if any(r.method == "tdpm" for r in gen) else "")
        + (f"; then DDIM-50 samples of the {cfg.steps}-step model trained here" if cfg.uses_embedded else "")
        + ". "
        f"copy-rate: share of images within 25 dB PSNR of a {'training' if trained else 'reference'} image "
        "(NN PSNR: mean PSNR to the nearest one). TDPM-DIP \"generates\" copies by construction.",
        "",
        table(gen_rows),
        "## Denoising",
        "",
        f"Paper protocol (x0 noised to level t={cfg.t_noisy}, then each method):",
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
        f"sigma. ensemble: one Tweedie call at t* per flip/transpose, averaged (8 calls); tweedie: one call; ddpm: "
        f"the mean of {cfg.samples} chains of t* steps. Blind TDPM-DIP: Algorithm 2 with the ensemble estimate in "
        f"place of the clean image, then T reverse steps (here T = {t_used_s}), {cfg.samples} chains averaged. "
        f"PSNR/SSIM on [0, 1] images; s/img is wall time per image for {cfg.n} images processed together.",
        "",
    ]
    if "curves" in figs:
        lines += ["![DIP curves](dip_curves.png)", "",
                  "*DIP fitting: MSE to its target and, where the clean image is known, PSNR of the raw DIP "
                  "output to it, per iteration (mean over images).*", ""]
    lines += [
        "## Reading these numbers",
        "",
        "- Paper-protocol DIP / TDPM-DIP numbers are not a denoiser's: the target they fit is the clean image "
        f"(lightly noised at T_trunc). DDPM from t={cfg.t_noisy} must invent most of the image and scores "
        "far lower.",
        "- Blind numbers are what a user with only a noisy photo gets; compare them with the noisy input's "
        "PSNR (`input PSNR`).",
        "- These are tiny networks trained for seconds on tiny images: the orders of magnitude, not the "
        "report's values, are the point. `tdpm-dip bench` runs the report's tables on real data.",
        "",
        "## Reproduce single steps with the CLI",
        "",
        "```",
        f"tdpm-dip denoise --model {model_label} --clean {Path(cfg.out) / 'data' / 'test'} --protocol paper "
        f"--t-noisy {cfg.t_noisy} --dip-preset {paper_dip.preset} --dip-iters {paper_dip.iters} "
        f"--dip-lr {paper_dip.lr:g} --seed {cfg.seed} "
        "--out den_paper",
        f"tdpm-dip denoise --model {model_label} --clean {Path(cfg.out) / 'data' / 'test'} --sigma {cfg.sigma:g} "
        f"--method ensemble --method tdpm-dip --dip-preset {blind_dip.preset} --dip-iters {blind_dip.iters} "
        f"--seed {cfg.seed} --out den_blind",
        "```",
        "",
    ]
    return "\n".join(lines)

"""`tdpm-dip bench`: the report's Tables 1-4 as data -> run -> Markdown / CSV / JSON and figures.

The work is split by subject:

- `bench_tables`: a table is a list of `RowSpec`s (method, protocol, model, parameters) derived from the
  settings and the registry, each with the report's own numbers beside it;
- `bench_cache`: `Bench` runs the rows through the registry's dispatch and caches every row and every image
  under RUN/cache, so that a re-run (or a killed run, run again) computes only what is missing;
- `bench_report`: each table's files and figures, with its protocol and the settings shrunk from the report's;
- here: the command's options (`BenchOptions`), their checks, and `run_bench`, which ties the three together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from .. import defaults, registry
from ..data import load_images
from ..errors import UserError, check_positive, check_sigma
from ..generator import read_generator_info
from ..methods import Context
from ..methods.shard import Shard, is_main_process
from ..noise import SCHEDULES, check_level, check_t_trunc, num_levels
from ..runtime import dip_config, load_context, pick_device, pick_dip_preset
from .bench_cache import Bench
from .bench_report import write_progress, write_tables
from .bench_tables import BenchSettings, fig3_specs, table_specs
from .common import RunOptions


def run_bench(tables: list[str], bench: Bench, interleave: bool = False) -> dict[str, list[dict]]:
    """Run the rows of `tables` (cached images and rows are skipped), then write each table's files into
    bench.out. `interleave`: see `Bench.run`."""
    specs = {name: table_specs(name, bench.s) for name in tables}
    fig3 = "table1" in tables and (not bench.s.methods or "tdpm-dip" in bench.s.methods)
    extra = {f"fig3-{sp.t_trunc}": sp for sp in fig3_specs(bench.s)} if fig3 else {}
    for name in tables:
        for sp in specs[name]:
            if sp.model != "linear":
                bench.context(sp.model)  # fail early when --model-cosine is missing
    bench.run([sp for name in tables for sp in specs[name]] + list(extra.values()), interleave=interleave)
    if not bench.main:
        return {}  # under a launcher the main process writes the tables
    return write_tables(tables, bench, specs, extra)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """A new or empty folder, or an earlier bench run (it has cache/, or restore/cache/): bench resumes into it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    run = (out / "cache").is_dir() or (out / "restore" / "cache").is_dir()
    if out.exists() and any(out.iterdir()) and not run and not overwrite:
        raise UserError(f"{out}: exists, is not empty and is not a bench run (use --overwrite to write into it)")
    try:
        (out / "cache").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror or e})") from None
    return out


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UserError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"{name}: expected non-negative integers, got {text!r}")
    return vals


# ------------------------------------------------------------------------------------------ the command


@dataclass(frozen=True, kw_only=True)
class BenchOptions(RunOptions):
    """Every option of `tdpm-dip bench` (the CLI documents each one)."""

    tables: tuple[str, ...]
    model: str
    data: str
    out: str
    model_cosine: str | None = None
    n: int = defaults.N_IMAGES
    protocol: str = "paper"
    sigma: float = defaults.SIGMA
    noise: str = defaults.NOISE_MODEL
    declip: bool = True
    methods: str = ""  # comma-separated table2/table4 methods of the protocol (empty: all installed)
    t_noisy: int = defaults.T_NOISY
    t_trunc: int | None = None
    t_truncs: str = ",".join(map(str, defaults.T_TRUNCS))
    samples: int = defaults.SAMPLES
    ddpm_steps: int = defaults.DDPM_STEPS
    ddim_steps: int | None = None
    fid: bool = False
    fid_weights: str | None = None
    generators: tuple[str, ...] = ()
    fig_images: int = 4
    dip_preset: str = "paper-dip"  # the report's, on any device (shrink it for CPU runs)
    interleave: bool = False  # rows advance together, one batch each in turn (Bench.run)
    reference_data: str | None = None  # table1: reference set of the distribution metrics (None: --data)
    progress_only: bool = False  # compute nothing: write RUN/progress.{md,json} (write_progress)

    def settings(self, device: torch.device) -> BenchSettings:
        """The checked settings of the run (one-line UserErrors for every bad option that needs no model)."""
        for name in ("n", "samples", "fig_images", "ddpm_steps", "ddim_steps"):
            check_positive("--" + name.replace("_", "-"), getattr(self, name))
        check_sigma(self.sigma)
        chosen = tuple(m for m in self.methods.replace(" ", "").split(",") if m)
        valid = list(dict.fromkeys(registry.names("denoise", self.protocol) + registry.names("generate")))
        unknown = [m for m in chosen if m not in valid]
        if unknown:
            raise UserError(
                f"--methods: unknown method(s) {', '.join(unknown)} for --protocol {self.protocol}; choose from "
                + ", ".join(valid)
            )
        preset = pick_dip_preset(self.dip_preset, device)
        cfgs = {use: dip_config(use, preset, self.dip_iters, self.dip_lr) for use in ("paper", "blind", "plugin")}
        return BenchSettings(
            protocol=self.protocol,
            n=self.n,
            seed=self.seed,
            sigma=self.sigma,
            noise=self.noise,
            declip=self.declip,
            methods=chosen,
            t_noisy=self.t_noisy,
            t_trunc=self.t_trunc,
            t_truncs=parse_ints(self.t_truncs, "--t-truncs"),
            samples=self.samples,
            ddpm_steps=self.ddpm_steps,
            ddim_steps=self.ddim_steps,
            fid=self.fid,
            fid_weights=self.fid_weights,
            generators=_generators_by_t_trunc(self.generators),
            reference_data=self.reference_data,
            fig_images=self.fig_images,
            dip=cfgs,
        )


def _generators_by_t_trunc(folders: tuple[str, ...]) -> dict[int, str]:
    """{T_trunc: folder} of the --generator folders (one per T_trunc)."""
    by_t: dict[int, str] = {}
    for g in folders:
        t = read_generator_info(g)["t_trunc"]
        if t in by_t:
            raise UserError(f"--generator {g} and {by_t[t]} are both for T_trunc {t}: give one per T_trunc")
        by_t[t] = g
    return by_t


def bench(opts: BenchOptions, echo: Callable[[str], None]) -> Path:
    """Run the tables' rows (cached rows are skipped) and write their files; returns the run folder."""
    names = list(defaults.BENCH_TABLES) if "all" in opts.tables else list(dict.fromkeys(opts.tables))
    if "table4" in names and opts.model_cosine is None:
        raise UserError("table4 compares schedules: it needs --model-cosine")
    settings = opts.settings(pick_device(opts.device))
    _check_rows(names, settings)
    main = is_main_process()  # under a launcher: the only process that reads and writes RUN
    out_dir = check_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)
    models = {"linear": opts.model, "cosine": opts.model_cosine}
    paper = settings.dip["paper"]

    def load(slot: str) -> tuple[Context, Shard | None]:
        echo(f"loading {models[slot]}")
        ctx, shard = load_context(
            models[slot], opts.device, opts.dtype, opts.batch_size, "paper", paper.preset, paper.iters, paper.lr
        )
        schedule = ctx.scheduler.config.beta_schedule
        if "table4" in names and schedule != SCHEDULES[slot]:  # table4's rows compare the two schedules
            flag = "--model" if slot == "linear" else "--model-cosine"
            raise UserError(f"table4 compares schedules: {flag} {models[slot]} has the {schedule} schedule, not {slot}")
        return ctx, shard

    linear, shard = load("linear")
    loaded = {"linear": linear}

    def context(slot: str) -> Context:
        return loaded.pop(slot) if slot in loaded else load(slot)[0]

    def load_data(size: int, limit: int) -> torch.Tensor:
        return load_images(opts.data, size, limit=limit, progress=main).images

    b = Bench(settings, context, opts.data, load_data, out_dir, models, echo=echo, shard=shard)
    _check_levels(b.context("linear").scheduler, opts, settings)
    if opts.reference_data is not None and "table1" in names and main:
        b.reference = load_images(opts.reference_data, b.size, progress=True).images
    if opts.progress_only:
        if main:
            write_progress(names, b)
            print((out_dir / "progress.md").read_text())
        return out_dir
    run_bench(names, b, interleave=opts.interleave)
    if main:
        for name in names:
            print((out_dir / f"{name}.md").read_text())
        echo(f"tables and figures in {out_dir}")
    return out_dir


def _check_rows(names: list[str], s: BenchSettings) -> None:
    """--methods must select a row of at least one of the tables asked for (else the run would write empty ones)."""
    if not s.methods or any(table_specs(name, s) for name in names):
        return
    every = dataclasses.replace(s, methods=())
    rows = dict.fromkeys(m for name in names for sp in table_specs(name, every) for m in sp.selectors)
    raise UserError(
        f"--methods {','.join(s.methods)}: no row of {', '.join(names)} runs them; choose from {', '.join(rows)}"
    )


def _check_levels(scheduler: DDPMScheduler, opts: BenchOptions, s: BenchSettings) -> None:
    """The noise levels and step counts of the options against the DDPM's T (one-line UserErrors)."""
    check_level(scheduler, opts.t_noisy, "--t-noisy")
    for t in ((opts.t_trunc,) if opts.t_trunc is not None else ()) + s.t_truncs:
        check_t_trunc(scheduler, t)
    T = num_levels(scheduler)
    if opts.ddpm_steps > T or (opts.ddim_steps or 0) > T:
        raise UserError(f"--ddpm-steps / --ddim-steps must be <= {T}")


__all__ = ["BenchOptions", "bench", "check_out_dir", "parse_ints", "run_bench"]

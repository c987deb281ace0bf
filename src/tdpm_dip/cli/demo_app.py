"""`tdpm-dip demo` and `app`: the method end to end in minutes, offline, and the browser app around it."""

from __future__ import annotations

import click

from .. import defaults
from ..errors import UserError, check_positive
from .common import APP_MODEL_HELP, CONTEXT, cli, echo, local_options, overwrite_option, set_threads

# ------------------------------------------------------------------------------------------ demo


@cli.command("demo", context_settings=CONTEXT)
@click.option(
    "--out",
    default="runs/demo",
    type=click.Path(file_okay=False),
    help="Run folder: report.md, figures, metrics.json, data/, train/.",
)
@overwrite_option("run folder")
@click.option(
    "--data",
    default=None,
    help="Images instead of the procedural sprites (folder or hub id): the first --n are the test "
    "images, the rest the training set (or, with --model, the generation reference).",
)
@click.option(
    "--model", default=None, help="A trained DDPM (diffusers folder or hub id): skip training; its size sets --size."
)
@click.option("--n", "n", type=int, default=defaults.DEMO_N, help="Test images to denoise, and images to generate.")
@click.option(
    "--steps",
    type=int,
    default=defaults.DEMO_STEPS,
    help=f"Training steps (batch {defaults.DEMO_TRAIN_BATCH}, preset '{defaults.DEMO_PRESET}').",
)
@click.option(
    "--train-images", type=int, default=defaults.DEMO_TRAIN_IMAGES, help="Procedural sprites in the training set."
)
@click.option(
    "--size",
    type=int,
    default=None,
    help=f"Image side in pixels. Default: {defaults.DEMO_SIZE}, or the --model's size.",
)
@click.option("--sigma", type=float, default=defaults.SIGMA, help="Blind protocol: noise std on the 0..255 scale.")
@click.option(
    "--ddpm-steps",
    type=int,
    default=defaults.DDPM_STEPS,
    help="Generation DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1). Only with a "
    "--model trained on every noise level: the embedded default is not, so it has no DDPM row.",
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
    type=click.Choice(defaults.DIP_PRESETS),
    default=defaults.DEMO_DIP_PRESET,
    help="DIP network G_psi (paper-dip: the report's 61.5M, for GPUs).",
)
@click.option(
    "--dip-iters",
    type=int,
    default=defaults.DIP["paper"]["iters"],
    help="DIP iterations, paper protocol and generation.",
)
@click.option(
    "--blind-dip-iters", type=int, default=defaults.DEMO_BLIND_DIP_ITERS, help="DIP iterations, blind protocol."
)
@click.option("--seed", type=int, default=0, help="Seed of the sprites, the training run and image i's draws (SEED+i).")
@local_options
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
    then, with the embedded default DDPM shipped in the package (trained on noise levels 1..500
    only), generates with TDPM-DIP (paper protocol), the shipped amortized TDPM and DDIM-50 of the
    model trained here, and denoises under both protocols (paper: DDPM, DIP and TDPM-DIP, the
    report's oracle, at t=500, the DDPM's highest level; blind: every blind method of the registry,
    sigma 25 on 8-bit noise). With a --model trained on every level, generation adds the DDPM row
    (--ddpm-steps) and the paper protocol runs at the report's t=600. Writes RUN/report.md with
    the figures, the metric tables, which model made each, and the phase times.
    \b
    Examples:
      tdpm-dip demo --out runs/demo
      tdpm-dip demo --model path/to/ddpm-folder --data my_images/ \\
          --n 4 --ddpm-steps 100 --out runs/demo-pokemon
    """
    from ..methods.shard import launched  # deferred: --help loads no network library
    from ..workflows.demo import DemoConfig, run_demo  # deferred: --help loads no network library

    check_positive("--size", size)
    cfg = DemoConfig(size=size or defaults.DEMO_SIZE, **kwargs)  # type: ignore[arg-type]
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
    default=defaults.APP_HOST,
    help="Address to listen on; 127.0.0.1 serves this machine only (0.0.0.0 opens it to your network).",
)
@click.option("--port", type=int, default=defaults.APP_PORT, help="Port to listen on.")
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
    help="A request (any tab) stops after this many seconds (checked between tiles, DIP iterations and chain "
    "steps), with a one-line message.",
)
@click.option(
    "--dip-preset",
    default="auto",
    help="DIP network of the dip / tdpm-dip methods; auto = paper-dip on GPU, dip-small on CPU.",
)
@local_options
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
    """Serve a browser app for denoising, restoration and generation (needs: pip install 'tdpm-dip[app]').

    \b
    Denoise: upload a noisy image (or pick an example), choose a blind method (best first),
    leave sigma blank to estimate it; the result keeps the upload's size, with its time, NFE,
    PSNR/SSIM against an optional clean image, and a PNG download. Upscale: 2x or 4x
    super-resolution. Inpaint: paint the pixels to fill; the others come back unchanged.
    Generate: a seeded grid.
    The server talks only to its browser page: no analytics, no share link.
    \b
    Example:
      tdpm-dip app --model runs/demo/train/model --port 7860     (then open http://127.0.0.1:7860)
    """
    from ..app import check_gradio, load_models  # deferred: --help loads no network library

    check_gradio()
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    check_positive("--max-side", max_side)
    check_positive("--max-seconds", max_seconds)
    set_threads(threads)
    models = load_models(model, generator, device, dip_preset)
    from ..app_ui import launch  # gradio: only once the checks passed and the models are loaded

    echo(f"serving on http://{host}:{port} (Ctrl-C stops it)")
    launch(models, host, port, max_side, max_seconds)

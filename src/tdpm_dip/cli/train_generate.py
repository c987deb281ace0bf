"""`tdpm-dip train`, `train-generator`, `train-restorer` and `generate`: train a DDPM (Algorithm 1), TDPM's amortized
generator or the restoration network, and make images with them (Table 1's methods, read from the registry)."""

from __future__ import annotations

import click

from .. import defaults, registry
from ..training.options import GeneratorConfig, RestorerConfig, TrainConfig
from .common import CONTEXT, GENERATE_MODEL_HELP, cli, compute_options, config_options, dip_options, echo, set_threads


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
    from ..training.ddpm import train  # deferred: --help loads no network library

    click.echo(str(train(TrainConfig(**kwargs))))  # type: ignore[arg-type]


@cli.command("train-generator", context_settings=CONTEXT)
@config_options(GeneratorConfig)
def train_generator_cmd(**kwargs: object) -> None:
    """Train TDPM's amortized generator G_psi(z) for a DDPM's truncated chain and export it.

    \b
    G_psi(z), z ~ N(0, I), learns q(x_T_trunc): the training images noised to T_trunc (gan), or
    the DDPM's own DDIM(z -> x_T_trunc) (distill). `generate --method tdpm --generator RUN/generator`
    then makes new images in 1 + R network calls (R: --reverse-steps, default T_trunc).
    \b
    Examples:
      tdpm-dip train-generator --model M --data train/ --t-trunc 10 --out runs/gen-gan
      tdpm-dip train-generator --model M --objective distill --t-trunc 10 --out runs/gen-distill
    """
    from ..training.generator import train_generator  # deferred: --help loads no network library

    click.echo(str(train_generator(GeneratorConfig(**kwargs))))  # type: ignore[arg-type]


@cli.command("train-restorer", context_settings=CONTEXT)
@config_options(RestorerConfig)
def train_restorer_cmd(**kwargs: object) -> None:
    """Train the restoration network that `restore --method ccdf-net` (and net) starts from.

    \b
    A small UNet learns the clean image from a classical estimate (bicubic upscaling or biharmonic
    inpainting), the share of each pixel observed and the noise level, on observations made here from
    clean images: downscaling by 2 or 4, and masks (random pixels, boxes, halves), some noisy, all 8-bit.
    Copy the folder it writes to MODEL/restorer: then restore with --model MODEL uses it.
    \b
    Examples:
      tdpm-dip train-restorer --data train/ --out runs/restorer
      cp -r runs/restorer MY_DDPM/restorer
    """
    cfg = RestorerConfig(**kwargs).check()  # type: ignore[arg-type]
    set_threads(cfg.threads)
    from ..training.restorer import train_restorer  # deferred: --help loads no network library

    click.echo(str(train_restorer(cfg)))


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
@click.option(
    "--n",
    "n",
    type=int,
    default=defaults.N_GENERATE,
    help=f"Number of images, at most {defaults.MAX_GENERATE:,} a run (held in memory until written); for more, "
    "run again with --seed raised by --n (image i uses seed SEED+i).",
)
@click.option(
    "--t-trunc",
    type=int,
    default=None,
    help=f"Truncation level T_trunc. Default: {defaults.T_TRUNC} (tdpm-dip); the generator's own "
    "(tdpm: must match it).",
)
@click.option(
    "--ddim-steps",
    type=int,
    default=defaults.GENERATE_DDIM_STEPS,
    help="DDIM network evaluations (ddim); the default matches the report's TDPM-DIP (100 DIP iterations + "
    "T_trunc 10).",
)
@click.option(
    "--reference-data", default=None, help="Images whose noised versions the DIP fits (tdpm-dip, paper protocol)."
)
@click.option("--out", default="generated", type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the images an interrupted run into --out finished (result.json marks them) and make only the rest, "
    "with the same options (image i is the same whatever the batch: seed SEED+i).",
)
@dip_options
@compute_options
def generate(threads: int, **kwargs: object) -> None:
    """Generate images with DDPM, DDIM, amortized TDPM or TDPM-DIP (Table 1's methods).

    \b
    tdpm (amortized TDPM): x_T = G_psi(z), z ~ N(0, I), then the DDPM's posterior steps from
    T_trunc to 0 (the generator's reverse steps, T_trunc unless it was trained with fewer): new
    images in 1 + that many network calls, no reference data.

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
    from ..workflows.generate import GenerateOptions  # deferred: --help loads no network library
    from ..workflows.generate import generate as run  # deferred: --help loads no network library

    set_threads(threads)
    click.echo(str(run(GenerateOptions(**kwargs), echo)))  # type: ignore[arg-type]

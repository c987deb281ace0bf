"""`tdpm-dip denoise` and `restore`: blind denoising (and the report's paper protocol), super-resolution and
inpainting. Their methods, protocols and operators are the registry's; their defaults, the table's."""

from __future__ import annotations

import click

from .. import defaults, registry
from .common import (
    CONTEXT,
    DENOISE_MODEL_HELP,
    REFERENCE_HELP,
    cli,
    compute_options,
    dip_options,
    echo,
    first_n_option,
    out_option,
    set_threads,
)

skip_bad_option = click.option(
    "--skip-bad", is_flag=True, help="--input: skip unreadable files with a warning instead of stopping."
)

# ------------------------------------------------------------------------------------------ denoise


@cli.command(context_settings=CONTEXT)
@click.option("--model", default=None, help=DENOISE_MODEL_HELP)
@click.option("--input", "input", default=None, help="Your NOISY images (folder or file): blind denoising.")
@click.option("--clean", default=None, help="CLEAN images that are noised here first, so PSNR/SSIM can be measured.")
@click.option("--reference", default=None, help=REFERENCE_HELP)
@click.option(
    "--protocol",
    type=click.Choice(registry.protocols("denoise")),
    default=defaults.DENOISE_PROTOCOL,
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
    type=click.Choice(defaults.NOISE_MODELS),
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
@first_n_option()
@skip_bad_option
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
@out_option()
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
    from ..workflows.denoise import DenoiseOptions  # deferred: --help loads no network library
    from ..workflows.denoise import denoise as run  # deferred: --help loads no network library

    set_threads(threads)
    run(DenoiseOptions(**kwargs), echo)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ restore


@cli.command(context_settings=CONTEXT)
@click.option(
    "--task",
    type=click.Choice(registry.OPERATORS),
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
@click.option("--reference", default=None, help=REFERENCE_HELP)
@click.option(
    "--scale",
    type=int,
    default=defaults.SR_SCALE,
    help=f"sr: the upscaling factor, {' or '.join(map(str, defaults.SR_SCALES))} (the observation is PIL's bicubic "
    "downscaling).",
)
@click.option(
    "--mask",
    default=None,
    help="inpaint: a mask file for every image, or a folder with a mask at each input's path under --input, any "
    "image format (white = known; grey levels split at 50 %; another size is resized with nearest-neighbour, with a "
    "warning).",
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
    help="ccdf, ccdf-net and tdpm-dip: the level the start estimate is diffused to. Default: "
    f"{defaults.RESTORE_T_TRUNC} (ccdf, tdpm-dip), {defaults.RESTORE_NET_T_TRUNC} (ccdf-net).",
)
@click.option(
    "--samples",
    type=int,
    default=defaults.RESTORE_SAMPLES,
    help="ccdf, ccdf-net and tdpm-dip: chains averaged per image (their mean is the posterior mean, which PSNR "
    "rewards); ddnm and diffpir run one chain.",
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help=f"Network calls per chain. Default: {defaults.RESTORE_STEPS} (ccdf, ccdf-net, tdpm-dip), "
    f"{defaults.RESTORE_FULL_STEPS} (ddnm, diffpir).",
)
@first_n_option()
@click.option(
    "--max-pixels",
    type=int,
    default=defaults.RESTORE_MAX_PIXELS,
    help="Refuse outputs above this many pixels (the cost grows with them).",
)
@skip_bad_option
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the images an interrupted run into --out finished (metrics.json marks them) and compute only the "
    "rest, with the same options.",
)
@out_option()
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
    from ..workflows.restore import RestoreOptions  # deferred: --help loads no network library
    from ..workflows.restore import restore as run  # deferred: --help loads no network library

    set_threads(threads)
    run(RestoreOptions(**kwargs), echo)  # type: ignore[arg-type]

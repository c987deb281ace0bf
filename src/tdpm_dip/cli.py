"""The `tdpm-dip` command. Devices and dtypes are chosen here, at the edge, and nowhere else.

Every problem the user can fix (paths, images, models, numbers) is one line on stderr and exit
code 2; Ctrl-C is exit code 130 with earlier outputs intact (results are staged, then moved in).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import click

from .errors import UserError

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


def positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be > 0, got {value}")


def echo(msg: str) -> None:
    click.echo(msg, err=True)


def common_options(f):  # noqa: ANN001, ANN201
    f = click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (GPU if present).")(f)
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
    f = click.option("--dip-iters", type=int, default=None,
                     help="DIP iterations i_max. Default: 100 (report) for the paper protocol, 400 for blind.")(f)
    f = click.option("--dip-lr", type=float, default=None,
                     help="DIP Adam learning rate. Default: 1e-4 (report) for paper, 1e-3 for blind.")(f)
    return f


def dip_config(protocol: str, preset: str, iters: int | None, lr: float | None):  # noqa: ANN201
    from .dip import DIPConfig
    from .tasks import BLIND_DIP

    if iters is not None and iters < 1:
        raise UserError(f"--dip-iters must be >= 1, got {iters}")
    positive("--dip-lr", lr)
    if protocol == "blind":
        return dataclasses.replace(BLIND_DIP, preset=preset, iters=iters or BLIND_DIP.iters, lr=lr or BLIND_DIP.lr)
    return DIPConfig(preset=preset, iters=iters or 100, lr=lr or 1e-4)


def load_context(model: str, device_name: str, dtype: str, batch_size: int, dip_cfg_fn):  # noqa: ANN001, ANN201
    from .models import load_ddpm
    from .tasks import Context

    positive("--batch-size", batch_size)
    device = pick_device(device_name)
    unet, scheduler = load_ddpm(model, device=device)
    return Context(unet, scheduler, dip_cfg_fn(device), device, pick_amp(dtype, device), batch_size, progress=True)


def model_size(ctx) -> int:  # noqa: ANN001
    s = ctx.unet.config.sample_size
    return int(s[0] if isinstance(s, (tuple, list)) else s)


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


# ------------------------------------------------------------------------------------------ generate

@cli.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="DDPM: a diffusers folder (unet/ + scheduler/) or a hub id.")
@click.option("--method", type=click.Choice(["ddpm", "ddim", "tdpm-dip"]), default="tdpm-dip",
              help="ddpm: 1000 ancestral steps; ddim: --ddim-steps steps; tdpm-dip: DIP + T_trunc steps "
                   "(paper protocol: reconstructs --reference-data images).")
@click.option("--n", "n", type=int, default=16, help="Number of images.")
@click.option("--t-trunc", type=int, default=10, help="Truncation level T_trunc (tdpm-dip).")
@click.option("--ddim-steps", type=int, default=110, help="DDIM network evaluations (ddim).")
@click.option("--reference-data", default=None,
              help="Images whose noised versions the DIP fits (tdpm-dip, paper protocol).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@common_options
def generate(model: str, method: str, n: int, t_trunc: int, ddim_steps: int, reference_data: str | None, out: str,
             dip_preset: str, dip_iters: int | None, dip_lr: float | None, device: str, dtype: str, batch_size: int,
             seed: int, overwrite: bool) -> None:
    """Generate images with DDPM, DDIM or TDPM-DIP (Table 1's methods).

    \b
    TDPM-DIP generation follows the paper protocol: image i is the reverse chain from
    G_psi(z_i), where G_psi was fitted to the noised reference image i. It therefore
    reconstructs the reference images; the copy-rate in `tdpm-dip bench table1` measures that.
    \b
    Examples:
      tdpm-dip generate --model M --method ddim --n 16 --out gen_ddim
      tdpm-dip generate --model M --method tdpm-dip --n 8 --reference-data DIR --out gen_tdpm
    """
    from .data import load_images
    from .outputs import prepare_out_dir, save_grid, staged_dir, write_json
    from .reporting import save_images
    from .tasks import generate as run_generate

    positive("--n", n)
    positive("--ddim-steps", ddim_steps)
    if method == "tdpm-dip" and reference_data is None:
        raise UserError("--method tdpm-dip needs --reference-data (paper protocol: the DIP fits noised reference images)")
    ctx = load_context(model, device, dtype, batch_size,
                       lambda dev: dip_config("paper", pick_dip_preset(dip_preset, dev), dip_iters, dip_lr))
    from .tasks import validate_t_trunc

    validate_t_trunc(ctx.scheduler, t_trunc)
    ref = load_images(reference_data, model_size(ctx), limit=n).images if reference_data else None
    if ref is not None and ref.shape[0] < n:
        raise UserError(f"--reference-data has {ref.shape[0]} images, fewer than --n {n}")
    out_dir = prepare_out_dir(out, overwrite)  # after every input check: a failed command creates nothing
    res = run_generate(ctx, method, list(range(seed, seed + n)), t_trunc, ddim_steps, ref)
    with staged_dir(out_dir) as tmp:
        names = [f"{seed + i:05d}" for i in range(n)]
        save_images(res.images, names, tmp / "images")
        save_grid(res.images, tmp / "grid.png")
        if "dip_output" in res.info:
            save_grid(res.info["dip_output"], tmp / "dip_output_grid.png")
        write_json(tmp / "result.json", {"method": method, "protocol": res.protocol, "n": n, "seconds": res.seconds,
                                         "s_per_img": res.seconds_per_image, "reverse_steps": res.steps,
                                         "device": str(ctx.device), "model": model, "dip": dataclasses.asdict(ctx.dip)
                                         if method == "tdpm-dip" else None, "t_trunc": res.info.get("t_trunc")})
    echo(f"{method} ({res.protocol} protocol): {n} images, {res.seconds_per_image:.2f} s/img on {ctx.device}")
    click.echo(str(out_dir / "grid.png"))


# ------------------------------------------------------------------------------------------ denoise

@cli.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="DDPM: a diffusers folder (unet/ + scheduler/) or a hub id.")
@click.option("--input", "input_", default=None, help="Your NOISY images (folder or file): blind denoising.")
@click.option("--clean", default=None,
              help="CLEAN images that are noised here first, so PSNR/SSIM can be measured.")
@click.option("--protocol", type=click.Choice(["paper", "blind"]), default="blind",
              help="paper: the report's oracle protocol (needs --clean); blind: uses the noisy image only.")
@click.option("--method", "methods", multiple=True, type=click.Choice(["ddpm", "dip", "tdpm-dip", "bm3d"]),
              default=("ddpm", "dip", "tdpm-dip"),
              help="Methods to run (repeat the option). bm3d: blind only, needs the `bm3d` extra.")
@click.option("--sigma", type=float, default=None,
              help="Noise std on the 0..255 scale. blind: given, or estimated from --input when omitted; "
                   "with --clean it is the noise added (default 25).")
@click.option("--t-noisy", type=int, default=600, help="paper protocol: noise level of the noisy images.")
@click.option("--t-trunc", type=int, default=None,
              help="T_trunc. Default: 10 (paper); automatic for blind (the level that covers the DIP's error).")
@click.option("--samples", type=int, default=4, help="blind tdpm-dip: reverse chains averaged per image.")
@click.option("--n", "n", type=int, default=None, help="Use only the first N images.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@dip_options
@common_options
def denoise(model: str, input_: str | None, clean: str | None, protocol: str, methods: tuple[str, ...],
            sigma: float | None, t_noisy: int, t_trunc: int | None, samples: int, n: int | None, out: str,
            dip_preset: str, dip_iters: int | None, dip_lr: float | None, device: str, dtype: str,
            batch_size: int, seed: int, overwrite: bool) -> None:
    """Denoise images with DDPM, DIP and TDPM-DIP (Tables 2-4's methods).

    \b
    Examples:
      tdpm-dip denoise --model M --input my_noisy_photos/ --sigma 25 --out den      (blind)
      tdpm-dip denoise --model M --clean test/ --sigma 50 --n 8 --out den50          (blind, measured)
      tdpm-dip denoise --model M --clean test/ --protocol paper --n 8 --out den_p    (the report's)
    """
    from .data import load_images
    from .outputs import prepare_out_dir, staged_dir, write_json, write_text
    from .reporting import comparison_figure, curves_figure, result_row, save_images, table
    from .tasks import add_gaussian_noise, denoise_blind, denoise_paper, estimate_sigma, validate_t_trunc

    if (input_ is None) == (clean is None):
        raise UserError("give exactly one of --input (noisy images) or --clean (images to noise first)")
    if protocol == "paper" and "bm3d" in methods:
        raise UserError("bm3d is a blind baseline: use it with --protocol blind")
    if protocol == "paper" and clean is None:
        raise UserError("the paper protocol builds its DIP target from the clean image: it needs --clean")
    positive("--samples", samples)
    positive("--n", n)
    if sigma is not None and (sigma <= 0 or sigma > 255):
        raise UserError(f"--sigma must be in (0, 255], got {sigma}")
    ctx = load_context(model, device, dtype, batch_size,
                       lambda dev: dip_config(protocol, pick_dip_preset(dip_preset, dev), dip_iters, dip_lr))
    if t_trunc is not None:
        validate_t_trunc(ctx.scheduler, t_trunc)
    size = model_size(ctx)
    src = input_ or clean
    images = load_images(src, size, limit=n, progress=True)
    echo(f"{len(images)} images from {src}, padded to square and resized to {size}x{size} (the model's size)")
    out_dir = prepare_out_dir(out, overwrite)  # after every input check: a failed command creates nothing
    seeds = list(range(seed, seed + len(images)))
    x0 = images.images if clean else None
    results, rows = [], []
    labels = {"data": Path(src).name or src, "model": Path(model).name or model, "device": str(ctx.device)}
    if protocol == "paper":
        for m in methods:
            results.append(denoise_paper(ctx, x0, m, seeds, t_noisy, 10 if t_trunc is None else t_trunc))
    else:
        if clean:
            sig = 25.0 if sigma is None else sigma
            noisy = add_gaussian_noise(x0, sig, seeds)
        else:
            noisy = images.images
            if sigma is None:
                est = estimate_sigma(noisy)
                echo("estimated sigma per image (0..255): " + ", ".join(f"{s:.1f}" for s in est))
                if min(est) < 0.5:
                    raise UserError("the estimated noise level is ~0: these images look clean; give --sigma")
                sig = est
            else:
                sig = sigma
        for m in methods:
            results.append(denoise_blind(ctx, noisy, m, seeds, sig, t_trunc, samples, clean=x0))
    for r in results:
        rows.append(result_row(r, x0, **labels))
    with staged_dir(out_dir) as tmp:
        save_images(results[0].inputs, images.names, tmp / "noisy")
        for r in results:
            save_images(r.images, images.names, tmp / r.method)
        fig_rows = ([x0] if x0 is not None else []) + [results[0].inputs] + [r.images for r in results]
        comparison_figure(tmp / "comparison.png", fig_rows)
        curves = {r.method: r.dip.mean_curves() for r in results if r.dip is not None}
        if curves:
            curves_figure(tmp / "dip_curves.png", curves)
        md = (f"# Denoising ({protocol} protocol)\n\nRows of comparison.png: "
              + ("clean, " if x0 is not None else "") + "noisy, " + ", ".join(r.method for r in results) + "\n\n"
              + table(rows))
        write_text(tmp / "metrics.md", md)
        write_json(tmp / "metrics.json", {"rows": rows, "dip": dataclasses.asdict(ctx.dip), "curves": curves})
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
@click.option("--t-noisy", type=int, default=600, help="paper: noise level of the noisy images (report: 600).")
@click.option("--t-trunc", type=int, default=None,
              help="TDPM-DIP T_trunc. Default: 10 (paper, report); automatic per image (blind).")
@click.option("--t-truncs", default="0,5,10,50", help="table3: T_trunc values (0 = DIP alone).")
@click.option("--samples", type=int, default=4, help="blind tdpm-dip: reverse chains averaged per image.")
@click.option("--ddpm-steps", type=int, default=1000,
              help="table1: DDPM steps; fewer than 1000 uses a strided ancestral sampler (DDIM eta=1), and says so.")
@click.option("--ddim-steps", type=int, default=None,
              help="table1: DDIM steps. Default: DIP iterations + T_trunc (TDPM-DIP's network evaluations).")
@click.option("--fid", is_flag=True, help="table1: FID with InceptionV3 features (extra: pip install 'tdpm-dip[fid]').")
@click.option("--fid-weights", default=None,
              help="Local pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth): no download.")
@click.option("--fig-images", type=int, default=4, help="Images (columns) in the figures; Fig. 3 fits this many.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder. Re-running into it skips rows already computed (RUN/cache).")
@click.option("--dip-preset", default="paper-dip",
              help="DIP network G_psi: paper-dip (report), paper-dip-noattn, dip-small (CPU), dip-tiny, auto.")
@click.option("--dip-iters", type=int, default=None, help="DIP iterations. Default: 100 (paper), 400 (blind).")
@click.option("--dip-lr", type=float, default=None, help="DIP learning rate. Default: 1e-4 (paper), 1e-3 (blind).")
@common_options
def bench_cmd(tables: tuple[str, ...], model: str, model_cosine: str | None, data: str, n: int, protocol: str,
              sigma: float, t_noisy: int, t_trunc: int | None, t_truncs: str, samples: int, ddpm_steps: int,
              ddim_steps: int | None, fid: bool, fid_weights: str | None, fig_images: int, out: str,
              dip_preset: str, dip_iters: int | None, dip_lr: float | None, device: str, dtype: str,
              batch_size: int, seed: int, overwrite: bool) -> None:
    """Regenerate the report's tables (Markdown + CSV + JSON + figures in --out).

    \b
    table1  generation: DDPM (1000 steps), DDIM at TDPM-DIP's NFE, TDPM-DIP (paper protocol:
            it reconstructs the --data images); FID (optional extra), SWD, copy-rate, s/img
    table2  denoising: DDPM, DIP, TDPM-DIP (paper: t=600; blind: --sigma)
    table3  T_trunc ablation of TDPM-DIP on denoising
    table4  linear vs cosine schedule (needs --model-cosine)
    \b
    Defaults are the report's settings; shrink --n, --dip-preset, --dip-iters, --ddpm-steps for CPU
    runs (every table says what was shrunk). Interrupted runs resume: finished rows are cached.
    \b
    Example (CPU):
      tdpm-dip bench table2 --model M --data test/ --n 8 --dip-preset dip-small --out runs/bench
    """
    from .bench import Bench, BenchSettings, check_out_dir, parse_ints, run_bench
    from .data import load_images
    from .noise import check_level
    from .tasks import validate_t_trunc

    names = ["table1", "table2", "table3", "table4"] if "all" in tables else list(dict.fromkeys(tables))
    positive("--n", n)
    positive("--samples", samples)
    positive("--fig-images", fig_images)
    positive("--ddpm-steps", ddpm_steps)
    positive("--ddim-steps", ddim_steps)
    if not 0 < sigma <= 255:
        raise UserError(f"--sigma must be in (0, 255], got {sigma}")
    if "table4" in names and model_cosine is None:
        raise UserError("table4 compares schedules: it needs --model-cosine")
    truncs = parse_ints(t_truncs, "--t-truncs")
    dev = pick_device(device)
    preset = pick_dip_preset(dip_preset, dev)
    cfgs = {"paper": dip_config("paper", preset, dip_iters, dip_lr), "blind": dip_config("blind", preset, dip_iters, dip_lr)}
    settings = BenchSettings(protocol=protocol, n=n, seed=seed, sigma=sigma, t_noisy=t_noisy, t_trunc=t_trunc,
                             t_truncs=truncs, samples=samples, ddpm_steps=ddpm_steps, ddim_steps=ddim_steps, fid=fid,
                             fid_weights=fid_weights, fig_images=fig_images, dip=cfgs)
    out_dir = check_out_dir(out, overwrite)
    models = {"linear": model, "cosine": model_cosine}

    def load(slot: str):  # noqa: ANN202 - Context
        echo(f"loading {models[slot]}")
        return load_context(models[slot], device, dtype, batch_size, lambda d: cfgs["paper"])

    def load_data(size: int, limit: int):  # noqa: ANN202 - tensor
        return load_images(data, size, limit=limit, progress=True).images

    b = Bench(settings, load, data, load_data, out_dir, models, echo=echo)
    sched = b.context("linear").scheduler
    check_level(sched, t_noisy, "--t-noisy")
    for t in ((t_trunc,) if t_trunc is not None else ()) + truncs:
        validate_t_trunc(sched, t)
    T = int(sched.config.num_train_timesteps)
    if ddpm_steps > T or (ddim_steps or 0) > T:
        raise UserError(f"--ddpm-steps / --ddim-steps must be <= {T}")
    run_bench(names, b)
    for name in names:
        click.echo((out_dir / f"{name}.md").read_text())
    echo(f"tables and figures in {out_dir}")



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
@click.option("--steps", type=int, default=300, help="Training steps (batch 16, preset 'demo').")
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
              help="CPU threads; 0 = auto: 1 for the demo's tiny networks or on a busy machine, else all cores.")
def demo_cmd(out: str, overwrite: bool, data: str | None, model: str | None, n: int, steps: int, train_images: int,
             size: int | None, sigma: float, ddpm_steps: int, t_noisy: int, dip_preset: str, dip_iters: int,
             blind_dip_iters: int, seed: int, device: str, threads: int) -> None:
    """Run the method end to end, offline, and write a report (about 3 minutes on 2 CPU cores).

    \b
    Makes procedural sprites, trains a small DDPM on them (Algorithm 1), generates with DDPM
    (1000 steps) and TDPM-DIP, denoises with DDPM, DIP and TDPM-DIP under both protocols
    (paper: the report's oracle, t=600; blind: sigma 25), and writes RUN/report.md with the
    figures, the metric tables and the time of each phase.
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
                     overwrite=overwrite)
    cfg.validate()
    dev = pick_device(device)
    nthreads = pick_threads(threads, tiny_networks=model is None and dev.type == "cpu")
    torch.set_num_threads(nthreads)
    report = run_demo(cfg, dev, pick_amp("auto", dev), nthreads, echo)
    click.echo(str(report))


# ------------------------------------------------------------------------------------------ entry point

def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _train_command()
    try:
        cli.main(args=argv, prog_name="tdpm-dip", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted: earlier outputs are intact", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: earlier outputs are intact", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

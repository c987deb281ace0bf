"""What `tdpm-dip generate` does, without click: images from a DDPM (and a TDPM generator), written as PNGs,
a grid a person can look at, and result.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import defaults, registry
from ..api import Generator
from ..data import load_images
from ..embedded import resolve_generator, resolve_model
from ..errors import UserError, check_positive
from ..generator import load_generator
from ..images import save_grid
from ..methods import Context, Result
from ..methods.generate import check_from_noise
from ..methods.shard import is_main_process
from ..models import unet_size
from ..noise import check_t_trunc
from ..outputs import prepare_out_dir, refuse_out_dir, staged_dir, write_json
from ..reporting import save_images
from ..runtime import load_context
from .common import RunOptions

Echo = Callable[[str], None]
GRID_SIDE = 128  # px per image in grid.png: small models' images are upscaled until a person can see them


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(RunOptions):
    """Every option of `tdpm-dip generate` (the CLI documents each one)."""

    out: str = "generated"
    model: str | None = None
    method: str | None = None  # None: the best method that what is loaded can run
    generator: str | None = None
    n: int = defaults.N_GENERATE
    t_trunc: int | None = None
    ddim_steps: int = defaults.GENERATE_DDIM_STEPS
    reference_data: str | None = None


def _method(opts: GenerateOptions, folder: str | None) -> registry.Method:
    """The method to run: --method, else the best one whose needs are met; checks what it needs."""
    if opts.method is None:
        have = {"generator", "all-levels"} if folder is not None else {"all-levels"}  # levels: checked once loaded
        return next(
            m
            for m in registry.methods("generate")
            if set(m.needs) - {"reference"} <= have and ("reference" not in m.needs or opts.reference_data is not None)
        )
    m = registry.find("generate", opts.method)
    if opts.generator is not None and "generator" not in m.needs:
        raise UserError(f"--generator is for --method tdpm, not {m.name}")
    if "generator" in m.needs and folder is None:
        raise UserError(
            f"--method {m.name} needs --generator (a folder made by `tdpm-dip train-generator` for "
            + ("this --model)" if opts.model is not None else "the DDPM; this build ships no default)")
        )
    if "reference" in m.needs and opts.reference_data is None:
        raise UserError(
            f"--method {m.name} needs --reference-data (paper protocol: the DIP fits noised reference images)"
        )
    return m


def generate(opts: GenerateOptions, echo: Echo) -> Path:
    """Run the command; returns the grid's path (under a launcher, every process runs; rank 0 writes)."""
    check_positive("--n", opts.n)
    check_positive("--ddim-steps", opts.ddim_steps)
    if is_main_process():
        refuse_out_dir(opts.out, opts.overwrite)  # before any model is loaded
    m = _method(opts, resolve_generator(opts.model, opts.generator))  # --generator, or the shipped one
    folder = resolve_generator(opts.model, opts.generator) if "generator" in m.needs else None
    ctx, shard = load_context(
        opts.model, opts.device, opts.dtype, opts.batch_size, "paper", opts.dip_preset, opts.dip_iters, opts.dip_lr
    )
    if folder is not None:
        ctx.generator = load_generator(folder, ctx.unet, ctx.scheduler, ctx.device)
        if opts.t_trunc is not None and opts.t_trunc != ctx.generator.t_trunc:
            raise UserError(
                f"--t-trunc {opts.t_trunc} does not match the generator's T_trunc "
                f"{ctx.generator.t_trunc} ({folder}); omit --t-trunc or train a generator for "
                f"{opts.t_trunc}"
            )
    if "all-levels" in m.needs:
        check_from_noise(ctx, m.name)
    if opts.t_trunc is not None:
        check_t_trunc(ctx.scheduler, opts.t_trunc)
    ref = None
    if opts.reference_data is not None:
        ref = load_images(opts.reference_data, unet_size(ctx.unet.config), limit=opts.n).images
        if ref.shape[0] < opts.n:
            raise UserError(f"--reference-data has {ref.shape[0]} images, fewer than --n {opts.n}")
    main = is_main_process()  # under a launcher: the only process that writes
    out_dir = prepare_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)  # after every input check
    gen = Generator(ctx, shard, opts.model or "embedded default")
    out = gen.generate(opts.n, opts.seed, m.name, ref, t_trunc=opts.t_trunc, ddim_steps=opts.ddim_steps)
    res = out.result
    if main:
        _write(out_dir, opts, m, res, ctx, folder)
        echo(f"{m.name} ({res.protocol} protocol): {opts.n} images, {res.seconds_per_image:.2f} s/img on {ctx.device}")
    return out_dir / "grid.png"


def _write(
    out_dir: Path, opts: GenerateOptions, m: registry.Method, res: Result, ctx: Context, folder: str | None
) -> None:
    """images/, grid.png (and the DIP outputs' grid), result.json; moved in complete."""
    upscale = max(1, GRID_SIDE // res.images.shape[-1])
    with staged_dir(out_dir) as tmp:
        names = [f"{opts.seed + i:05d}" for i in range(opts.n)]
        save_images(res.images, names, tmp / "images")
        save_grid(res.images, tmp / "grid.png", upscale=upscale)
        if "dip_output" in res.info:
            save_grid(res.info["dip_output"], tmp / "dip_output_grid.png", upscale=upscale)
        write_json(
            tmp / "result.json",
            {
                "method": m.name,
                "protocol": res.protocol,
                "n": opts.n,
                "seconds": res.seconds,
                "s_per_img": res.seconds_per_image,
                # the DDPM's reverse steps (a generator's strided chain: its own count, not the NFE below)
                "reverse_steps": res.info.get("reverse_steps", res.reverse_steps),
                "device": str(ctx.device),
                "model": resolve_model(opts.model),
                "dip": dataclasses.asdict(ctx.dip) if m.uses_dip else None,
                "t_trunc": res.info.get("t_trunc"),
                "nfe": res.nfe,
                "generator": folder,
            },
        )

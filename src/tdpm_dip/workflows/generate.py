"""What `tdpm-dip generate` does, without click: images from a DDPM (and a TDPM generator), written as PNGs,
a grid a person can look at, and result.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults, registry
from ..api import Generator
from ..data import load_image, load_images
from ..embedded import resolve_generator, resolve_model
from ..errors import UserError, check_positive, check_seed
from ..generator import load_generator
from ..images import save_grid, save_png
from ..methods import Result
from ..methods.generate import check_from_noise
from ..methods.shard import images_per_step, is_main_process
from ..methods.types import concat_results
from ..models import unet_size
from ..noise import check_steps, check_t_trunc
from ..outputs import link_or_copy, prepare_out_dir, refuse_inputs_inside, refuse_out_dir, write_json
from ..runtime import load_context
from .common import RunOptions, finished_earlier, keep_finished, run_status

Echo = Callable[[str], None]
# Every entry a generate run can write: an --overwrite run replaces them all.
OWNED = ("images", "grid.png", "dip_output_grid.png", "result.json")
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
    resume: bool = False  # keep the images an interrupted run into --out finished, compute the rest


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
    """Run the command; returns the grid's path (under a launcher, every process runs; rank 0 writes). The images
    run a batch at a time; Ctrl-C keeps the finished ones, marked in result.json, and `--resume` makes the rest."""
    check_positive("--n", opts.n)
    if opts.n > defaults.MAX_GENERATE:
        raise UserError(
            f"--n must be at most {defaults.MAX_GENERATE:,} a run (the images are held in memory until written); "
            f"for more, run again with --seed {opts.seed + defaults.MAX_GENERATE} (image i uses seed SEED+i)"
        )
    check_seed(opts.seed, n=opts.n)
    check_positive("--ddim-steps", opts.ddim_steps)
    if opts.resume and opts.overwrite:
        raise UserError("give --resume (keep what an earlier run finished) or --overwrite (start afresh), not both")
    keep = opts.overwrite or opts.resume
    main = is_main_process()  # under a launcher: the only process that writes
    if main:
        refuse_out_dir(opts.out, keep)  # before any model is loaded
        refuse_inputs_inside(opts.out, {"--reference-data": opts.reference_data})
    m = _method(opts, resolve_generator(opts.model, opts.generator))  # --generator, or the shipped one
    folder = resolve_generator(opts.model, opts.generator) if "generator" in m.needs else None
    gen, ref = _load(opts, m, folder)
    out_dir = prepare_out_dir(opts.out, keep) if main else Path(opts.out)  # after every input check
    run = _Run(gen, opts, m, ref, folder)
    # every process reads it: under a launcher they must all skip the same images (they run the batches together)
    if opts.resume and run.carry(out_dir):
        echo(f"--resume: {run.done_count} of {opts.n} images are done in {out_dir}; making the rest")
    if not main:
        run.compute()
        return out_dir / "grid.png"
    keep_finished(run, out_dir, opts.n, echo, resume=opts.resume, owned=OWNED, record="result.json")
    res = run.result
    made = sum(run.made)
    echo(
        f"{m.name} ({m.protocol} protocol): {opts.n} images"
        + (f" ({opts.n - made} made earlier)" if made < opts.n else "")
        + (f", {res.seconds_per_image:.2f} s/img on {gen.ctx.device}" if res is not None else "")
    )
    return out_dir / "grid.png"


def _load(opts: GenerateOptions, m: registry.Method, folder: str | None) -> tuple[Generator, torch.Tensor | None]:
    """The DDPM (and generator) with what the method needs checked, and the reference images (tdpm-dip)."""
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
    check_steps(ctx.scheduler, opts.ddim_steps)  # as the API will, but before the output folder is made
    ref = None
    if opts.reference_data is not None:
        ref = load_images(opts.reference_data, unet_size(ctx.unet.config), limit=opts.n).images
        if ref.shape[0] < opts.n:
            raise UserError(f"--reference-data has {ref.shape[0]} images, fewer than --n {opts.n}")
    return Generator(ctx, shard, opts.model or "embedded default"), ref


class _Run:
    """The images of one `generate` run: image i (seed SEED + i) is made in its batch or carried over from an
    earlier run (--resume); the parts made here are kept in order, for result.json's cost and the DIP grid."""

    def __init__(
        self, gen: Generator, opts: GenerateOptions, m: registry.Method, ref: torch.Tensor | None, folder: str | None
    ) -> None:
        self.gen, self.opts, self.m, self.ref, self.folder = gen, opts, m, ref, folder
        self.names = [f"{opts.seed + i:05d}" for i in range(opts.n)]
        self.images: list[torch.Tensor | None] = [None] * opts.n
        self.made: list[bool] = [False] * opts.n  # by this run (else carried over, or not done)
        self.parts: list[Result] = []
        self.earlier: Path | None = None

    @property
    def done_count(self) -> int:
        return sum(x is not None for x in self.images)

    @property
    def result(self) -> Result | None:
        """This run's images as one Result (None when an earlier run made them all)."""
        return concat_results(self.parts) if self.parts else None

    def key(self) -> dict:
        """What decides the images: a --resume run must match it (device, threads, batch size and --n do not
        change image i: it uses seed SEED+i whatever the batch)."""
        o, ctx = self.opts, self.gen.ctx
        return {
            "model": resolve_model(o.model),
            "method": self.m.name,
            "generator": self.folder,
            "seed": o.seed,
            "t_trunc": o.t_trunc,
            "ddim_steps": o.ddim_steps,
            "reference_data": None if o.reference_data is None else str(Path(o.reference_data).resolve()),
            "dip": dataclasses.asdict(ctx.dip) if self.m.uses_dip else None,
            "dtype": str(ctx.amp_dtype or torch.float32),  # no autocast: fp32 (not "None")
        }

    def carry(self, out_dir: Path) -> bool:
        """Take over the images an earlier run with the same options finished in `out_dir` (their files
        present); a run made with other options is refused with one line."""
        earlier = finished_earlier(out_dir, self.key(), "generate", self.names, ("images",), "result.json")
        for i, name in enumerate(self.names):
            if name in earlier:
                self.images[i] = load_image(out_dir / "images" / f"{name}.png", None)
        self.earlier = out_dir
        return self.done_count > 0

    def compute(self) -> None:
        """The images not done yet, a batch (per process) at a time."""
        step = images_per_step(self.gen.ctx.batch_size, self.gen.shard)
        todo = [i for i in range(self.opts.n) if self.images[i] is None]
        runs = [todo[k : k + step] for k in range(0, len(todo), step)]
        # consecutive images run together (a batch of consecutive seeds, as one call over all would form it)
        for idx in (r[a:b] for r in runs for a, b in _spans(r)):
            ref = None if self.ref is None else self.ref[idx[0] : idx[-1] + 1]
            out = self.gen.generate(
                len(idx),
                self.opts.seed + idx[0],
                self.m.name,
                ref,
                t_trunc=self.opts.t_trunc,
                ddim_steps=self.opts.ddim_steps,
            )
            self.parts.append(out.result)
            for k, i in enumerate(idx):
                self.images[i], self.made[i] = out.result.images[k], True

    def write(self, tmp: Path) -> None:
        """images/ (the images done), grid.png (and the DIP outputs' grid, of the images made here), result.json."""
        opts, res, ctx = self.opts, self.result, self.gen.ctx
        done = [i for i, x in enumerate(self.images) if x is not None]
        side = self.images[done[0]].shape[-1] if done else 1  # type: ignore[union-attr]
        upscale = max(1, GRID_SIDE // side)
        for i in done:
            dst = tmp / "images" / f"{self.names[i]}.png"
            if self.made[i]:
                save_png(self.images[i], dst)  # type: ignore[arg-type]
            else:  # the earlier file, as it was
                link_or_copy(self.earlier / "images" / dst.name, dst)  # type: ignore[operator]
        if done:
            save_grid(torch.stack([self.images[i] for i in done]), tmp / "grid.png", upscale=upscale)  # type: ignore[misc]
        if res is not None and "dip_output" in res.info:
            save_grid(res.info["dip_output"], tmp / "dip_output_grid.png", upscale=upscale)
        made = sum(self.made)
        write_json(
            tmp / "result.json",
            {
                "status": run_status(len(done), opts.n),
                "complete": len(done) == opts.n,
                "run": self.key(),
                "method": self.m.name,
                "protocol": self.m.protocol,
                "n": opts.n,
                "made_here": made,  # the cost below is theirs
                "seconds": res.seconds if res is not None else 0.0,
                "s_per_img": res.seconds_per_image if res is not None else None,
                # the DDPM's reverse steps (a generator's strided chain: its own count, not the NFE below)
                "reverse_steps": None if res is None else res.info.get("reverse_steps", res.reverse_steps),
                "device": str(ctx.device),
                "model": resolve_model(opts.model),
                "dip": dataclasses.asdict(ctx.dip) if self.m.uses_dip else None,
                "t_trunc": None if res is None else res.info.get("t_trunc"),
                "nfe": None if res is None else res.nfe,
                "generator": self.folder,
                "images": [
                    {
                        "name": nm,
                        "status": "done" if x is not None else "not computed",
                        "run": "this" if made_i else ("earlier (--resume)" if x is not None else None),
                    }
                    for nm, x, made_i in zip(self.names, self.images, self.made)
                ],
            },
        )


def _spans(idx: list[int]) -> list[tuple[int, int]]:
    """[a, b) ranges of `idx` whose entries are consecutive integers."""
    out, a = [], 0
    for k in range(1, len(idx) + 1):
        if k == len(idx) or idx[k] != idx[k - 1] + 1:
            out.append((a, k))
            a = k
    return out

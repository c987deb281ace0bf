"""What `tdpm-dip denoise` does, without click: a user's noisy files (blind), or clean images noised here first
(blind or the report's paper protocol), through the registry's methods, written as PNGs, a figure and tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults, registry
from ..api import Denoiser
from ..data import ImageKind, NativeFile, is_hub_id, load_images, read_native, scan_native
from ..embedded import DENOISER_NAME
from ..errors import UserError, check_positive, check_seed, check_sigma, check_symmetries
from ..images import as_written, save_like, save_png
from ..methods import Job, Result
from ..methods.common import check_trained_level
from ..methods.dispatch import tile_side
from ..methods.observe import blind_sigmas, implausible_sigmas
from ..methods.shard import images_per_step, is_main_process
from ..methods.types import concat_results
from ..metrics import scores
from ..models import unet_size
from ..noise import add_noise, check_t_trunc
from ..outputs import (
    link_or_copy,
    prepare_out_dir,
    refuse_inputs_inside,
    refuse_out_dir,
    reported,
    staged_dir,
    write_json,
    write_text,
)
from ..reporting import curves_figure, labelled_comparison, result_row, table, thumbnails
from ..runtime import load_context
from .common import RunOptions, finished_earlier, interrupted_line, keep_finished, run_status

Echo = Callable[[str], None]
# Every entry a denoise run can write: an --overwrite run replaces them all, so no method folder of an earlier run
# is left beside the new one.
OWNED = ("noisy", *registry.names("denoise"), "comparison.png", "metrics.md", "metrics.json", "dip_curves.png")


@dataclass(frozen=True, kw_only=True)
class DenoiseOptions(RunOptions):
    """Every option of `tdpm-dip denoise` (the CLI documents each one)."""

    out: str
    model: str | None = None
    input: str | None = None  # noisy files: blind denoising at their own sizes
    clean: str | None = None  # clean images, noised here first (scores PSNR/SSIM)
    reference: str | None = None  # with --input: the clean originals, only to score
    protocol: str = "blind"
    methods: tuple[str, ...] = ()  # empty: the best blind method, or every paper method
    sigma: float | None = None
    noise: str = defaults.NOISE_MODEL
    declip: bool = True
    t_noisy: int = defaults.T_NOISY
    t_trunc: int | None = None
    samples: int = defaults.SAMPLES
    ddim_steps: int = defaults.BLIND_DDIM_STEPS
    symmetries: int | None = None  # ensemble: None = by image size (methods.blind.ensemble_size)
    n: int | None = None
    skip_bad: bool = False  # --input: skip unreadable files with a warning
    resume: bool = False  # --input: keep the images an interrupted run into --out finished, compute the rest
    max_megapixels: float = defaults.MAX_PIXELS / 1e6  # --input: larger images are refused before any work

    def check(self) -> DenoiseOptions:
        """Every check that needs no image and no model (one-line UserErrors); returns the options with the
        methods resolved from the registry."""
        if (self.input is None) == (self.clean is None):
            raise UserError("give exactly one of --input (noisy images) or --clean (images to noise first)")
        if self.reference is not None and self.input is None:
            raise UserError("--reference scores --input files: give it with --input")
        if self.protocol == "paper" and self.clean is None:
            raise UserError("the paper protocol builds its DIP target from the clean image: it needs --clean")
        if self.noise not in defaults.NOISE_MODELS:
            raise UserError(f"--noise must be one of {', '.join(defaults.NOISE_MODELS)}, got {self.noise!r}")
        default = (
            registry.names("denoise", "paper")
            if self.protocol == "paper"
            else [m.name for m in registry.methods("denoise", "blind", installed_only=True)][:1]
        )
        methods = tuple(dict.fromkeys(self.methods or default))  # a method named twice runs once
        for m in methods:
            registry.get("denoise", self.protocol, m)  # an unknown or other-protocol method fails here
        check_seed(self.seed)
        check_positive("--samples", self.samples)
        check_positive("--ddim-steps", self.ddim_steps)
        check_symmetries(self.symmetries)
        check_positive("--n", self.n)
        check_sigma(self.sigma)
        check_positive("--max-megapixels", self.max_megapixels)
        if self.resume and self.input is None:
            raise UserError("--resume continues a run on --input files: give it with --input")
        if self.resume and self.overwrite:
            raise UserError("give --resume (keep what an earlier run finished) or --overwrite (start afresh), not both")
        for flag, path in (("--input", self.input), ("--clean", self.clean), ("--reference", self.reference)):
            hub_id = flag == "--clean" and path is not None and is_hub_id(path)
            if path is not None and not hub_id and not Path(path).exists():  # before the model loads (seconds)
                raise UserError(f"{flag} {path}: no such file or folder")
        return dataclasses.replace(self, methods=methods)

    def job_options(self) -> dict:
        return {
            "t_trunc": self.t_trunc,
            "samples": self.samples,
            "ddim_steps": self.ddim_steps,
            "symmetries": self.symmetries,
            "declip": self.declip,
        }


def denoise(opts: DenoiseOptions, echo: Echo) -> Path:
    """Run the command; returns the output folder (under a launcher, every process runs; rank 0 writes)."""
    opts = opts.check()
    if is_main_process():
        refuse_out_dir(opts.out, opts.overwrite or opts.resume)  # before any model or image is loaded
        refuse_inputs_inside(opts.out, {"--input": opts.input, "--clean": opts.clean, "--reference": opts.reference})
    ctx, shard = load_context(
        opts.model,
        opts.device,
        opts.dtype,
        opts.batch_size,
        opts.protocol,
        opts.dip_preset,
        opts.dip_iters,
        opts.dip_lr,
        task="denoise",
    )
    if opts.t_trunc is not None:
        check_t_trunc(ctx.scheduler, opts.t_trunc)
    den = Denoiser(ctx, shard, opts.model or DENOISER_NAME, round(opts.max_megapixels * 1e6))
    if opts.input is not None:
        return _denoise_files(den, opts, echo)
    return _denoise_clean(den, opts, echo)


# ------------------------------------------------------------------------------------------ a user's files


def _denoise_files(den: Denoiser, opts: DenoiseOptions, echo: Echo) -> Path:
    """Blind denoising of noisy files, each at its own size, aspect and kind; image i uses seed SEED+i.

    1. every file is read and checked (pixel limit, readability) and its sigma estimated, one at a time;
    2. the images run a batch at a time, each result written as soon as it is made;
    3. Ctrl-C keeps the finished images, marked in metrics.json; `--resume` computes only the missing ones."""
    assert opts.input is not None  # denoise() comes here with --input only
    main = is_main_process()  # under a launcher: the only process that writes
    # 1. read and check every input before any work
    files = scan_native(opts.input, opts.n, main, opts.skip_bad, den.max_pixels)
    refs = _references(opts.reference, files, den.max_pixels) if opts.reference is not None else None
    if opts.sigma is not None:
        sig = [float(opts.sigma)] * len(files)
    else:  # one image in memory at a time
        sig = [s for f in files for s in blind_sigmas([f.load()], None, names=[str(f.path)])]
        echo("estimated sigma per image (0..255): " + ", ".join(f"{s:.1f}" for s in sig))
        high = implausible_sigmas(sig, [str(f.path) for f in files])
        if high:
            echo(high)
        jpeg = [f.path.name for f in files if f.path.suffix.lower() in (".jpg", ".jpeg")]
        if jpeg:
            echo(
                f"warning: {jpeg[0]}{f' and {len(jpeg) - 1} more' if len(jpeg) > 1 else ''}: JPEG compression "
                "removes part of the noise, so the sigma read from a JPEG file comes out low; give --sigma if you "
                "know it"
            )
    tiled = sum(max(f.size) > tile_side(den.ctx) for f in files)
    echo(
        f"{len(files)} images from {opts.input}, each denoised at its own size"
        + (f" ({tiled} in tiles of {tile_side(den.ctx)} px)" if tiled else "")
    )
    out_dir = prepare_out_dir(opts.out, opts.overwrite or opts.resume) if main else Path(opts.out)
    key = _run_key(opts, den)
    # every process reads it: under a launcher they must all skip the same images (they run the batches together)
    earlier = _earlier(out_dir, key, files, opts.methods) if opts.resume else {}
    if earlier:
        echo(f"--resume: {len(earlier)} of {len(files)} images are done in {out_dir}; computing the rest")
    # 2. a batch of images at a time, each result written as it is made
    run = _FilesRun(den, opts, files, sig, refs, earlier)
    if not main:
        run.compute(None)
        return out_dir
    interrupted: KeyboardInterrupt | None = None
    with staged_dir(out_dir, OWNED) as tmp:
        try:
            run.compute(tmp)
        except KeyboardInterrupt as e:  # 3. keep what is finished; the swap below runs with signals held back
            interrupted = e
        run.write(tmp, out_dir, key)
    if interrupted is not None:
        echo(interrupted_line(run.done_count, len(files), out_dir))
        raise reported(interrupted)
    print(table(run.rows()))
    print(out_dir / "comparison.png")
    return out_dir


class _FilesRun:
    """The state of a --input run: each image's entry in metrics.json, and the figure's first images."""

    FIGURE_IMAGES = 8

    def __init__(
        self,
        den: Denoiser,
        opts: DenoiseOptions,
        files: list[NativeFile],
        sig: list[float],
        refs: dict[str, NativeFile] | None,
        earlier: dict[str, dict],
    ) -> None:
        self.den, self.opts, self.files, self.sig, self.refs, self.earlier = den, opts, files, sig, refs, earlier
        self.entries: list[dict] = [
            earlier.get(f.name)
            or {"name": f.name, "size": f"{f.size[0]}x{f.size[1]}", "kind": _kind_label(f.kind), "sigma": s}
            for f, s in zip(files, sig)
        ]
        for e in self.entries:
            e["status"] = "done" if e["name"] in earlier else "not computed"
            e["run"] = "earlier (--resume)" if e["name"] in earlier else "this"
        self.thumbs: dict[str, dict[int, torch.Tensor]] = {"noisy": {}, **{m: {} for m in opts.methods}}

    @property
    def done_count(self) -> int:
        return sum(e["status"] == "done" for e in self.entries)

    def compute(self, tmp: Path | None) -> None:
        """Denoise the images not done yet, a batch at a time; with `tmp` (the main process), write each result
        there as soon as its batch is done, and carry over the results of an earlier run."""
        if tmp is not None:
            for i, f in enumerate(self.files):
                if f.name in self.earlier:
                    self._carry(i, tmp)
        todo = [i for i, f in enumerate(self.files) if f.name not in self.earlier]
        den, opts = self.den, self.opts
        for idx in self._batches(todo):
            noisy = [self.files[i].load() for i in idx]
            clean = [self.refs[self.files[i].name].load() for i in idx] if self.refs is not None else None
            seeds = [opts.seed + i for i in idx]
            outs = {}
            for m in opts.methods:
                out, seconds, nfe = den.denoise_tensors(
                    noisy, [self.sig[i] for i in idx], m, seeds, **opts.job_options()
                )
                outs[m] = [as_written(o, self.files[i].kind.gray) for o, i in zip(out, idx)]
                for i in idx:
                    self.entries[i][m] = {"seconds": seconds / len(idx), "NFE": nfe}
            if tmp is None:
                continue
            for k, i in enumerate(idx):
                f, e = self.files[i], self.entries[i]
                _save(noisy[k], tmp / "noisy" / f"{f.name}.png", f.kind)
                for m in opts.methods:
                    _save(outs[m][k], tmp / m / f"{f.name}.png", f.kind)
                    if clean is not None:
                        e[m] |= scores(outs[m][k], as_written(clean[k], f.kind.gray))
                if clean is not None:
                    e["input"] = scores(as_written(noisy[k], f.kind.gray), as_written(clean[k], f.kind.gray))
                e["status"] = "done"
                self._thumb(i, "noisy", noisy[k])
                for m in opts.methods:
                    self._thumb(i, m, outs[m][k])

    def _batches(self, todo: list[int]) -> list[list[int]]:
        """Images run together: up to a batch (per process) of small ones; an image run in tiles alone, so that
        it holds the memory of one large image and its result is written as soon as it is done."""
        step = images_per_step(self.den.ctx.batch_size, self.den.shard)
        side = self.den.tile or tile_side(self.den.ctx)
        out: list[list[int]] = []
        for i in todo:
            if max(self.files[i].size) > side:
                out.append([i])
            elif out and len(out[-1]) < step and max(self.files[out[-1][0]].size) <= side:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def _thumb(self, i: int, row: str, x: torch.Tensor) -> None:
        if len(self.thumbs[row]) < self.FIGURE_IMAGES:
            self.thumbs[row][i] = thumbnails([x])[0]

    def _carry(self, i: int, tmp: Path) -> None:
        """An image done by an earlier run: its files into the new outputs (hard links), its thumbnails."""
        name = self.files[i].name
        for row in ("noisy", *self.opts.methods):
            src, dst = Path(self.opts.out) / row / f"{name}.png", tmp / row / f"{name}.png"
            link_or_copy(src, dst)
            if len(self.thumbs[row]) < self.FIGURE_IMAGES:
                self.thumbs[row][i] = thumbnails([read_native(dst)[0]])[0]

    def rows(self) -> list[dict]:
        """One table row per method, over the images done: mean scores, NFE, seconds per image."""
        done = [e for e in self.entries if e["status"] == "done"]
        rows = []
        for m in self.opts.methods:
            row: dict = {
                "method": m,
                "protocol": "blind",
                "n": len(done),
                "noise": "your files",
                "sigma": self.sig[0] if len(set(self.sig)) == 1 else "per image (estimated)",
            }
            if self.refs is not None and done:
                for score in ("PSNR", "SSIM"):
                    row[score] = sum(e[m][score] for e in done) / len(done)
                row["input PSNR"] = sum(e["input"]["PSNR"] for e in done) / len(done)
            row |= {
                "NFE": round(sum(e[m]["NFE"] for e in done) / max(1, len(done)), 1),
                "s/img": sum(e[m]["seconds"] for e in done) / max(1, len(done)),
                "device": str(self.den.ctx.device),
                "model": Path(self.den.name).name or self.den.name,
            }
            rows.append(row)
        return rows

    def write(self, tmp: Path, out_dir: Path, key: dict) -> None:
        """comparison.png, metrics.md and metrics.json of what is done (all of it, unless interrupted)."""
        n, done = len(self.files), self.done_count
        status = run_status(done, n)
        shown = sorted(self.thumbs["noisy"])
        if shown:
            fig = [(row, torch.stack([t[i] for i in shown])) for row, t in self.thumbs.items()]
            labelled_comparison(tmp / "comparison.png", fig)
        rows = self.rows()
        write_text(
            tmp / "metrics.md",
            "# Denoising (blind protocol; your files, each at its own size)\n\n"
            + ("" if done == n else f"**{status}**\n\n")
            + "Rows of comparison.png: noisy, "
            + ", ".join(self.opts.methods)
            + "\n\n"
            + table(rows),
        )
        write_json(
            tmp / "metrics.json",
            {
                "status": status,
                "complete": done == n,
                "run": key,
                "rows": rows,
                "images": self.entries,
                "sigma": self.sig,
            },
        )


def _kind_label(kind: ImageKind) -> str:
    return ("grey" if kind.gray else "RGB") + (" + alpha" if kind.alpha is not None else "") + f", {kind.bits}-bit"


def _save(x: torch.Tensor, path: Path, kind: ImageKind) -> None:
    save_like(x, path, kind.gray, kind.bits, kind.alpha)


def _run_key(opts: DenoiseOptions, den: Denoiser) -> dict:
    """What decides a --input run's results: a --resume run must match it (device, threads and batch size do
    not change results: image i uses seed SEED+i whatever the batch)."""
    return {
        "input": str(Path(opts.input or "").resolve()),
        "model": den.name,
        "methods": list(opts.methods),
        "sigma": opts.sigma,
        "seed": opts.seed,
        "dtype": str(den.ctx.amp_dtype or torch.float32),  # no autocast: fp32 (not "None")
        **opts.job_options(),
    }


def _earlier(out_dir: Path, key: dict, files: list[NativeFile], methods: tuple[str, ...]) -> dict[str, dict]:
    """Entries of the images an earlier run with the same options finished in `out_dir` (their files present)."""
    return finished_earlier(out_dir, key, "denoise --input", (f.name for f in files), ("noisy", *methods))


def _references(folder: str, files: list[NativeFile], max_pixels: int) -> dict[str, NativeFile]:
    """The clean originals of the noisy files, matched by name (path under the folder) and size (one-line error
    otherwise)."""
    refs = {f.name: f for f in scan_native(folder, max_pixels=max_pixels, wanted={f.name for f in files})}
    missing = [f.name for f in files if f.name not in refs or refs[f.name].size != f.size]
    if missing:
        raise UserError(
            f"--reference {folder}: no clean image of the same name and size for "
            + ", ".join(missing[:3])
            + (" ..." if len(missing) > 3 else "")
        )
    return refs


# ------------------------------------------------------------------------------------------ clean images


def _denoise_clean(den: Denoiser, opts: DenoiseOptions, echo: Echo) -> Path:
    """Clean images noised here (blind: 8-bit or float noise of sigma; paper: x_{t_noisy}), then each method, a
    batch at a time; Ctrl-C keeps the images every method finished (no --resume: that is for --input runs)."""
    assert opts.clean is not None  # check(): --clean when --input is not given
    if opts.protocol == "paper":
        check_trained_level(den.ctx, opts.t_noisy)  # before any image is read or anything written
    size = unet_size(den.ctx.unet.config)
    main = is_main_process()  # under a launcher: the only process that writes
    images = load_images(opts.clean, size, limit=opts.n, progress=main)
    echo(f"{len(images)} images from {opts.clean}, padded to square and resized to {size}x{size} (the model's size)")
    run = _CleanRun(den, opts, images.images, images.names)
    out_dir = prepare_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)  # after every input check
    if not main:
        run.compute()
        return out_dir
    keep_finished(run, out_dir, len(images), echo, resume=False, owned=OWNED, resumable=False)
    print(out_dir / "comparison.png")
    return out_dir


class _CleanRun:
    """A --clean run: every method on a batch (per process) of the images, then the next batch (the batches one
    call over all of them would form, so the results are the same); each method's results kept per batch."""

    def __init__(self, den: Denoiser, opts: DenoiseOptions, x0: torch.Tensor, names: list[str]) -> None:
        self.den, self.opts, self.x0, self.names = den, opts, x0, names
        self.job, self.noise_label = _clean_job(opts, x0, tuple(range(opts.seed, opts.seed + len(names))))
        self.parts: dict[str, list[Result]] = {m: [] for m in opts.methods}

    @property
    def batches_done(self) -> int:
        """Batches that every method finished."""
        return min(len(p) for p in self.parts.values())

    @property
    def done_count(self) -> int:
        return sum(int(r.images.shape[0]) for r in self.parts[self.opts.methods[0]][: self.batches_done])

    def compute(self) -> None:
        step = images_per_step(self.den.ctx.batch_size, self.den.shard)
        for lo in range(0, len(self.job.seeds), step):
            part = self.job.part(slice(lo, lo + step))
            for m in self.opts.methods:
                self.parts[m].append(self.den.run(part, m, self.opts.protocol))

    def write(self, tmp: Path) -> None:
        """The run folder (`_write`) of the images every method finished; nothing when none did."""
        k, n_all, done, ctx, opts = self.batches_done, len(self.names), self.done_count, self.den.ctx, self.opts
        if k == 0:
            return
        results = [concat_results(p[:k]) for p in self.parts.values()]
        x0, names = self.x0[:done], self.names[:done]
        labels = {
            "data": Path(opts.clean or "").name or opts.clean,
            "model": Path(self.den.name).name or self.den.name,
            "device": str(ctx.device),
        }
        rows = [result_row(r, x0, noise=self.noise_label, **labels) for r in results]
        inputs = results[0].inputs
        assert inputs is not None  # every denoiser returns its inputs
        fig = [("clean", x0), ("noisy", inputs)] + [(r.method, r.images) for r in results]
        curves = {r.method: r.dip.mean_curves() for r in results if r.dip is not None}
        dips = {"dip": dataclasses.asdict(ctx.dip)}
        if ctx.dip_plugin is not None:
            dips["tdpm-dip (plugin)"] = dataclasses.asdict(ctx.dip_plugin)
        outputs = {r.method: r.images for r in results}
        status = run_status(done, n_all, resumable=False)
        title = f"Denoising ({opts.protocol} protocol; noise: {self.noise_label})"
        extra = {"status": status, "complete": done == n_all, "noise": self.noise_label, "dip": dips, "curves": curves}
        extra["images"] = _per_image(names, inputs, outputs, x0)
        _write(tmp, names, inputs, outputs, fig, title + ("" if done == n_all else f"\n\n**{status}**"), rows, extra)
        if curves:
            curves_figure(tmp / "dip_curves.png", curves)


def _clean_job(opts: DenoiseOptions, x0: torch.Tensor, seeds: tuple[int, ...]) -> tuple[Job, str]:
    """The job of a --clean run and how its noise is labelled: the paper protocol's x_{t_noisy} is made by the
    method from the clean image; blind noise (8-bit or float, image i from seed i) is added here."""
    if opts.protocol == "paper":
        return Job(seeds, clean=x0, t_noisy=opts.t_noisy, t_trunc=opts.t_trunc), (
            f"paper (x_{opts.t_noisy} from the clean image)"
        )
    sigma = defaults.SIGMA if opts.sigma is None else opts.sigma
    noisy = add_noise(x0, sigma, list(seeds), opts.noise)
    return Job(seeds, noisy=noisy, sigma=(sigma,), clean=x0, **opts.job_options()), f"{opts.noise}, sigma {sigma:g}"


# ------------------------------------------------------------------------------------------ writing


def _per_image(
    names: list[str],
    noisy: list[torch.Tensor] | torch.Tensor,
    outputs: Mapping[str, list[torch.Tensor] | torch.Tensor],
    clean: list[torch.Tensor] | torch.Tensor | None,
) -> list[dict]:
    """metrics.json's scores of each image: PSNR and SSIM of the input and of every method, when the clean
    image is known (else only the names)."""
    rows = []
    for i, name in enumerate(names):
        row: dict = {"name": name}
        if clean is not None:
            row["input"] = scores(noisy[i], clean[i])
            for m, images in outputs.items():
                row[m] = scores(images[i], clean[i])
        rows.append(row)
    return rows


def _write(
    tmp: Path,
    names: list[str],
    noisy: list[torch.Tensor] | torch.Tensor,
    outputs: Mapping[str, list[torch.Tensor] | torch.Tensor],
    fig: list[tuple[str, torch.Tensor]],
    title: str,
    rows: list[dict],
    extra: dict,
) -> None:
    """The run folder, written into the staged `tmp`: noisy/ and one folder of PNGs per method, comparison.png,
    metrics.md and metrics.json."""
    for i, name in enumerate(names):
        save_png(noisy[i], tmp / "noisy" / f"{name}.png")
        for m, images in outputs.items():
            save_png(images[i], tmp / m / f"{name}.png")
    labelled_comparison(tmp / "comparison.png", fig)
    write_text(
        tmp / "metrics.md",
        f"# {title}\n\nRows of comparison.png: " + ", ".join(label for label, _ in fig) + "\n\n" + table(rows),
    )
    write_json(tmp / "metrics.json", {"rows": rows, **extra})
    print(table(rows))

"""What `tdpm-dip restore` does, without click: super-resolution (--task sr) or inpainting (--task inpaint) of a
user's files, or of clean images degraded here first (and scored), through the registry's restoration methods."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import defaults, registry
from ..api import Restorer, read_mask, warn_mask_coverage
from ..data import ImageKind, list_images, load_image, load_images, read_native, scan_native
from ..errors import UserError, check_positive, check_seed
from ..images import as_written, save_like, save_png, upscale_alpha
from ..metrics import score_uint8
from ..noise import add_noise
from ..operators import Downsample, Inpaint, Operator, check_mask_kind, make_mask
from ..outputs import link_or_copy, prepare_out_dir, refuse_inputs_inside, refuse_out_dir, write_json, write_text
from ..reporting import labelled_comparison, table, thumbnails
from .common import RunOptions, finished_earlier, keep_finished, run_status

Echo = Callable[[str], None]
RESTORE_TASKS = ("sr", "inpaint")
# Every entry a restore run can write: an --overwrite run replaces them all, so no method folder of an earlier run
# (another task, other masks) is left beside the new one.
OWNED = ("observed", "mask", *registry.names("restore"), "comparison.png", "metrics.md", "metrics.json")


@dataclass(frozen=True, kw_only=True)
class RestoreOptions(RunOptions):
    """Every option of `tdpm-dip restore` (the CLI documents each one)."""

    out: str
    task: str
    model: str | None = None
    input: str | None = None  # degraded files: low-resolution images, or images with missing pixels
    clean: str | None = None  # clean images, degraded here first (scores PSNR/SSIM)
    reference: str | None = None  # with --input: the clean originals, only to score
    mask: str | None = None  # inpainting: a mask file for every image, or a folder of same-named masks
    mask_kind: str | None = None  # inpainting: box | half | random:P, generated per image from its seed
    scale: int = 4
    sigma: float = 0.0
    methods: tuple[str, ...] = ()  # empty: the best method for the task
    t_trunc: int | None = None
    samples: int = defaults.RESTORE_SAMPLES
    steps: int | None = None
    n: int | None = None
    max_pixels: int = defaults.RESTORE_MAX_PIXELS
    skip_bad: bool = False  # --input: skip unreadable files with a warning
    resume: bool = False  # keep the images an interrupted run into --out finished, compute the rest

    def check(self) -> RestoreOptions:
        """Every check that needs no image and no model; returns the options with the methods resolved."""
        if self.task not in RESTORE_TASKS:
            raise UserError(f"--task must be one of {', '.join(RESTORE_TASKS)}, got {self.task!r}")
        check_seed(self.seed)
        if (self.input is None) == (self.clean is None):
            raise UserError("give exactly one of --input (degraded images) or --clean (images to degrade first)")
        if self.reference is not None and self.input is None:
            raise UserError("--reference scores --input files: give it with --input")
        if self.task == "sr":
            Downsample(self.scale, self.scale, self.scale)  # the scale's range check
            if self.mask is not None or self.mask_kind is not None:
                raise UserError("--mask and --mask-kind are for --task inpaint")
        else:
            if self.mask is not None and self.mask_kind is not None:
                raise UserError("give one of --mask (mask files) or --mask-kind (masks made here)")
            if self.input is not None and self.mask is None and self.mask_kind is None:
                raise UserError("inpainting --input needs --mask (white = known) or --mask-kind")
            check_mask_kind(self.mask_kind or defaults.MASK_KIND)
        if not 0 <= self.sigma <= 255:
            raise UserError(f"--sigma must be in [0, 255] (noise std on the 0..255 scale), got {self.sigma}")
        for m in self.methods:
            entry = registry.get("restore", "blind", m)
            if self.task not in entry.operators:
                raise UserError(f"method {m} does not restore --task {self.task}")
        check_positive("--samples", self.samples)
        check_positive("--steps", self.steps)
        check_positive("--n", self.n)
        check_positive("--max-pixels", self.max_pixels)
        if self.resume and self.overwrite:
            raise UserError("give --resume (keep what an earlier run finished) or --overwrite (start afresh), not both")
        for path, what in ((self.input, "--input"), (self.clean, "--clean"), (self.mask, "--mask")):
            if path is not None and not Path(path).exists():
                raise UserError(f"{what} {path}: no such file or folder")
        return dataclasses.replace(self, methods=tuple(dict.fromkeys(self.methods)))  # a method named twice runs once

    def job_options(self) -> dict:
        return {"t_trunc": self.t_trunc, "samples": self.samples, "ddim_steps": self.steps}


@dataclass
class Observations:
    """The images to restore: names, observations y, their operators, masks made here, clean images (if known)."""

    names: list[str]
    observed: list[torch.Tensor]
    operators: list[Operator]
    clean: list[torch.Tensor] | None
    made_masks: bool
    kinds: list[ImageKind] | None = None  # --input: how each file stores its pixels, so its outputs come back alike

    def kind(self, i: int) -> ImageKind:
        return self.kinds[i] if self.kinds is not None else ImageKind()


def restore(opts: RestoreOptions, echo: Echo) -> Path:
    """Run the command; returns the output folder. The images run a batch at a time (every method on a batch
    before the next); Ctrl-C keeps the finished ones, marked in metrics.json, and `--resume` computes the rest."""
    opts = opts.check()
    keep = opts.overwrite or opts.resume
    refuse_out_dir(opts.out, keep)  # before any model or image is loaded
    refuse_inputs_inside(
        opts.out, {"--input": opts.input, "--clean": opts.clean, "--mask": opts.mask, "--reference": opts.reference}
    )
    obs = _observations(opts) if opts.input is not None else None  # a user's files: checked before the model
    res = Restorer.from_pretrained(
        opts.model, opts.device, opts.dtype, opts.batch_size, opts.dip_preset, opts.dip_iters, opts.dip_lr, True
    )
    res.max_pixels = opts.max_pixels  # checked here already, per file, with the CLI's wording (`_check_pixels`)
    if obs is None:  # clean images are made the model's size first, as `denoise --clean` does
        obs = _observations(opts, int(res.ctx.unet.config.sample_size))
    methods = opts.methods or tuple(res.methods(opts.task)[:1])
    for m in methods:
        unmet = [registry.NEED_TEXT[n] for n in registry.get("restore", "blind", m).needs if n not in res.ctx.provides]
        if unmet:
            raise UserError(f"method {m} cannot run with this DDPM (it needs {' and '.join(unmet)})")
    echo(f"{len(obs.names)} images: {_describe(opts)}; methods {', '.join(methods)}")
    out_dir = prepare_out_dir(opts.out, keep)  # after every input check
    run = _Run(res, opts, obs, methods)
    if opts.resume and run.carry(out_dir):
        echo(f"--resume: {run.done_count} of {len(obs.names)} images are done in {out_dir}; computing the rest")
    keep_finished(run, out_dir, len(obs.names), echo, resume=opts.resume, owned=OWNED)
    print(table(run.rows()))
    print(out_dir / "comparison.png")
    return out_dir


def _describe(opts: RestoreOptions) -> str:
    what = f"{opts.scale}x super-resolution" if opts.task == "sr" else "inpainting"
    return what + (f", noise sigma {opts.sigma:g}" if opts.sigma else "")


# ------------------------------------------------------------------------------------------ inputs


def _check_pixels(opts: RestoreOptions, names: list[str], sizes: list[tuple[int, int]]) -> None:
    """Refuse an output above the pixel limit before any work (one line naming the file)."""
    f = opts.scale if opts.task == "sr" and opts.input is not None else 1
    for name, (h, w) in zip(names, sizes):
        if h * f * w * f > opts.max_pixels:
            raise UserError(
                f"{name}: the restored image would be {w * f}x{h * f} px, above the limit of {opts.max_pixels} "
                "pixels (--max-pixels raises it; the cost grows with the pixels)"
            )


def _observations(opts: RestoreOptions, size: int | None = None) -> Observations:
    """Read the user's degraded files (and masks) at their own sizes, or degrade clean images here (8-bit, with
    noise sigma), padded to a square and resized to `size` (the model's)."""
    kinds = None
    if opts.input is not None:
        found = scan_native(opts.input, opts.n, skip_bad=opts.skip_bad)
        files, kinds = [(f.name, f.load()) for f in found], [f.kind for f in found]
    else:
        assert opts.clean is not None and size is not None  # check(): one of --input and --clean
        ims = load_images(opts.clean, size, limit=opts.n)
        files = list(zip(ims.names, ims.images))
    names = [nm for nm, _ in files]
    images = [x for _, x in files]
    _check_pixels(opts, names, [tuple(x.shape[-2:]) for x in images])  # type: ignore[misc]
    seeds = list(range(opts.seed, opts.seed + len(images)))
    if opts.input is not None:
        ops = _operators(opts, names, images, seeds, observed=True)
        clean = _references(opts.reference, names, ops, images) if opts.reference is not None else None
        y = [op.A(x[None])[0] if isinstance(op, Inpaint) else x for op, x in zip(ops, images)]
        return Observations(names, y, ops, clean, opts.mask is None, kinds)
    if opts.task == "sr":  # a side that is not a multiple of the scale loses its last rows / columns
        images = [
            x[..., : x.shape[-2] // opts.scale * opts.scale, : x.shape[-1] // opts.scale * opts.scale] for x in images
        ]
    ops = _operators(opts, names, images, seeds, observed=False)
    y = [add_noise(op.A(x[None]), opts.sigma, [s])[0] for op, x, s in zip(ops, images, seeds)]
    return Observations(names, y, ops, images, opts.mask is None)


def _operators(
    opts: RestoreOptions, names: list[str], images: list[torch.Tensor], seeds: list[int], observed: bool
) -> list[Operator]:
    """Each image's operator: the scale (of an observed low-res image, or of a clean one), or its mask."""
    if opts.task == "sr":
        f = opts.scale if observed else 1
        return [Downsample(opts.scale, x.shape[-2] * f, x.shape[-1] * f) for x in images]
    ops: list[Operator] = []
    masks = _mask_files(opts.mask, names) if opts.mask is not None else None
    for i, (name, x) in enumerate(zip(names, images)):
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if masks is not None:
            m = read_mask(masks[i], size, f"mask of {name}")  # another size: resized, with a warning naming it
        else:
            m = make_mask(opts.mask_kind or defaults.MASK_KIND, *size, seeds[i])
        warn_mask_coverage(m, name)
        ops.append(Inpaint(m[None]))
    return ops


def _named_like(folder: Path, names: list[str]) -> dict[str, Path]:
    """The file of `folder` for each of `names` (the inputs' output names, `data.file_names`): the file at the same
    path under the folder, whatever its extension (`x/p` finds x/p.png); an input that kept its extension (`p.jpg`
    beside `p.png`) takes that name's file, or the one without it. Names with no file are left out."""
    files = list_images(folder)
    by_stem = {f.relative_to(folder).with_suffix("").as_posix().casefold(): f for f in files}
    by_name = {f.relative_to(folder).as_posix().casefold(): f for f in files}
    found = {}
    for nm in names:
        f = by_name.get(nm.casefold()) or by_stem.get(nm.casefold()) or by_stem.get(_stem(nm).casefold())
        if f is not None:
            found[nm] = f
    return found


def _stem(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix else name


def _mask_files(mask: str, names: list[str]) -> list[Path]:
    """One mask file for every image, or the same-named file of a folder for each (`_named_like`; one line if one
    is missing)."""
    path = Path(mask)
    if path.is_file():
        return [path] * len(names)
    found = _named_like(path, names)
    missing = [nm for nm in names if nm not in found]
    if missing:
        raise UserError(
            f"--mask {mask}: no mask named like " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        )
    return [found[nm] for nm in names]


def _references(folder: str, names: list[str], ops: list[Operator], observed: list[torch.Tensor]) -> list[torch.Tensor]:
    """The clean originals of the inputs, matched by name (`_named_like`) and checked against the size each
    restored image will have, before any work (one line naming the first that does not fit)."""
    root = Path(folder)
    found = {nm: root for nm in names} if root.is_file() and len(names) == 1 else _named_like(root, names)
    missing = [nm for nm in names if nm not in found]
    if missing:
        raise UserError(f"--reference {folder}: no clean image named like " + ", ".join(missing[:3]))
    refs = []
    for nm, op, y in zip(names, ops, observed):
        x = read_native(found[nm])[0]
        want = op.out_size(*y.shape[-2:])
        if tuple(x.shape[-2:]) != tuple(want):
            raise UserError(
                f"--reference {found[nm]}: {x.shape[-1]}x{x.shape[-2]} px, but {nm} restores to {want[1]}x{want[0]}"
            )
        refs.append(x)
    return refs


# ------------------------------------------------------------------------------------------ outputs


class _Run:
    """The images of one `restore` run: each method's output per image, and each image's metrics.json entry."""

    def __init__(self, res: Restorer, opts: RestoreOptions, obs: Observations, methods: tuple[str, ...]) -> None:
        self.res, self.opts, self.obs, self.methods = res, opts, obs, methods
        n = len(obs.names)
        self.outputs: dict[str, list[torch.Tensor | None]] = {m: [None] * n for m in methods}
        self.entries: list[dict] = [{"name": nm, "status": "not computed"} for nm in obs.names]
        self.earlier: Path | None = None  # the folder of an earlier run whose finished images are carried over

    @property
    def done_count(self) -> int:
        return sum(e["status"] == "done" for e in self.entries)

    def carry(self, out_dir: Path) -> bool:
        """Take over the images an earlier run with the same options finished in `out_dir` (their files
        present); a run made with other options is refused with one line."""
        earlier = finished_earlier(out_dir, _run_key(self.opts), "restore", self.obs.names, self.methods)
        for i, nm in enumerate(self.obs.names):
            if nm in earlier:
                for m in self.methods:
                    self.outputs[m][i] = load_image(out_dir / m / f"{nm}.png", None)
                self.entries[i] = earlier[nm] | {"run": "earlier (--resume)"}
        self.earlier = out_dir
        return self.done_count > 0

    def compute(self) -> None:
        """Every method on a batch of the images not done yet, then the next batch (image i uses seed SEED+i,
        whatever the batch)."""
        todo = [i for i, e in enumerate(self.entries) if e["status"] != "done"]
        obs, opts, bs = self.obs, self.opts, self.res.ctx.batch_size
        for lo in range(0, len(todo), bs):
            idx = todo[lo : lo + bs]
            entries: list[dict] = [{"name": obs.names[i], "run": "this"} for i in idx]
            for m in self.methods:
                outs, seconds, nfe = self.res.restore_tensors(
                    [obs.observed[i] for i in idx],
                    [obs.operators[i] for i in idx],
                    m,
                    [opts.seed + i for i in idx],
                    opts.sigma,
                    **opts.job_options(),
                )
                for k, i in enumerate(idx):
                    self.outputs[m][i] = outs[k]
                    entries[k][m] = {"seconds": seconds / len(idx), "NFE": nfe}
                    if obs.clean is not None:  # scored as written: a grey file's channels averaged
                        out = as_written(outs[k], obs.kind(i).gray)
                        entries[k][m] |= dict(zip(("PSNR", "SSIM"), score_uint8(out, obs.clean[i])))
            for k, i in enumerate(idx):
                size = list(self.outputs[self.methods[0]][i].shape[-2:][::-1])  # type: ignore[union-attr]
                self.entries[i] = entries[k] | {"size": size, "status": "done"}

    def rows(self) -> list[dict]:
        """One table row per method: mean scores, NFE and seconds over the images done."""
        done = [e for e in self.entries if e["status"] == "done"]
        rows = []
        for m in self.methods:
            row: dict = {"method": m, "protocol": "blind", "task": _describe(self.opts), "n": len(done)}
            if self.obs.clean is not None and done:
                row["PSNR"] = sum(e[m]["PSNR"] for e in done) / len(done)
                row["SSIM"] = sum(e[m]["SSIM"] for e in done) / len(done)
            n = max(1, len(done))
            row |= {
                "NFE": round(sum(e[m]["NFE"] for e in done) / n, 1),
                "s/img": sum(e[m]["seconds"] for e in done) / n,
            }
            rows.append(row)
        return rows

    def _output_kind(self, i: int) -> tuple[bool, int, np.ndarray | None]:
        """(grey, bits, alpha) of image i's outputs: its file's kind; inpainting passes the alpha through
        unchanged, super-resolution upscales it (bicubic) with the colours."""
        kind, op = self.obs.kind(i), self.obs.operators[i]
        return kind.gray, kind.bits, upscale_alpha(kind.alpha, op.factor) if isinstance(op, Downsample) else kind.alpha

    def write(self, tmp: Path) -> None:
        """observed/, mask/ (masks made here), one folder of PNGs per method (the images done), comparison.png,
        metrics.md and metrics.json."""
        obs, n = self.obs, len(self.obs.names)
        done = [i for i, e in enumerate(self.entries) if e["status"] == "done"]
        status, rows = run_status(len(done), n), self.rows()
        for i, name in enumerate(obs.names):
            kind = obs.kind(i)
            save_like(obs.observed[i], tmp / "observed" / f"{name}.png", kind.gray, kind.bits, kind.alpha)
            if obs.made_masks and isinstance(obs.operators[i], Inpaint):
                save_png(obs.operators[i].mask[0].expand(3, -1, -1) * 2 - 1, tmp / "mask" / f"{name}.png")  # type: ignore[attr-defined]
        for m, outs in self.outputs.items():
            for i in done:
                dst = tmp / m / f"{obs.names[i]}.png"
                if self.earlier is not None and self.entries[i]["run"] != "this":  # the earlier file, as it was
                    link_or_copy(self.earlier / m / f"{obs.names[i]}.png", dst)  # names keep sub-folders
                else:
                    save_like(outs[i], dst, *self._output_kind(i))  # type: ignore[arg-type]
        fig: list[tuple[str, torch.Tensor]] = []
        if done:
            fig.append(("observed", thumbnails([obs.observed[i] for i in done])))
            fig += [(m, thumbnails([o[i] for i in done])) for m, o in self.outputs.items()]  # type: ignore[misc]
            if obs.clean is not None:
                fig.append(("clean", thumbnails([obs.clean[i] for i in done])))
            labelled_comparison(tmp / "comparison.png", fig)
        title = f"Restoration: {_describe(self.opts)} (blind protocol: only the observation)"
        labels = ", ".join(label for label, _ in fig)
        head = f"# {title}\n\n" + ("" if len(done) == n else f"**{status}**\n\n")
        write_text(tmp / "metrics.md", head + f"Rows of comparison.png: {labels}\n\n" + table(rows))
        write_json(
            tmp / "metrics.json",
            {
                "status": status,
                "complete": len(done) == n,
                "run": _run_key(self.opts),
                "rows": rows,
                "options": _options(self.opts),
                "images": self.entries,
            },
        )


def _run_key(opts: RestoreOptions) -> dict:
    """What decides a run's results: a --resume run must match it (device, threads and batch size do not change
    them: image i uses seed SEED+i whatever the batch)."""
    skip = ("out", "overwrite", "resume", "n", "device", "batch_size", "skip_bad")
    key = {k: v for k, v in _options(opts).items() if k not in skip}
    for k in ("input", "clean", "reference", "mask"):
        if key.get(k) is not None:
            key[k] = str(Path(key[k]).resolve())
    return json.loads(json.dumps(key))  # tuples as lists, as metrics.json reads back


def _options(opts: RestoreOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("out", "overwrite", "resume")}

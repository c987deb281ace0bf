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
from ..data import load_images, load_native
from ..embedded import DENOISER_NAME
from ..errors import UserError, check_positive, check_sigma, check_symmetries
from ..images import save_png
from ..methods import Job, run
from ..methods.common import check_trained_level
from ..methods.observe import NOISE_MODELS, add_noise, blind_sigmas
from ..methods.shard import is_main_process
from ..metrics import psnr, ssim
from ..models import unet_size
from ..noise import check_t_trunc
from ..outputs import prepare_out_dir, refuse_out_dir, staged_dir, write_json, write_text
from ..reporting import curves_figure, labelled_comparison, result_row, table, thumbnails
from ..runtime import load_context
from .common import RunOptions

Echo = Callable[[str], None]


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

    def check(self) -> DenoiseOptions:
        """Every check that needs no image and no model (one-line UserErrors); returns the options with the
        methods resolved from the registry."""
        if (self.input is None) == (self.clean is None):
            raise UserError("give exactly one of --input (noisy images) or --clean (images to noise first)")
        if self.reference is not None and self.input is None:
            raise UserError("--reference scores --input files: give it with --input")
        if self.protocol == "paper" and self.clean is None:
            raise UserError("the paper protocol builds its DIP target from the clean image: it needs --clean")
        if self.noise not in NOISE_MODELS:
            raise UserError(f"--noise must be one of {', '.join(NOISE_MODELS)}, got {self.noise!r}")
        default = (
            registry.names("denoise", "paper")
            if self.protocol == "paper"
            else [m.name for m in registry.methods("denoise", "blind", installed_only=True)][:1]
        )
        methods = self.methods or tuple(default)
        for m in methods:
            registry.get("denoise", self.protocol, m)  # an unknown or other-protocol method fails here
        check_positive("--samples", self.samples)
        check_positive("--ddim-steps", self.ddim_steps)
        check_symmetries(self.symmetries)
        check_positive("--n", self.n)
        check_sigma(self.sigma)
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
        refuse_out_dir(opts.out, opts.overwrite)  # before any model or image is loaded
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
    den = Denoiser(ctx, shard, opts.model or DENOISER_NAME)
    if opts.input is not None:
        return _denoise_files(den, opts, echo)
    return _denoise_clean(den, opts, echo)


# ------------------------------------------------------------------------------------------ a user's files


def _denoise_files(den: Denoiser, opts: DenoiseOptions, echo: Echo) -> Path:
    """Blind denoising of noisy files, each at its own size and aspect; image i uses seed SEED+i."""
    assert opts.input is not None  # denoise() comes here with --input only
    main = is_main_process()  # under a launcher: the only process that writes
    files = load_native(opts.input, limit=opts.n, progress=main, skip_bad=opts.skip_bad)
    names = [name for name, _ in files]
    noisy = [x for _, x in files]
    clean = _references(opts.reference, files) if opts.reference is not None else None
    sig = blind_sigmas(noisy, opts.sigma)
    if opts.sigma is None:
        echo("estimated sigma per image (0..255): " + ", ".join(f"{s:.1f}" for s in sig))
    echo(f"{len(files)} images from {opts.input}, each denoised at its own size")
    out_dir = prepare_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)  # after every input check
    seeds = list(range(opts.seed, opts.seed + len(files)))
    outputs, rows = {}, []
    for m in opts.methods:
        outputs[m], seconds, nfe = den.denoise_tensors(noisy, sig, m, seeds, **opts.job_options())
        rows.append(_files_row(m, outputs[m], noisy, clean, sig, seconds, nfe, den))
    if not main:
        return out_dir
    fig = [("noisy", thumbnails(noisy))] + [(m, thumbnails(outputs[m])) for m in opts.methods]
    per_image = _per_image(names, noisy, outputs, clean)
    for entry, x, s in zip(per_image, noisy, sig):
        entry.update(size=f"{x.shape[-1]}x{x.shape[-2]}", sigma=s)  # width x height, as everywhere else
    _write(
        out_dir,
        names,
        noisy,
        outputs,
        fig,
        "Denoising (blind protocol; your files, each at its own size)",
        rows,
        {"images": per_image, "sigma": sig},
    )
    return out_dir


def _references(folder: str, files: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The clean originals of the noisy files, matched by file name and size (one-line error otherwise)."""
    refs = dict(load_native(folder))
    missing = [nm for nm, x in files if nm not in refs or refs[nm].shape != x.shape]
    if missing:
        raise UserError(
            f"--reference {folder}: no clean image of the same name and size for "
            + ", ".join(missing[:3])
            + (" ..." if len(missing) > 3 else "")
        )
    return [refs[nm] for nm, _ in files]


def _files_row(
    method: str,
    outputs: list[torch.Tensor],
    noisy: list[torch.Tensor],
    clean: list[torch.Tensor] | None,
    sig: list[float],
    seconds: float,
    nfe: float,
    den: Denoiser,
) -> dict:
    """One table row for a method on files of mixed sizes: scores per image, then the mean."""
    n = len(noisy)
    row: dict = {
        "method": method,
        "protocol": "blind",
        "n": n,
        "noise": "your files",
        "sigma": sig[0] if len(set(sig)) == 1 else "per image (estimated)",
    }
    if clean is not None:
        row["PSNR"] = sum(float(psnr(o[None], c[None])) for o, c in zip(outputs, clean)) / n
        row["SSIM"] = sum(float(ssim(o[None], c[None])) for o, c in zip(outputs, clean)) / n
        row["input PSNR"] = sum(float(psnr(x[None], c[None])) for x, c in zip(noisy, clean)) / n
    row.update(
        {
            "NFE": round(nfe, 1),
            "s/img": seconds / n,
            "device": str(den.ctx.device),
            "model": Path(den.name).name or den.name,
        }
    )
    return row


# ------------------------------------------------------------------------------------------ clean images


def _denoise_clean(den: Denoiser, opts: DenoiseOptions, echo: Echo) -> Path:
    """Clean images noised here (blind: 8-bit or float noise of sigma; paper: x_{t_noisy}), then each method."""
    assert opts.clean is not None  # check(): --clean when --input is not given
    ctx = den.ctx
    if opts.protocol == "paper":
        check_trained_level(ctx, opts.t_noisy)  # before any image is read or anything written
    size = unet_size(ctx.unet.config)
    main = is_main_process()  # under a launcher: the only process that writes
    images = load_images(opts.clean, size, limit=opts.n, progress=main)
    echo(f"{len(images)} images from {opts.clean}, padded to square and resized to {size}x{size} (the model's size)")
    seeds = tuple(range(opts.seed, opts.seed + len(images)))
    x0 = images.images
    if opts.protocol == "paper":
        job = Job(seeds, clean=x0, t_noisy=opts.t_noisy, t_trunc=opts.t_trunc)
        noise_label = f"paper (x_{opts.t_noisy} from the clean image)"
    else:
        sigma = defaults.SIGMA if opts.sigma is None else opts.sigma
        noisy = add_noise(x0, sigma, list(seeds), opts.noise)
        noise_label = f"{opts.noise}, sigma {sigma:g}"
        job = Job(seeds, noisy=noisy, sigma=(sigma,), clean=x0, **opts.job_options())
    out_dir = prepare_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)  # after every input check
    results = [run(ctx, "denoise", opts.protocol, m, job, den.shard) for m in opts.methods]
    if not main:
        return out_dir
    labels = {
        "data": Path(opts.clean).name or opts.clean,
        "model": Path(den.name).name or den.name,
        "device": str(ctx.device),
    }
    rows = [result_row(r, x0, noise=noise_label, **labels) for r in results]
    inputs = results[0].inputs
    assert inputs is not None  # every denoiser returns its inputs
    fig = [("clean", x0), ("noisy", inputs)] + [(r.method, r.images) for r in results]
    curves = {r.method: r.dip.mean_curves() for r in results if r.dip is not None}
    dips = {"dip": dataclasses.asdict(ctx.dip)}
    if ctx.dip_plugin is not None:
        dips["tdpm-dip (plugin)"] = dataclasses.asdict(ctx.dip_plugin)
    outputs = {r.method: r.images for r in results}
    _write(
        out_dir,
        images.names,
        inputs,
        outputs,
        fig,
        f"Denoising ({opts.protocol} protocol; noise: {noise_label})",
        rows,
        {"noise": noise_label, "dip": dips, "curves": curves, "images": _per_image(images.names, inputs, outputs, x0)},
        curves,
    )
    return out_dir


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
            c = clean[i][None]
            row["input"] = {"PSNR": float(psnr(noisy[i][None], c)), "SSIM": float(ssim(noisy[i][None], c))}
            for m, images in outputs.items():
                row[m] = {"PSNR": float(psnr(images[i][None], c)), "SSIM": float(ssim(images[i][None], c))}
        rows.append(row)
    return rows


def _write(
    out_dir: Path,
    names: list[str],
    noisy: list[torch.Tensor] | torch.Tensor,
    outputs: Mapping[str, list[torch.Tensor] | torch.Tensor],
    fig: list[tuple[str, torch.Tensor]],
    title: str,
    rows: list[dict],
    extra: dict,
    curves: dict | None = None,
) -> None:
    """The run folder: noisy/ and one folder of PNGs per method, comparison.png, dip_curves.png (when a DIP
    ran), metrics.md and metrics.json; built beside `out_dir` and moved in complete."""
    with staged_dir(out_dir) as tmp:
        for i, name in enumerate(names):
            save_png(noisy[i], tmp / "noisy" / f"{name}.png")
            for m, images in outputs.items():
                save_png(images[i], tmp / m / f"{name}.png")
        labelled_comparison(tmp / "comparison.png", fig)
        if curves:
            curves_figure(tmp / "dip_curves.png", curves)
        write_text(
            tmp / "metrics.md",
            f"# {title}\n\nRows of comparison.png: " + ", ".join(label for label, _ in fig) + "\n\n" + table(rows),
        )
        write_json(tmp / "metrics.json", {"rows": rows, **extra})
    print(table(rows))
    print(out_dir / "comparison.png")

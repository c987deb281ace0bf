"""The browser app's work, free of any UI: load the models once, denoise one upload, generate a grid.

`app_ui.py` wraps these handlers in a Gradio page (`tdpm-dip app`); tests call them directly. Every
problem the user can fix is a `UserError` with a one-line message, which the page shows as is.
Method lists come from the registry (`registry.py`), so a newly registered method appears here too.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError, check_positive, check_sigma
from .registry import Job, Method, installed, methods
from .tasks import Context

MAX_SIDE = 1024   # uploads longer than this on their long side are downscaled (with a notice)
MAX_N = 64        # images per generated grid

# A user's image: a file path (what an upload gives), a PIL image, or a uint8 HWC / HW array.
ImageInput = str | os.PathLike | Image.Image | np.ndarray
Progress = Callable[[float, str], None]  # (fraction done, what is being done)


@dataclass
class AppModels:
    """What every request shares: the DDPM context, loaded once; a lock, so one request computes at a time."""

    ctx: Context
    model: str
    generator: str | None = None  # the amortized TDPM generator folder (issue 10), when there is one
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_models(model: str | None = None, generator: str | None = None, device: str = "auto",
                dip_preset: str = "auto") -> AppModels:
    """The DDPM (`--model`, or the embedded default) in the context `denoise --input` uses (blind DIP
    settings, plug-in DIP for blind TDPM-DIP); `generator` defaults to the embedded one, if shipped."""
    from .cli import dip_config, load_context, pick_dip_preset
    from .embedded import resolve_generator, resolve_model

    if generator is not None and not Path(generator).is_dir():
        raise UserError(f"--generator {generator}: no such folder")
    generator = resolve_generator(model, generator)
    model = resolve_model(model)
    ctx = load_context(model, device, "auto", 16,
                       lambda dev: dip_config("blind", pick_dip_preset(dip_preset, dev), None, None))
    ctx.dip_plugin = dip_config("plugin", ctx.dip.preset, None, None)
    if generator is not None:  # amortized TDPM (method tdpm) reads it from the context
        from .generator import load_generator

        ctx.generator = load_generator(generator, ctx.unet, ctx.scheduler, ctx.device)
    return AppModels(ctx, model, generator)


# ------------------------------------------------------------------------------------------ method lists

def denoise_methods() -> list[Method]:
    """The registry's blind denoisers whose extra is installed, best first (the first is the default)."""
    return [m for m in methods("denoise", "blind") if installed(m)]


def generate_methods() -> list[Method]:
    """The registry's generators that need no reference data (the 'noise' protocol)."""
    return [m for m in methods("generate", "noise") if installed(m)]


def method_label(m: Method) -> str:
    return f"{m.name} (NFE {m.nfe})"


# ------------------------------------------------------------------------------------------ images

def read_image(image: ImageInput, what: str = "image") -> torch.Tensor:
    """One user image -> [3, H, W] in [-1, 1] at its own size; a bad file is a one-line `UserError`."""
    from .data import MIN_SIDE, BadImage, load_image, pil_to_tensor, to_rgb

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{what}: no file was uploaded")
        try:
            return load_image(path, None)
        except BadImage as e:  # the message starts with the server-side temp path: show the file's name only
            reason = str(e).removeprefix(f"{path}: ")
            if reason not in ("not an image", "empty file") and "smaller than" not in reason:
                reason = f"not a readable image ({reason})"
            raise UserError(f"{what} {path.name}: {reason}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(f"{what}: expected an 8-bit image array (H, W) or (H, W, C), got {image.dtype} "
                            f"{image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserError(f"{what}: not an image ({type(image).__name__})")
    if min(image.size) < MIN_SIDE:
        raise UserError(f"{what}: image is {image.size[0]}x{image.size[1]} px, smaller than {MIN_SIDE} px")
    return pil_to_tensor(to_rgb(image))


def fit_side(x: torch.Tensor, max_side: int) -> tuple[torch.Tensor, str | None]:
    """Downscale [3, H, W] so that its long side is at most `max_side` (Lanczos, aspect kept);
    returns the image and a notice when it was downscaled."""
    from .data import pil_to_tensor
    from .outputs import to_uint8

    h, w = x.shape[-2:]
    if max(h, w) <= max_side:
        return x, None
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(to_uint8(x)).resize(size, Image.Resampling.LANCZOS)
    return pil_to_tensor(small), (f"the upload is {w}x{h} px, over the {max_side} px limit: denoised at "
                                  f"{size[0]}x{size[1]} px (downscaling also lowers the noise level)")


# ------------------------------------------------------------------------------------------ denoise

def parse_sigma(text: str | float | None) -> float | None:
    """The page's sigma field: blank = None (estimate it), else a noise std on the 0..255 scale."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"sigma must be a number (noise std on the 0..255 scale) or blank, got {text!r}") from None
    check_sigma(value, "sigma")
    return value


@dataclass
class Denoised:
    """A denoising result: both images as uint8 HWC arrays of the same size, and what it cost."""

    image: np.ndarray
    input: np.ndarray
    info: dict
    notices: list[str]


def denoise_handler(models: AppModels, noisy: ImageInput | None, method: str | None = None,
                    sigma: float | None = None, clean: ImageInput | None = None, seed: int = 0,
                    max_side: int = MAX_SIDE, progress: Progress | None = None) -> Denoised:
    """Blind denoising of one upload at its own size (`tasks.run_native`, as `denoise --input` does).

    sigma None: estimated (`tasks.blind_sigmas`). `clean`, when given, only scores PSNR/SSIM.
    """
    from .metrics import psnr, ssim
    from .outputs import to_uint8
    from .tasks import blind_sigmas, run_native

    report = progress or (lambda frac, desc: None)
    names = [m.name for m in denoise_methods()]
    method = method or names[0]
    if method not in names:
        raise UserError(f"unknown denoising method {method!r}; choose {', '.join(names)}")
    if noisy is None:
        raise UserError("upload a noisy image first")
    check_positive("max side", max_side)
    check_sigma(sigma, "sigma")
    report(0.0, "reading the image")
    x = read_image(noisy, "noisy image")
    x, notice = fit_side(x, max_side)
    notices = [notice] if notice else []
    ref = None
    if clean is not None:
        ref = fit_side(read_image(clean, "clean image"), max_side)[0]
        if ref.shape != x.shape:
            raise UserError(f"the clean image is {ref.shape[-1]}x{ref.shape[-2]} px, the noisy one "
                            f"{x.shape[-1]}x{x.shape[-2]} px: they must have the same size")
    report(0.05, "estimating sigma" if sigma is None else "denoising")
    sig = blind_sigmas([x], sigma)
    job = Job((seed,), noisy=x[None], sigma=(sig[0],))
    with models.lock:
        # A fresh DIP memo per request: the shared context must not keep every upload's fit alive.
        ctx = dataclasses.replace(models.ctx, dip_memo={})
        report(0.1, f"denoising with {method}")
        res = run_native(ctx, method, job)
    out = res.images[0]
    if not torch.isfinite(out).all():
        raise UserError(f"{method} returned non-finite values: this model does not fit the image")
    h, w = x.shape[-2:]
    info: dict = {"method": method, "seconds": res.seconds, "nfe": res.nfe, "sigma": sig[0],
                  "sigma_estimated": sigma is None, "width": w, "height": h, "device": str(ctx.device)}
    if ref is not None:
        info.update(psnr=float(psnr(out[None], ref[None])), ssim=float(ssim(out[None], ref[None])),
                    input_psnr=float(psnr(x[None], ref[None])))
    report(1.0, "done")
    return Denoised(to_uint8(out), to_uint8(x), info, notices)


def denoise_summary(d: Denoised) -> str:
    """One Markdown line of what was done and what it cost (the page shows it under the result)."""
    i = d.info
    est = " (estimated)" if i["sigma_estimated"] else ""
    text = (f"**{i['method']}**: {i['seconds']:.2f} s, NFE {i['nfe']}, sigma {i['sigma']:.1f}{est}, "
            f"{i['width']}x{i['height']} px on {i['device']}")
    if "psnr" in i:
        text += f"; PSNR {i['psnr']:.2f} dB (noisy {i['input_psnr']:.2f} dB), SSIM {i['ssim']:.3f}"
    return "\n\n".join([text] + [f"Note: {n}" for n in d.notices])


# ------------------------------------------------------------------------------------------ generate

@dataclass
class Generated:
    """A grid of generated images (uint8 HWC) and what it cost."""

    grid: np.ndarray
    images: torch.Tensor
    info: dict


def generate_handler(models: AppModels, method: str | None = None, n: int = 4, seed: int = 0,
                     steps: int | None = None, t_trunc: int | None = None,
                     progress: Progress | None = None) -> Generated:
    """n images of a registry generator from pure noise (image i uses seed SEED+i), as one grid."""
    from .outputs import make_grid
    from .tasks import run, validate_t_trunc

    report = progress or (lambda frac, desc: None)
    names = [m.name for m in generate_methods()]
    method = method or names[0]
    if method not in names:
        raise UserError(f"unknown generation method {method!r}; choose {', '.join(names)}")
    n, seed = int(n), int(seed)
    if not 1 <= n <= MAX_N:
        raise UserError(f"n must be in 1..{MAX_N}, got {n}")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if steps is not None:
        steps = int(steps)
        check_positive("steps", steps)
    if t_trunc is not None:
        t_trunc = validate_t_trunc(models.ctx.scheduler, int(t_trunc))
    job = Job(tuple(range(seed, seed + n)), steps=steps, t_trunc=t_trunc)
    with models.lock:
        report(0.0, f"generating {n} images with {method}")
        res = run(models.ctx, "generate", "noise", method, job)
    size = res.images.shape[-1]
    grid = make_grid(res.images, upscale=max(1, 96 // size))  # small model images stay visible
    report(1.0, "done")
    return Generated(grid, res.images, {"method": method, "n": n, "seed": seed, "seconds": res.seconds,
                                        "nfe": res.nfe, "device": str(models.ctx.device)})


def generate_summary(g: Generated) -> str:
    i = g.info
    return (f"**{i['method']}**: {i['n']} images (seeds {i['seed']}..{i['seed'] + i['n'] - 1}), "
            f"{i['seconds']:.2f} s, NFE {i['nfe']} per image on {i['device']}")


# ------------------------------------------------------------------------------------------ examples

def write_examples(folder: str | os.PathLike, n: int = 2, size: int = 64, sigma: float = 25.0) -> list[list[str]]:
    """Noisy (sigma on 0..255, 8-bit) procedural sprites and their clean originals, written as PNGs:
    [[noisy path, clean path], ...] for the page's examples. Seeded, so the same every start."""
    from .data import make_sprites
    from .outputs import save_png
    from .tasks import add_noise

    folder = Path(folder)
    sprites = make_sprites(n, size, seed=1234)
    noisy = add_noise(sprites.images, sigma, list(range(n)), "clipped")
    rows = []
    for i in range(n):
        pn, pc = folder / f"sprite{i}_noisy_sigma{sigma:g}.png", folder / f"sprite{i}_clean.png"
        save_png(noisy[i], pn)
        save_png(sprites.images[i], pc)
        rows.append([str(pn), str(pc)])
    return rows

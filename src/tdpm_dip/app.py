"""The browser app's work, free of any UI: load the models once, denoise one upload, generate a grid.

`app_ui.py` wraps these handlers in a Gradio page (`tdpm-dip app`); tests call them directly. Every
problem the user can fix is a `UserError` with a one-line message, which the page shows as is.
Method lists come from the registry (`registry.py`), so a newly registered method appears here too; the
work itself goes through the Python API (`api.py`), as the CLI's does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import defaults, registry
from .api import Denoiser, Generator, Restorer
from .data import ImageInput, ImageKind, make_sprites, pil_to_tensor, read_user_image, read_user_image_kind
from .embedded import DDPM_NAME, DENOISER_NAME, resolve_generator, resolve_model
from .errors import UserError, check_positive, check_sigma
from .generator import load_generator
from .images import like, make_grid, save_png, to_uint8
from .methods.observe import blind_sigmas
from .metrics import psnr, scores
from .noise import add_noise, check_t_trunc, num_levels
from .registry import Method
from .runtime import dip_config, load_context

# What one request may cost (the page states them): an upload is read only up to MAX_UPLOAD_PIXELS (a larger one
# is refused from its header, before its pixels are decoded), then denoised at up to MAX_PIXELS (larger ones are
# downscaled, with a notice) and stopped after MAX_SECONDS; QUEUE_SIZE requests wait at most, one computes.
MAX_SIDE = defaults.APP_MAX_SIDE
MAX_PIXELS = defaults.APP_MAX_PIXELS
MAX_UPLOAD_PIXELS = defaults.APP_MAX_UPLOAD_PIXELS
MAX_SECONDS = defaults.APP_MAX_SECONDS
QUEUE_SIZE = defaults.APP_QUEUE_SIZE
MAX_N = 64  # images per generated grid
MAX_SEED = 2**63 - 1 - MAX_N  # image i uses seed + i: every seed a torch generator takes


class Cancelled(Exception):
    """The visitor left: the work for a request nobody waits for stops between tiles."""


def budget_check(max_seconds: float, alive: Callable[[], bool] | None = None) -> Callable[[], None]:
    """A `Context.interrupt` for one request: a one-line UserError past `max_seconds`, Cancelled once `alive`
    says the visitor has gone."""
    deadline = time.monotonic() + max_seconds

    def check() -> None:
        if alive is not None and not alive():
            raise Cancelled
        if time.monotonic() > deadline:
            raise UserError(
                f"stopped: this image needs more than the {max_seconds:g} s a request may take here; "
                "try a smaller image or a cheaper method"
            )

    return check


def check_seed(seed: object, n: int = 1) -> int:
    """The page's seed: an integer in 0..MAX_SEED (image i uses seed + i)."""
    try:
        value = int(seed)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"seed must be a whole number, got {seed!r}") from None
    if not 0 <= value <= MAX_SEED - n:
        raise UserError(f"seed must be in 0..{MAX_SEED - n}, got {value}")
    return value


Progress = Callable[[float, str], None]  # (fraction done, what is being done)


def check_gradio() -> None:
    """The app needs the optional `app` extra (Gradio): a one-line error before any model is loaded."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the app needs Gradio, which is not installed: pip install 'tdpm-dip[app]'")


@dataclass
class AppModels:
    """What every request shares: one DDPM context behind the API's Denoiser and Generator, loaded once; a
    lock, so one request computes at a time."""

    denoiser: Denoiser
    generator: Generator
    model: str
    generator_folder: str | None = None  # the amortized TDPM generator folder, when there is one
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ctx(self):
        return self.denoiser.ctx

    def restorer(self, interrupt: Callable[[], None] | None = None) -> Restorer:
        """The Restorer on the denoiser's DDPM, with the restoration DIP, a fresh DIP memo per request and the
        request's stop check (`budget_check`; it runs after every DIP step and chain step)."""
        ctx = self.denoiser.ctx
        dip = dip_config("restore", ctx.dip.preset)
        return Restorer(dataclasses.replace(ctx, dip=dip, dip_memo={}, interrupt=interrupt, progress=False))


def load_models(
    model: str | None = None, generator: str | None = None, device: str = "auto", dip_preset: str = "auto"
) -> AppModels:
    """The DDPMs the page uses: `--model` for every tab, or the embedded defaults (the Pokemon denoiser for the
    Denoise, Upscale and Inpaint tabs; the sprite DDPM and its generator for the Generate tab). Denoising takes
    the context `denoise --input` uses (blind DIP settings, plug-in DIP for blind TDPM-DIP)."""
    if generator is not None and not Path(generator).is_dir():
        raise UserError(f"--generator {generator}: no such folder")
    folder = resolve_generator(model, generator)
    ctx, shard = load_context(model, device, "auto", defaults.BATCH_SIZE, "blind", dip_preset, task="denoise")
    gen_ctx = (
        ctx
        if model is not None
        else load_context(None, device, "auto", defaults.BATCH_SIZE, "paper", dip_preset, task="generate")[0]
    )
    if folder is not None:  # amortized TDPM (method tdpm) reads it from the context
        gen_ctx.generator = load_generator(folder, gen_ctx.unet, gen_ctx.scheduler, gen_ctx.device)
    return AppModels(
        Denoiser(ctx, shard, model or DENOISER_NAME),
        Generator(gen_ctx, shard, model or DDPM_NAME),
        resolve_model(model, "denoise"),
        folder,
    )


# ------------------------------------------------------------------------------------------ method lists


def denoise_methods() -> list[Method]:
    """The registry's blind denoisers whose extra is installed, best first (the first is the default)."""
    return registry.methods("denoise", "blind", installed_only=True)


def generate_methods() -> list[Method]:
    """The registry's generators that need no reference data."""
    return [m for m in registry.methods("generate", installed_only=True) if "reference" not in m.needs]


def method_label(m: Method) -> str:
    return f"{m.name} (NFE {m.nfe})"


# ------------------------------------------------------------------------------------------ images


def fit_side(x: torch.Tensor, max_side: int, max_pixels: int | None = None) -> tuple[torch.Tensor, str | None]:
    """Downscale [3, H, W] so that its long side is at most `max_side` and its area at most `max_pixels` (Lanczos,
    aspect kept); returns the image and a notice when it was downscaled."""
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / max(h, w), math.sqrt(max_pixels / (h * w)) if max_pixels else 1.0)
    if scale >= 1.0:
        return x, None
    size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    small = Image.fromarray(to_uint8(x)).resize(size, Image.Resampling.LANCZOS)
    over = []  # only the limits the upload passes
    if max(h, w) > max_side:
        over.append(f"{max_side} px")
    if max_pixels and h * w > max_pixels:
        over.append(f"{max_pixels / 1e6:.2g} Mpx")
    return pil_to_tensor(small), (
        f"the upload is {w}x{h} px, over the {' and '.join(over)} limit: denoised at "
        f"{size[0]}x{size[1]} px (downscaling also lowers the noise level)"
    )


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
    """A denoising result: both images as uint8 HWC arrays of the same size (what the page shows), the result as
    the download holds it (the upload's kind: grey stays grey, alpha and 16-bit grey come back), and its cost."""

    image: np.ndarray
    input: np.ndarray
    info: dict
    notices: list[str]
    file: Image.Image | None = None


def _read_pair(
    noisy: ImageInput, clean: ImageInput | None, max_side: int, max_pixels: int
) -> tuple[torch.Tensor, ImageKind, torch.Tensor | None, str | None]:
    """(the upload within the page's size budget, its kind, its clean version or None, a notice if it was
    downscaled; a downscaled upload's alpha channel is downscaled with it)."""
    full, kind = read_user_image_kind(noisy, "noisy image", MAX_UPLOAD_PIXELS)
    x, notice = fit_side(full, max_side, max_pixels)
    if notice and kind.alpha is not None:
        size = (x.shape[-1], x.shape[-2])
        kind = dataclasses.replace(
            kind, alpha=np.asarray(Image.fromarray(kind.alpha).resize(size, Image.Resampling.LANCZOS))
        )
    if clean is None:
        return x, kind, None, notice
    ref = fit_side(read_user_image(clean, "clean image", MAX_UPLOAD_PIXELS), max_side, max_pixels)[0]
    if ref.shape != x.shape:
        raise UserError(
            f"the clean image is {ref.shape[-1]}x{ref.shape[-2]} px, the noisy one "
            f"{x.shape[-1]}x{x.shape[-2]} px: they must have the same size"
        )
    return x, kind, ref, notice


def denoise_handler(
    models: AppModels,
    noisy: ImageInput | None,
    method: str | None = None,
    sigma: float | None = None,
    clean: ImageInput | None = None,
    seed: float = 0,
    max_side: int = MAX_SIDE,
    progress: Progress | None = None,
    max_pixels: int = MAX_PIXELS,
    max_seconds: float = MAX_SECONDS,
    alive: Callable[[], bool] | None = None,
) -> Denoised:
    """Blind denoising of one upload at its own size (`api.Denoiser`, as `denoise --input` does), within the
    request's budget: at most `max_pixels` (larger uploads downscaled) and `max_seconds` (checked between tiles);
    `alive() == False` (the visitor left) stops it too (`Cancelled`).

    sigma None: estimated (`observe.blind_sigmas`). `clean`, when given, only scores PSNR/SSIM.
    """
    report = progress or (lambda frac, desc: None)
    names = [m.name for m in denoise_methods()]
    method = method or names[0]
    if method not in names:
        raise UserError(f"unknown denoising method {method!r}; choose {', '.join(names)}")
    if noisy is None:
        raise UserError("upload a noisy image first")
    check_positive("max side", max_side)
    check_sigma(sigma, "sigma")
    seed = check_seed(seed)
    check = budget_check(max_seconds, alive)
    report(0.0, "reading the image")
    x, kind, ref, notice = _read_pair(noisy, clean, max_side, max_pixels)
    report(0.05, "estimating sigma" if sigma is None else "denoising")
    sig = blind_sigmas([x], sigma, "enter its sigma", names=["this image"])
    with models.lock:
        check()  # the wait for the lock counts: a request nobody waits for any more does not start
        # A fresh DIP memo per request: the shared context must not keep every upload's fit alive.
        den = dataclasses.replace(models.denoiser.ctx, dip_memo={}, interrupt=check, progress=False)
        report(0.1, f"denoising with {method}")
        (out,), seconds, nfe = Denoiser(den, models.denoiser.shard).denoise_tensors([x], sig, method, [seed])
    if not torch.isfinite(out).all():
        raise UserError(f"{method} returned non-finite values: this model does not fit the image")
    h, w = x.shape[-2:]
    info: dict = {
        "method": method,
        "seconds": seconds,
        "nfe": int(nfe),
        "sigma": sig[0],
        "sigma_estimated": sigma is None,
        "width": w,
        "height": h,
        "device": str(den.device),
    }
    if ref is not None:
        s = scores(out, ref)
        info.update(psnr=s["PSNR"], ssim=s["SSIM"], input_psnr=float(psnr(x[None], ref[None])))
    report(1.0, "done")
    file = like(out, kind.gray, kind.bits, kind.alpha)
    return Denoised(to_uint8(out), to_uint8(x), info, [notice] if notice else [], file)


def denoise_summary(d: Denoised) -> str:
    """One Markdown line of what was done and what it cost (the page shows it under the result)."""
    i = d.info
    est = " (estimated)" if i["sigma_estimated"] else ""
    text = (
        f"**{i['method']}**: {i['seconds']:.2f} s, NFE {i['nfe']}, sigma {i['sigma']:.1f}{est}, "
        f"{i['width']}x{i['height']} px on {i['device']}"
    )
    if "psnr" in i:
        text += f"; PSNR {i['psnr']:.2f} dB (noisy {i['input_psnr']:.2f} dB), SSIM {i['ssim']:.3f}"
    return "\n\n".join([text] + [f"Note: {n}" for n in d.notices])


# ------------------------------------------------------------------------------------------ restore


def restore_methods(models: AppModels, task: str) -> list[str]:
    """The registry's restorers of `task` (sr | inpaint) that the loaded DDPM can run, best first."""
    return models.restorer().methods(task)


def mask_from_editor(value: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Gradio's image editor value -> (the image, uint8 HWC; the mask, True = known): painted pixels are unknown."""
    if not value or value.get("background") is None:
        raise UserError("upload an image and paint the pixels to fill first")
    bg = np.asarray(value["background"])
    painted = np.zeros(bg.shape[:2], bool)
    for layer in value.get("layers") or []:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[:2] == painted.shape:
            painted |= (a[..., 3] if a.shape[-1] == 4 else a.max(-1)) > 0
    rgb = bg[..., :3] if bg.ndim == 3 else np.repeat(bg[..., None], 3, -1)
    return np.ascontiguousarray(rgb.astype(np.uint8)), ~painted


@dataclass
class Restored:
    """A restoration result: the observation, the output (uint8 HWC) and what it cost."""

    image: np.ndarray
    input: np.ndarray
    info: dict


def restore_handler(
    models: AppModels,
    task: str,
    image: ImageInput | None,
    mask: np.ndarray | None = None,
    scale: int = 4,
    method: str | None = None,
    sigma: float = 0.0,
    seed: int = 0,
    max_pixels: int = defaults.RESTORE_MAX_PIXELS,
    progress: Progress | None = None,
    max_seconds: float = MAX_SECONDS,
    alive: Callable[[], bool] | None = None,
) -> Restored:
    """Super-resolution (task sr) or inpainting (task inpaint, `mask`: True = known) of one upload (`api.Restorer`,
    as `restore --input` does), within the request's `max_seconds` (checked after every DIP and chain step);
    `alive() == False` (the visitor left) stops it too (`Cancelled`)."""
    report = progress or (lambda frac, desc: None)
    if image is None:
        raise UserError("upload an image first")
    if not 0 <= seed < 2**63:
        raise UserError(f"seed must be in 0..2^63 - 1, got {seed}")
    check = budget_check(max_seconds, alive)
    restorer = models.restorer(check)
    names = restorer.methods(task)
    method = method or names[0]
    if method not in names:
        raise UserError(f"unknown method {method!r} for this task; choose {', '.join(names)}")
    x = read_user_image(image, "image")
    f = int(scale) if task == "sr" else 1
    h, w = x.shape[-2:]
    if h * w * f * f > max_pixels:
        raise UserError(f"the result would be {w * f}x{h * f} px, above this page's limit of {max_pixels} pixels")
    report(0.1, f"restoring with {method}")
    with models.lock:
        check()  # the wait for the lock counts: a request nobody waits for any more does not start
        if task == "sr":
            shown = to_uint8(x)
            out = restorer.super_resolve(shown, f, method, sigma, seed)
        else:
            if mask is None:
                raise UserError("paint the pixels to fill first")
            m = torch.from_numpy(mask.astype(np.float32))
            shown = to_uint8(x)
            shown[~mask] = 0  # the unknown pixels, black, as the observation files hold them
            out = restorer.inpaint(to_uint8(x), m[None], method, sigma, seed)
    result = np.asarray(out.images[0])
    report(1.0, "done")
    info = {"method": method, "seconds": out.seconds, "nfe": int(out.nfe), "width": result.shape[1]}
    info |= {"height": result.shape[0], "device": str(restorer.ctx.device), "task": task}
    return Restored(result, shown, info)


def restore_summary(r: Restored) -> str:
    i = r.info
    return f"**{i['method']}**: {i['seconds']:.2f} s, NFE {i['nfe']}, {i['width']}x{i['height']} px on {i['device']}"


# ------------------------------------------------------------------------------------------ generate


@dataclass
class Generated:
    """A grid of generated images (uint8 HWC) and what it cost."""

    grid: np.ndarray
    images: torch.Tensor
    info: dict


def generate_handler(
    models: AppModels,
    method: str | None = None,
    n: int = 4,
    seed: float = 0,
    steps: float | None = None,
    t_trunc: float | None = None,
    progress: Progress | None = None,
    max_seconds: float = MAX_SECONDS,
    alive: Callable[[], bool] | None = None,
) -> Generated:
    """n images of a registry generator from pure noise (image i uses seed SEED+i), as one grid, within the
    request's `max_seconds` (checked after every network call of the chain); `alive() == False` stops it too."""
    report = progress or (lambda frac, desc: None)
    names = [m.name for m in generate_methods()]
    method = method or models.generator.methods[0]
    if method not in names:
        raise UserError(f"unknown generation method {method!r}; choose {', '.join(names)}")
    n = int(n)
    if not 1 <= n <= MAX_N:
        raise UserError(f"n must be in 1..{MAX_N}, got {n}")
    seed = check_seed(seed, n)
    levels = num_levels(models.generator.ctx.scheduler)
    if steps is not None:
        steps = int(steps)
        if not 1 <= steps <= levels:
            raise UserError(f"steps must be in 1..{levels}, got {steps}")
    loaded = models.generator.ctx.generator
    if t_trunc is not None:
        t_trunc = check_t_trunc(models.generator.ctx.scheduler, int(t_trunc))
        if method == "tdpm" and loaded is not None and t_trunc != loaded.t_trunc:
            raise UserError(f"T_trunc {t_trunc} does not match the loaded generator's {loaded.t_trunc}")
    check = budget_check(max_seconds, alive)
    with models.lock:
        check()  # the wait for the lock counts: a request nobody waits for any more does not start
        report(0.0, f"generating {n} images with {method}")
        ctx = dataclasses.replace(models.generator.ctx, interrupt=check, progress=False)
        gen = Generator(ctx, models.generator.shard, models.generator.name)
        res = gen.generate(n, seed, method, ddim_steps=steps, t_trunc=t_trunc).result
    grid = make_grid(res.images, upscale=max(1, 96 // res.images.shape[-1]))  # small model images stay visible
    report(1.0, "done")
    return Generated(
        grid,
        res.images,
        {
            "method": method,
            "n": n,
            "seed": seed,
            "seconds": res.seconds,
            "nfe": res.nfe,
            "device": str(models.generator.ctx.device),
        },
    )


def generate_summary(g: Generated) -> str:
    i = g.info
    return (
        f"**{i['method']}**: {i['n']} images (seeds {i['seed']}..{i['seed'] + i['n'] - 1}), "
        f"{i['seconds']:.2f} s, NFE {i['nfe']} per image on {i['device']}"
    )


# ------------------------------------------------------------------------------------------ examples


def write_examples(
    folder: str | os.PathLike, n: int = 2, size: int = 64, sigma: float = defaults.SIGMA
) -> list[list[str]]:
    """Noisy (sigma on 0..255, 8-bit) procedural sprites and their clean originals, written as PNGs:
    [[noisy path, clean path], ...] for the page's examples. Seeded, so the same every start."""
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

"""The Python API, in the style of diffusers' pipelines: `Denoiser` and `Generator`.

    from tdpm_dip import Denoiser, Generator
    den = Denoiser.from_pretrained()                  # the shipped default model (no download)
    out = den.denoise(Image.open("noisy.png"))        # blind: sigma estimated, the default method
    out.images[0].save("clean.png")                   # the input's size and type
    gen = Generator.from_pretrained()
    gen.generate(16, seed=0).images                   # PIL images

The CLI and the app call these objects too, so a command, a click in the app and a line of Python
run the same code.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageOps

from . import defaults, embedded, registry
from .data import ImageInput, ImageKind, gray_levels, read_user_image_kind
from .embedded import resolve_generator
from .errors import UserError, check_pixels, check_positive, check_sigma
from .generator import load_generator
from .images import like, to_uint8, upscale_alpha
from .methods import Context, Job, Result, run, run_native, run_restore
from .methods.observe import blind_sigmas
from .methods.shard import Shard
from .noise import check_steps, check_t_trunc
from .operators import Downsample, Inpaint, Operator
from .runtime import load_context


@dataclass
class DenoiseOutput:
    """Denoised images (the inputs' sizes, types and kinds: PIL in, PIL out; arrays in, arrays out; grey, alpha and
    16-bit grey as they came) and their cost."""

    images: list
    method: str
    sigma: list[float]  # the noise level used for each image (0..255 scale)
    sigma_estimated: bool
    seconds: float  # compute time for all images
    nfe: float  # network evaluations per image (mean)
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False)  # [3, H, W] in [-1, 1]


@dataclass
class GenerateOutput:
    """Generated images (PIL) and their cost; `result` holds the tensors and the method's details."""

    images: list[Image.Image]
    method: str
    protocol: str
    seconds: float
    nfe: int
    result: Result = field(repr=False)


API_ADVICE = "raise Denoiser.max_pixels to allow it"
# The Job fields each call takes as keyword options (the rest of its Job comes from the call's own arguments).
DENOISE_OPTIONS = ("samples", "ddim_steps", "symmetries", "t_trunc", "declip")
RESTORE_OPTIONS = ("samples", "ddim_steps", "t_trunc")
GENERATE_OPTIONS = ("ddim_steps", "eta", "t_trunc")
# |seed + i| stays below this: room for the offsets that tiles and declip's draws add to an image's seed.
SEED_LIMIT = 2**62


def _is_number(v: object, whole: bool = False) -> bool:
    """A real number (numpy's too), or an integer with `whole`; never a bool."""
    return not isinstance(v, bool) and isinstance(v, numbers.Integral if whole else numbers.Real)


def _checked_call(seed: object, n: int, options: dict, allowed: tuple[str, ...]) -> int:
    """The seed of a call over n images (image i uses seed + i), and its options, checked before any work:
    one-line UserErrors for an unknown option or a seed that is not a whole number in range."""
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; the options are {', '.join(allowed)}")
    if not _is_number(seed, whole=True) or not -SEED_LIMIT <= int(cast(int, seed)) <= SEED_LIMIT - n:
        raise UserError(f"seed must be a whole number from -2^62 to 2^62 - n, got {seed!r}")
    return int(cast(int, seed))


def _sigmas(sigma: object, n: int) -> float | list[float] | None:
    """`sigma` as one number (or None: estimate) or one per image, each in (0, 255]; a one-line UserError
    otherwise (a string is not split into characters)."""
    if sigma is None:
        return None
    if _is_number(sigma):
        check_sigma(float(cast(float, sigma)), "sigma")
        return float(cast(float, sigma))
    if isinstance(sigma, (str, bytes)) or not isinstance(sigma, (Sequence, np.ndarray)):
        raise UserError(f"sigma must be a number, or one number per image, got {sigma!r}")
    values = []
    for v in sigma:
        if not _is_number(v):
            raise UserError(f"sigma must be a number, or one number per image, got {v!r} among them")
        check_sigma(float(v), "sigma")
        values.append(float(v))
    if len(values) != n:
        raise UserError(f"{len(values)} sigmas for {n} images: give one, or one per image")
    return values


def _like(x: torch.Tensor, given: object, kind: ImageKind) -> object:
    """The output in the type and kind of its input: PIL for PIL or a path, an array for an array; grey stays grey
    (one channel), an alpha channel comes back unchanged, 16-bit grey stays 16-bit (`images.like`)."""
    img = like(x, kind.gray, kind.bits, kind.alpha)
    if not isinstance(given, np.ndarray):
        return img
    a = np.asarray(img)
    return a[..., None] if given.ndim == 3 and a.ndim == 2 else a  # (H, W, 1) in, (H, W, 1) out


class Denoiser:
    """Blind denoising with a DDPM prior: only the noisy image (and, if known, its noise level) is used."""

    def __init__(
        self, ctx: Context, shard: Shard | None = None, name: str = "", max_pixels: int = defaults.MAX_PIXELS
    ) -> None:
        self.ctx, self.shard, self.name = ctx, shard, name
        self.max_pixels = max_pixels  # larger images are refused before any work (`check_pixels`)
        self.tile: int | None = None  # side of the tiles of large images; None: `methods.dispatch.tile_side`

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = defaults.BATCH_SIZE,
        dip_preset: str = "auto",
        dip_iters: int | None = None,
        dip_lr: float | None = None,
        progress: bool = False,
    ) -> Denoiser:
        """A DDPM folder or hub id, or None for the denoiser shipped in the package (no download): a 64 px
        Pokemon DDPM fine-tuned on the noise levels of 8-bit files (`embedded`)."""
        ctx, shard = load_context(
            model, device, dtype, batch_size, "blind", dip_preset, dip_iters, dip_lr, progress, task="denoise"
        )
        return cls(ctx, shard, model or embedded.DENOISER_NAME)

    @property
    def methods(self) -> list[str]:
        """The blind methods that can run here, best first (the first is the default)."""
        return [m.name for m in registry.methods("denoise", "blind", installed_only=True)]

    def denoise(
        self,
        images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        sigma: float | Sequence[float] | None = None,
        method: str | None = None,
        seed: int = 0,
        **options: object,
    ) -> DenoiseOutput:
        """Denoise one image or a list (paths, PIL images or uint8 arrays), each at its own size.

        sigma: the noise std on the 0..255 scale (one for all, or one per image); None estimates it per image.
        Image i uses seed SEED + i. `options` are Job fields: samples, ddim_steps, symmetries, t_trunc, declip.
        """
        given = list(images) if isinstance(images, (list, tuple)) else [images]
        seed = _checked_call(seed, len(given), options, DENOISE_OPTIONS)
        wanted = _sigmas(sigma, len(given))
        read = [read_user_image_kind(im, f"image {i}", self.max_pixels, API_ADVICE) for i, im in enumerate(given)]
        x = [t for t, _ in read]
        sig = wanted if isinstance(wanted, list) else blind_sigmas(x, wanted, "give sigma")
        out, seconds, nfe = self.denoise_tensors(x, sig, method, list(range(seed, seed + len(x))), **options)
        return DenoiseOutput(
            [_like(o, g, k) for o, g, (_, k) in zip(out, given, read)],
            method or self.methods[0],
            sig,
            sigma is None,
            seconds,
            nfe,
            out,
        )

    def run(self, job: Job, method: str, protocol: str = "blind") -> Result:
        """One denoising method on one job: the path of `denoise_tensors`, of the CLI's `--input` and `--clean`
        runs and of the app. Blind jobs run at the images' own size (`methods.run_native`: padded, or in tiles
        beyond the tile side); paper jobs (the report's oracle protocol, which needs `job.clean`) at the model's
        size."""
        if protocol == "blind":
            return run_native(self.ctx, method, job, self.shard, self.tile)
        return run(self.ctx, "denoise", protocol, method, job, self.shard)

    def denoise_tensors(
        self, images: list[torch.Tensor], sigmas: list[float], method: str | None, seeds: list[int], **options: object
    ) -> tuple[list[torch.Tensor], float, float]:
        """[3, H, W] tensors in [-1, 1] of any sizes -> (denoised tensors, seconds, mean NFE per image).

        Images of one size run together (`methods.run_native`), each with its own seed and sigma."""
        name = method or self.methods[0]
        registry.get("denoise", "blind", name)  # an unknown method fails before any work
        for i, x in enumerate(images):
            check_pixels(x.shape[-1], x.shape[-2], self.max_pixels, f"image {i}", API_ADVICE)
        outputs: list[torch.Tensor | None] = [None] * len(images)
        seconds = nfe = 0.0
        sizes = [tuple(x.shape[-2:]) for x in images]
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            job = Job(
                tuple(seeds[i] for i in idx),
                noisy=torch.stack([images[i] for i in idx]),
                sigma=tuple(sigmas[i] for i in idx),
                **options,  # type: ignore[arg-type]
            )
            res = self.run(job, name)
            for k, i in enumerate(idx):
                outputs[i] = res.images[k]
            seconds += res.seconds
            nfe += res.nfe * len(idx)
        return outputs, seconds, nfe / max(1, len(images))  # type: ignore[return-value]


class Generator:
    """Image generation with a DDPM: DDPM / DDIM from noise, amortized TDPM (G_psi + the DDPM's reverse steps from
    T_trunc), TDPM-DIP."""

    def __init__(self, ctx: Context, shard: Shard | None = None, name: str = "") -> None:
        self.ctx, self.shard, self.name = ctx, shard, name

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        generator: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = defaults.BATCH_SIZE,
        dip_preset: str = "auto",
        dip_iters: int | None = None,
        dip_lr: float | None = None,
        progress: bool = False,
    ) -> Generator:
        """A DDPM (None: the shipped one) and, for amortized TDPM, a generator folder of `train-generator`
        (None with the shipped DDPM: the shipped generator)."""
        folder = resolve_generator(model, generator)
        ctx, shard = load_context(model, device, dtype, batch_size, "paper", dip_preset, dip_iters, dip_lr, progress)
        if folder is not None:
            ctx.generator = load_generator(folder, ctx.unet, ctx.scheduler, ctx.device)
        return cls(ctx, shard, model or embedded.DDPM_NAME)

    @property
    def methods(self) -> list[str]:
        """The generation methods that can run with what is loaded, best first (the first is the default)."""
        return [m.name for m in registry.methods("generate") if set(m.needs) - {"reference"} <= self.ctx.provides]

    def generate(
        self,
        n: int = defaults.N_GENERATE,
        seed: int = 0,
        method: str | None = None,
        reference: torch.Tensor | None = None,
        **options: object,
    ) -> GenerateOutput:
        """n new images (image i uses seed SEED + i). `options` are Job fields: ddim_steps, eta, t_trunc.
        TDPM-DIP (paper protocol) reconstructs `reference` images instead."""
        if not _is_number(n, whole=True):
            raise UserError(f"n must be a whole number, got {n!r}")
        check_positive("n", n)
        seed = _checked_call(seed, n, options, GENERATE_OPTIONS)
        name = method or self.methods[0]
        m = registry.find("generate", name)
        if "generator" in m.needs and self.ctx.generator is None:
            raise UserError(f"method {name} needs {registry.NEED_TEXT['generator']}")
        if options.get("t_trunc") is not None:  # options are Job fields: t_trunc is an int or None
            check_t_trunc(self.ctx.scheduler, int(cast(int, options["t_trunc"])))
        steps = options.get("ddim_steps")
        if steps is not None:
            if not _is_number(steps, whole=True):
                raise UserError(f"ddim_steps must be a whole number, got {steps!r}")
            check_steps(self.ctx.scheduler, int(cast(int, steps)), "ddim_steps")
        eta = options.get("eta")
        if eta is not None and not (_is_number(eta) and 0 <= float(cast(float, eta)) <= 1):
            raise UserError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta!r}")
        t_trunc = options.get("t_trunc")
        if t_trunc is not None and not _is_number(t_trunc, whole=True):
            raise UserError(f"t_trunc must be a whole number, got {t_trunc!r}")
        if reference is not None and not isinstance(reference, torch.Tensor):
            raise UserError(f"reference must be a tensor [N, 3, H, W] in [-1, 1], got {type(reference).__name__}")
        job = Job(tuple(range(seed, seed + n)), reference=reference, **options)  # type: ignore[arg-type]
        res = run(self.ctx, "generate", m.protocol, name, job, self.shard)
        return GenerateOutput(
            [Image.fromarray(a) for a in to_uint8(res.images)], name, res.protocol, res.seconds, res.nfe, res
        )


@dataclass
class RestoreOutput:
    """Restored images (PIL in, PIL out; arrays in, uint8 arrays out), the masks used, and their cost."""

    images: list
    method: str
    seconds: float  # compute time for all images
    nfe: float  # network evaluations per image (mean; a DIP iteration counts as one)
    tensors: list[torch.Tensor] = field(default_factory=list, repr=False)  # [3, H, W] in [-1, 1]


def read_mask(mask: ImageInput | torch.Tensor, size: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """A mask (white = known) -> [1, H, W] of 0 / 1 at `size` (H, W): levels split at 50 % of the file's range (8 or
    16 bits; float arrays and tensors: 0..1), EXIF-upright as images are; a mask with transparent pixels is refused
    (which side they mean is a guess); a mask of another size is resized with nearest-neighbour, with a warning."""
    if isinstance(mask, torch.Tensor):
        m = mask.float().reshape(-1, *mask.shape[-2:])[:1]
    else:
        if isinstance(mask, (str, os.PathLike)):
            path = Path(mask)
            if not path.is_file():
                raise UserError(f"{what}: no such file: {path.name}")
            try:
                with Image.open(path) as im:
                    im.load()
                    mask = ImageOps.exif_transpose(im)
            except (OSError, ValueError, Image.DecompressionBombError):
                raise UserError(f"{what} {path.name}: not a readable image") from None
        elif isinstance(mask, Image.Image):
            mask = ImageOps.exif_transpose(mask)
        m = torch.from_numpy(_mask_levels(mask, what))[None]
    if tuple(m.shape[-2:]) != size:
        warnings.warn(
            f"{what} is {m.shape[-1]}x{m.shape[-2]} px, the image {size[1]}x{size[0]}: resized (nearest)", stacklevel=2
        )
        m = torch.nn.functional.interpolate(m[None], size=size, mode="nearest")[0]
    return (m >= 0.5).float()


def _mask_levels(mask: object, what: str) -> np.ndarray:
    """A mask image or array as [H, W] float32 levels in 0..1 (1 = known)."""
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in mask.info:
            alpha = np.asarray(mask.convert("RGBA"))[..., 3]
            if (alpha < 255).any():
                raise UserError(f"{what}: has transparent pixels; save it without transparency (white = known)")
        try:
            gray = gray_levels(mask)  # 16-bit, 32-bit and float masks, on the range images of that mode are read on
        except ValueError as e:
            raise UserError(f"{what}: {e}") from None
        if gray is not None:
            return gray[0].astype(np.float32)
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if not isinstance(mask, np.ndarray):
        raise UserError(f"{what}: not an image ({type(mask).__name__})")
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] > 4):
        raise UserError(f"{what}: expected an array (H, W) or (H, W, C) with C <= 4, got shape {mask.shape}")
    a = np.asarray(mask)
    top = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(a.dtype, 1.0)
    a = a.astype(np.float64) / top
    if a.ndim == 3:
        if a.shape[2] in (2, 4) and (a[..., -1] < 1).any():
            raise UserError(f"{what}: has transparent pixels; give it without an alpha channel (1 = known)")
        a = a[..., : 3 if a.shape[2] >= 3 else 1].mean(-1)
    return a.astype(np.float32)


def warn_mask_coverage(mask: torch.Tensor, name: str) -> None:
    """A warning for a mask that leaves nothing to fill (the output is the input) or constrains nothing."""
    if bool(mask.all()):
        warnings.warn(f"{name}: the mask marks every pixel known; the output is the input", stacklevel=2)
    elif not bool(mask.any()):
        warnings.warn(
            f"{name}: the mask marks every pixel unknown: nothing constrains the output (the classical start is "
            "flat grey)",
            stacklevel=2,
        )


class Restorer:
    """Super-resolution and inpainting with a DDPM prior (blind: only the observation, its operator and its noise)."""

    def __init__(
        self, ctx: Context, shard: Shard | None = None, name: str = "", max_pixels: int = defaults.RESTORE_MAX_PIXELS
    ) -> None:
        self.ctx, self.shard, self.name = ctx, shard, name
        self.max_pixels = max_pixels  # larger restored images are refused before any work (the cost grows with them)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = defaults.BATCH_SIZE,
        dip_preset: str = "auto",
        dip_iters: int | None = None,
        dip_lr: float | None = None,
        progress: bool = False,
    ) -> Restorer:
        """A DDPM folder or hub id, or None for the 64 px Pokemon DDPM shipped in the package (no download)."""
        ctx, shard = load_context(
            model, device, dtype, batch_size, "restore", dip_preset, dip_iters, dip_lr, progress, task="denoise"
        )
        return cls(ctx, shard, model or embedded.DENOISER_NAME)

    def methods(self, operator: str) -> list[str]:
        """The methods that restore `operator` (sr | inpaint) with this DDPM, best first (the first is the default)."""
        return [
            m.name
            for m in registry.methods("restore", "blind", installed_only=True, operator=operator)
            if set(m.needs) <= self.ctx.provides
        ]

    def super_resolve(
        self,
        images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        scale: int = 4,
        method: str | None = None,
        sigma: float = 0.0,
        seed: int = 0,
        **options: object,
    ) -> RestoreOutput:
        """Upscale low-resolution images (paths, PIL images or uint8 arrays) by `scale` (2 or 4); sigma: their noise
        std on the 0..255 scale. Image i uses seed SEED + i. `options` are Job fields: samples, ddim_steps, t_trunc."""
        given = list(images) if isinstance(images, (list, tuple)) else [images]
        read = [read_user_image_kind(im, f"image {i}") for i, im in enumerate(given)]
        y = [x for x, _ in read]
        kinds = [dataclasses.replace(k, alpha=upscale_alpha(k.alpha, scale)) for _, k in read]
        ops: list[Operator] = [Downsample(scale, x.shape[-2] * scale, x.shape[-1] * scale) for x in y]
        return self._output(given, kinds, y, ops, "sr", method, sigma, seed, options)

    def inpaint(
        self,
        images: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        masks: ImageInput | torch.Tensor | list,
        method: str | None = None,
        sigma: float = 0.0,
        seed: int = 0,
        **options: object,
    ) -> RestoreOutput:
        """Fill the unknown pixels of images; masks: one for all or one per image, white (1) = known."""
        given = list(images) if isinstance(images, (list, tuple)) else [images]
        read = [read_user_image_kind(im, f"image {i}") for i, im in enumerate(given)]
        x = [im for im, _ in read]
        mk = list(masks) if isinstance(masks, (list, tuple)) else [masks] * len(x)
        if len(mk) != len(x):
            raise UserError(f"{len(mk)} masks for {len(x)} images: give one, or one per image")
        read_masks = [read_mask(m, (im.shape[-2], im.shape[-1]), f"mask {i}") for i, (m, im) in enumerate(zip(mk, x))]
        for i, m in enumerate(read_masks):
            warn_mask_coverage(m, f"image {i}")
        ops: list[Operator] = [Inpaint(m[None]) for m in read_masks]
        y = [op.A(im[None])[0] for op, im in zip(ops, x)]
        return self._output(given, [k for _, k in read], y, ops, "inpaint", method, sigma, seed, options)

    def _output(
        self,
        given: list,
        kinds: list[ImageKind],
        y: list[torch.Tensor],
        ops: list[Operator],
        operator: str,
        method: str | None,
        sigma: float,
        seed: int,
        options: dict,
    ) -> RestoreOutput:
        name = method or self.methods(operator)[0]
        seed = _checked_call(seed, len(y), options, RESTORE_OPTIONS)
        out, seconds, nfe = self.restore_tensors(y, ops, name, list(range(seed, seed + len(y))), sigma, **options)
        return RestoreOutput([_like(o, g, k) for o, g, k in zip(out, given, kinds)], name, seconds, nfe, out)

    def restore_tensors(
        self,
        observed: list[torch.Tensor],
        operators: list[Operator],
        method: str,
        seeds: list[int],
        sigma: float = 0.0,
        **options: object,
    ) -> tuple[list[torch.Tensor], float, float]:
        """Observations [3, h, w] in [-1, 1] and their operators -> (restored tensors, seconds, mean NFE per image).

        Images of one size and operator kind run together (`methods.run_restore`), each with its own seed; a
        restored image above `max_pixels` is refused before any work."""
        if not observed:
            return [], 0.0, 0.0
        if not _is_number(sigma):
            raise UserError(f"sigma must be a number, got {sigma!r}")
        for i, (x, o) in enumerate(zip(observed, operators)):
            h, w = o.out_size(*x.shape[-2:])
            if h * w > self.max_pixels:
                raise UserError(
                    f"image {i}: the restored image would be {w}x{h} px, above the limit of {self.max_pixels} pixels "
                    "(raise Restorer.max_pixels to allow it; the cost grows with the pixels)"
                )
        if not 0 <= sigma <= 255:
            raise UserError(f"sigma must be in [0, 255] (noise std on the 0..255 scale), got {sigma}")
        if not all(isinstance(o, (Downsample, Inpaint)) for o in operators):
            raise UserError(
                "Restorer restores super-resolution (Downsample) and inpainting (Inpaint) operators; run another "
                "operator through methods.run_restore(ctx, method, Job(seeds, observed=y, operator=op))"
            )
        kind = "sr" if isinstance(operators[0], Downsample) else "inpaint"
        entry = registry.get("restore", "blind", method)  # an unknown method fails before any work
        if kind not in entry.operators:
            raise UserError(f"method {method} does not restore {kind}; choose {', '.join(self.methods(kind))}")
        outputs: list[torch.Tensor | None] = [None] * len(observed)
        seconds = nfe = 0.0
        keys = [(tuple(x.shape[-2:]), op.out_size(*x.shape[-2:])) for x, op in zip(observed, operators)]
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            group = [operators[i] for i in idx]
            op = group[0] if kind == "sr" else Inpaint(torch.cat([g.mask for g in group]))  # type: ignore[attr-defined]
            job = Job(
                tuple(seeds[i] for i in idx),
                observed=torch.stack([observed[i] for i in idx]).to(self.ctx.device),
                operator=op.to(self.ctx.device),
                sigma=(float(sigma),),
                **options,  # type: ignore[arg-type]
            )
            res = run_restore(self.ctx, method, job, self.shard)
            for k, i in enumerate(idx):
                outputs[i] = res.images[k]
            seconds += res.seconds
            nfe += res.nfe * len(idx)
        return outputs, seconds, nfe / max(1, len(observed))  # type: ignore[return-value]


__all__ = ["DenoiseOutput", "Denoiser", "GenerateOutput", "Generator", "RestoreOutput", "Restorer", "read_mask"]

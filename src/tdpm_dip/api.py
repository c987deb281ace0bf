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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from PIL import Image

from . import defaults, embedded, registry
from .data import ImageInput, ImageKind, read_user_image_kind
from .embedded import resolve_generator
from .errors import UserError, check_pixels, check_positive, check_sigma
from .generator import load_generator
from .images import like, to_uint8
from .methods import Context, Job, Result, run, run_native
from .methods.observe import blind_sigmas
from .methods.shard import Shard
from .noise import check_t_trunc
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


def _like(x: torch.Tensor, given: object, kind: ImageKind) -> object:
    """The output in the type and kind of its input: PIL for PIL or a path, an array for an array; grey stays grey
    (one channel), an alpha channel comes back unchanged, 16-bit grey stays 16-bit (`images.like`)."""
    img = like(x, kind.gray, kind.bits, kind.alpha)
    return np.asarray(img) if isinstance(given, np.ndarray) else img


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
        read = [read_user_image_kind(im, f"image {i}", self.max_pixels, API_ADVICE) for i, im in enumerate(given)]
        x = [t for t, _ in read]
        if sigma is None or isinstance(sigma, (int, float)):
            sig = blind_sigmas(x, sigma)
        else:
            sig = [float(v) for v in sigma]
            for v in sig:
                check_sigma(v, "sigma")
            if len(sig) != len(x):
                raise UserError(f"{len(sig)} sigmas for {len(x)} images: give one, or one per image")
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
            res = run_native(self.ctx, name, job, self.shard, self.tile)
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
        check_positive("n", n)
        name = method or self.methods[0]
        m = registry.find("generate", name)
        if "generator" in m.needs and self.ctx.generator is None:
            raise UserError("method tdpm needs a generator (--generator, made by `tdpm-dip train-generator`)")
        if options.get("t_trunc") is not None:  # options are Job fields: t_trunc is an int or None
            check_t_trunc(self.ctx.scheduler, int(cast(int, options["t_trunc"])))
        job = Job(tuple(range(seed, seed + n)), reference=reference, **options)  # type: ignore[arg-type]
        res = run(self.ctx, "generate", m.protocol, name, job, self.shard)
        return GenerateOutput(
            [Image.fromarray(a) for a in to_uint8(res.images)], name, res.protocol, res.seconds, res.nfe, res
        )


__all__ = ["DenoiseOutput", "Denoiser", "GenerateOutput", "Generator"]

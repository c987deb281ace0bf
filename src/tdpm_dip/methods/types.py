"""What a method is given (Context, Job) and what it returns (Result)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .. import defaults
from ..dip import DIPConfig, DIPResult, dip_defaults
from ..generator import TDPMGenerator
from ..operators import Operator
from ..sampling import EpsModel

_T = TypeVar("_T")


@dataclass
class Context:
    """What every method needs: the DDPM, its scheduler, the DIP settings, where and how to compute."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    dip: DIPConfig = field(default_factory=DIPConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    batch_size: int = defaults.BATCH_SIZE
    progress: bool = False
    # One DIP fit per image per command: contexts made with dataclasses.replace share this dict, so
    # rows that fit the same DIP (paper dip and T_trunc = 0, a blind dip row under two schedules) fit it once.
    dip_memo: dict | None = field(default_factory=dict)
    # The blind TDPM-DIP's DIP (target built from the blind estimate); None: the "plugin" defaults
    # of ctx.dip's preset (defaults.DIP).
    dip_plugin: DIPConfig | None = None
    # Amortized TDPM's generator G_psi (generator.load_generator), for the DDPM above; None: not loaded.
    generator: TDPMGenerator | None = None
    # The restoration network shipped beside the DDPM (restoration_net: the feed-forward start of CCDF); None: none.
    restorer: UNet2DModel | None = None
    # The noise levels (lo, hi) the DDPM was trained on (models.trained_levels); None: all of them.
    levels: tuple[int, int] | None = None
    # Called between the tiles of a large image (and the batches of a --input run): raises to stop the work, e.g.
    # the app's time budget or a visitor who left. None: nothing to check (Ctrl-C needs no check).
    interrupt: Callable[[], None] | None = None

    @property
    def model(self) -> EpsModel:
        """The DDPM as a noise predictor at noise levels (what the samplers take)."""
        return EpsModel(self.unet, self.scheduler, self.amp_dtype)

    @property
    def provides(self) -> set[str]:
        """The registry's method needs (registry.NEEDS) that this context meets, "reference" aside."""
        met = set()
        if self.generator is not None:
            met.add("generator")
        if self.restorer is not None:
            met.add("restorer")
        if self.levels is None or self.levels[1] >= int(self.scheduler.config.num_train_timesteps):
            met.add("all-levels")
        return met

    @property
    def plugin_dip(self) -> DIPConfig:
        return self.dip_plugin or dip_defaults("plugin", self.dip.preset)


@dataclass(frozen=True)
class Job:
    """What a method is asked to do. Image i uses seeds[i] only, whatever the batch.

    noisy      blind denoising: the observation y in [-1, 1] (an 8-bit file, or float noise).
    sigma      blind denoising: per-image noise std on the 0..255 scale (one value: all images).
    clean      paper denoising: the clean images (the oracle); blind: only scores the DIP curves.
    reference  generation under the paper protocol: the images the DIP reconstructs.
    observed   restoration: the observation y = A x0 (+ n) of `operator` (sigma: its noise, 0..255 scale).
    """

    seeds: tuple[int, ...]
    noisy: torch.Tensor | None = None
    sigma: tuple[float, ...] = ()
    clean: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    t_noisy: int = defaults.T_NOISY  # paper denoising: level of the noisy images
    t_trunc: int | None = None  # TDPM: None = the method's default (paper 10, blind automatic)
    samples: int = defaults.SAMPLES  # chains (or posterior samples) averaged per image
    ddim_steps: int | None = None  # ddim: network evaluations (None: the method's default)
    eta: float = 0.0  # ddim: 0 deterministic, 1 ancestral
    symmetries: int | None = None  # ensemble: symmetries averaged, 1..8 (None: by image size, ensemble_size)
    declip: bool = True  # blind: clipping-aware observation model (observe.declip)
    observed: torch.Tensor | None = None
    operator: Operator | None = None

    def part(self, idx: slice) -> Job:
        """Images idx of this job, with their own seeds (and their own sigma when there is one per image)."""

        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx]

        n = len(self.seeds)
        sigma = self.sigma[idx] if len(self.sigma) == n and n > 1 else self.sigma
        return dataclasses.replace(
            self,
            seeds=self.seeds[idx],
            noisy=cut(self.noisy),
            clean=cut(self.clean),
            reference=cut(self.reference),
            sigma=sigma,
            observed=cut(self.observed),
            operator=None if self.operator is None else self.operator.part(idx),
        )


@dataclass
class Result:
    """Images of one method on a set of images, with cost accounting.

    reverse_steps: steps as the report counts them (DIP iterations + chain steps); nfe: network evaluations
    per image (a DIP iteration is one forward + one backward of G_psi, counted as 1).
    """

    method: str
    protocol: str
    images: torch.Tensor
    seconds: float
    reverse_steps: int
    nfe: int
    inputs: torch.Tensor | None = None
    dip: DIPResult | None = None
    info: dict = field(default_factory=dict)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.images.shape[0])


def _merge_info(parts: list[tuple[int, dict]]) -> dict:
    """One info dict for consecutive parts: tensors are joined; a value that is one per image (a list
    as long as the part) or one per part becomes one per image, and one value again if all are equal
    (the single-process convention of blind.one_or_each)."""
    out: dict = {}
    for key in parts[0][1]:
        vals = [(n, d[key]) for n, d in parts]
        if isinstance(vals[0][1], torch.Tensor):
            out[key] = torch.cat([v for _, v in vals])
            continue
        per_image = [x for n, v in vals for x in (v if isinstance(v, list) and len(v) == n else [v] * n)]
        all_scalar = not any(isinstance(v, list) for _, v in vals)
        out[key] = per_image[0] if all_scalar and all(x == per_image[0] for x in per_image) else per_image
    return out


def _present(values: list[_T | None]) -> list[_T]:
    """values, none of them None: the parts of one job all have a value (dip, inputs) when the first has."""
    out = [v for v in values if v is not None]
    assert len(out) == len(values), "the parts of a job differ in what they return"
    return out


def concat_results(parts: list[Result]) -> Result:
    """One Result for consecutive parts of a job, in their order.

    images / inputs / the DIP's outputs and curves are joined along the image axis; `seconds` is the
    sum of the parts' compute times (so s/img stays the cost of one image on one device, not the wall
    time); `steps` and `nfe`, per image, are the largest of the parts (the single-process convention:
    max over the images).
    """
    first = parts[0]
    seconds = sum(p.seconds for p in parts)
    dip = None if first.dip is None else DIPResult.concat(_present([p.dip for p in parts]))
    inputs = None if first.inputs is None else torch.cat(_present([p.inputs for p in parts]))
    info = _merge_info([(int(p.images.shape[0]), p.info) for p in parts])
    return Result(
        first.method,
        first.protocol,
        torch.cat([p.images for p in parts]),
        seconds,
        max(p.reverse_steps for p in parts),
        max(p.nfe for p in parts),
        inputs,
        dip,
        info,
    )

"""Shorthands the tests use to run one registry method (imported as a plain module: pytest puts tests/ on
sys.path). Each builds the method's Job and calls the one dispatch, `methods.run`."""

from __future__ import annotations

import torch

from tdpm_dip import registry
from tdpm_dip.methods import Context, Job, Result, run


def denoise_blind(ctx: Context, noisy: torch.Tensor, method: str, seeds: list[int], sigma: float | list[float],
                  **options: object) -> Result:
    sig = (float(sigma),) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    return run(ctx, "denoise", "blind", method, Job(tuple(seeds), noisy=noisy, sigma=sig, **options))


def denoise_paper(ctx: Context, clean: torch.Tensor, method: str, seeds: list[int], **options: object) -> Result:
    return run(ctx, "denoise", "paper", method, Job(tuple(seeds), clean=clean, **options))


def generate(ctx: Context, method: str, seeds: list[int], **options: object) -> Result:
    return run(ctx, "generate", registry.find("generate", method).protocol, method, Job(tuple(seeds), **options))

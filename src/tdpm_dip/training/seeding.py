"""Randomness of a training run as a pure function of (seed, step): no global RNG is involved, so a resumed run
repeats an uninterrupted one and the global batch does not depend on the number of processes."""

from __future__ import annotations

import functools

import numpy as np
import torch


def derive_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for draw `index` of a named stream; independent streams, no global RNG involved."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    a, b = np.random.SeedSequence([seed, tag, index]).generate_state(2)
    return (int(a) << 31) ^ int(b)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))


def batch_indices(step: int, n_images: int, batch_size: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of 0-based step `step` (Algorithm 1 line 2, x0 ~ q(x0)).

    Each epoch is a fresh permutation seeded by (seed, epoch) and cut into n_images // batch_size
    batches (the remainder is dropped, so every batch has the same size); nothing to checkpoint.
    """
    per_epoch = n_images // batch_size
    epoch, pos = divmod(step, per_epoch)
    return _epoch_permutation(seed, epoch, n_images)[pos * batch_size : (pos + 1) * batch_size]

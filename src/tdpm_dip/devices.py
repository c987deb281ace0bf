"""Device helpers shared by the compute modules (which device and dtype to use is decided at the edges: runtime.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on `device`, or nothing for fp32 (dtype None or float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (CUDA is asynchronous: a timer without this measures launches)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timer(device: torch.device | str) -> Iterator[list[float]]:
    """Wall time of the block, synchronised on `device`; read it from the yielded box after the block."""
    box = [0.0]
    synchronize(device)
    t0 = time.perf_counter()
    yield box
    synchronize(device)
    box[0] = time.perf_counter() - t0

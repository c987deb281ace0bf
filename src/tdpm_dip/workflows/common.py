"""What the commands' options share: the DIP, the device and dtype, batching, seeds, the output folder."""

from __future__ import annotations

from dataclasses import dataclass

from .. import defaults


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options every computing command takes (the CLI documents each one)."""

    dip_preset: str = "auto"  # auto: the report's DIP on a GPU, dip-small on a CPU
    dip_iters: int | None = None  # None: defaults.DIP of the protocol
    dip_lr: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = defaults.BATCH_SIZE
    seed: int = 0
    overwrite: bool = False

"""Per-image work split over the processes of `accelerate launch` or `torchrun` (data parallel).

Image i depends only on seed i (`noise.image_generators`; every method draws per image), so the
images of one call can go to any process. A process owns whole batches of `--batch-size` images,
the same batches a single process forms ([0, B), [B, 2B), ...), contiguous and balanced over the
processes, and runs the method once per batch. A batch therefore sees the same operations as in a
single-process run, and its outputs are the same bit for bit on the same device type (one
exception: methods that regroup a batch by noise level -- per-image sigma, blind TDPM-DIP's
automatic start level -- form their groups within the batch, so they agree to float rounding, as the
batch-size tests in tests/test_blind.py allow). The batches' results are gathered on every process
in index order (`accelerate.utils.gather_object`); only the main process (rank 0) writes files and
draws the progress bar, which counts the images finished by all processes.

Nothing here runs, or imports accelerate, unless a launcher started several processes: a plain
`tdpm-dip` command is unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import UserError
from .types import Context, Job, Result, concat_results

_CALLS = itertools.count()  # every process makes the same calls in the same order: one progress key per call


def launched() -> bool:
    """Started by a launcher with several processes (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0, or no launcher: the process that writes outputs and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def images_per_step(batch_size: int, shard: Shard | None) -> int:
    """Images that one step of a run over batches takes at once: a batch per process."""
    return batch_size * (shard.world if shard is not None else 1)


def owned_batches(n: int, batch_size: int, rank: int, world: int) -> list[range]:
    """The batches of images 0..n-1 that process `rank` of `world` runs: whole batches of `batch_size`
    (as one process would form them), contiguous, the first n_batches % world processes one more."""
    n_batches = -(-n // batch_size)
    q, r = divmod(n_batches, world)
    lo = rank * q + min(rank, r)
    hi = lo + q + (1 if rank < r else 0)
    return [range(b * batch_size, min(n, (b + 1) * batch_size)) for b in range(lo, hi)]


def _cpu(x: Any) -> Any:
    """A copy with every tensor on the CPU: gathered objects are pickled, and a CUDA tensor would be
    unpickled on the sender's GPU index."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _cpu(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init})
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


class _TotalBar:
    """The main process's bar over the images of all processes: each process adds its finished images
    to a counter in the process group's key-value store (no collective, so no process waits)."""

    def __init__(self, total: int, desc: str, main: bool) -> None:
        self.key = f"tdpm_dip/progress/{next(_CALLS)}"
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):  # no store: the bar counts this process only
            self.store = None
        self.bar = None
        if main:
            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False)

    def add(self, k: int) -> None:
        done = self.store.add(self.key, k) if self.store is not None else None
        if self.bar is not None:
            self.bar.n = done if done is not None else self.bar.n + k
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.close()


@dataclass
class Shard:
    """This process's place among the launched ones (accelerate's `PartialState`)."""

    rank: int
    world: int

    @classmethod
    def start(cls, device: torch.device) -> tuple[Shard, torch.device]:
        """Join the launched processes; returns the shard and this process's device (accelerate's:
        one GPU per process, or the CPU with the gloo backend when `device` is a CPU)."""
        from accelerate import PartialState  # accelerate loads only under a launcher: plain commands skip it

        if device.type == "cuda" and device.index is not None:
            raise UserError(f"under a launcher each process uses its own GPU: give --device auto or cuda, not {device}")
        state = PartialState(cpu=device.type == "cpu")
        world = int(os.environ["WORLD_SIZE"])
        if state.num_processes != world:
            raise UserError(
                f"the launcher started {world} processes but they did not join one process group "
                f"(accelerate: {state.distributed_type}); on CPUs use --device cpu"
            )
        dev = torch.device("cpu") if state.device.type == "cpu" else state.device
        return cls(state.process_index, state.num_processes), dev

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def run(self, fn: Callable[[Context, Job], Result], ctx: Context, job: Job, desc: str) -> Result:
        """`fn` on this process's batches of `job`; every process returns the whole job's Result."""
        from accelerate.utils import gather_object  # (as in start)

        local = dataclasses.replace(ctx, progress=False)
        bar = _TotalBar(len(job.seeds), f"{desc} ({self.world} processes)", self.is_main and ctx.progress)
        mine = []
        for idx in owned_batches(len(job.seeds), ctx.batch_size, self.rank, self.world):
            mine.append((idx.start, _cpu(fn(local, job.part(slice(idx.start, idx.stop))))))
            bar.add(len(idx))
        parts = gather_object(mine)
        bar.close()
        return concat_results([r for _, r in sorted(parts, key=lambda p: p[0])])

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process (a decision that reads rank 0's files)."""
        from accelerate.utils import broadcast_object_list  # (as in start)

        return broadcast_object_list([obj], from_process=0)[0]

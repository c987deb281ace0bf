"""Run by tests/test_shard.py in each of several launched processes (torchrun): CLI commands through
`tdpm_dip.cli.main`, as `accelerate launch -m tdpm_dip.cli ...` runs them, one after the other.

usage: shard_worker.py GUARDED_DIR COMMANDS_JSON LOG_DIR

- Every process writes LOG_DIR/rank<R>.jsonl, one line per method call it runs: the command, the method
  and the seeds of the images it was given, so the test can check that each image ran exactly once
  (a file per process: lines printed by two processes to one pipe can interleave).
- On every rank but 0, an audit hook makes any file write, folder creation, rename or removal under
  GUARDED_DIR raise: a process that is not the main one must write nothing.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)

GUARDED = os.path.realpath(sys.argv[1])
RANK = int(os.environ.get("RANK", "0"))
LOG = open(os.path.join(sys.argv[3], f"rank{RANK}.jsonl"), "w")
COMMAND = -1
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.replace",
    "os.remove",
    "os.rmdir",
    "os.link",
    "os.symlink",
    "os.truncate",
    "shutil.rmtree",
    "shutil.copyfile",
    "os.chmod",
}


def _guarded(path: object) -> bool:
    if isinstance(path, int):
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except TypeError:
        return False
    return p == GUARDED or p.startswith(GUARDED + os.sep)


def no_writes(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writing and _guarded(path):
            raise PermissionError(f"rank {RANK} wrote {path}")
    elif (
        event in WRITE_EVENTS
        and args
        and any(_guarded(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
    ):
        raise PermissionError(f"rank {RANK}: {event} {args[:2]}")


if RANK != 0:
    sys.addaudithook(no_writes)

from tdpm_dip import registry  # noqa: E402
from tdpm_dip.cli import main  # noqa: E402

_get = registry.get


class Spy:
    """A registry entry whose function logs which images this process was given."""

    def __init__(self, task: str, protocol: str, name: str) -> None:
        self.m, self.key = _get(task, protocol, name), f"{task}/{protocol}/{name}"

    def __getattr__(self, attr: str):
        return getattr(self.m, attr)

    def load(self):
        fn = self.m.load()

        def run(ctx, job):
            LOG.write(json.dumps({"command": COMMAND, "method": self.key, "seeds": list(job.seeds)}) + "\n")
            LOG.flush()
            return fn(ctx, job)

        return run


registry.get = Spy
for COMMAND, argv in enumerate(json.loads(sys.argv[2])):  # noqa: B007 (the Spy reads the global COMMAND)
    main(argv)
LOG.close()

"""What the commands' options share: the DIP, the device and dtype, batching, seeds, the output folder; and what
their per-image runs share: an earlier run to resume, and the line an interrupt leaves."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import defaults
from ..errors import UserError
from ..outputs import reported, staged_dir


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


def finished_earlier(
    out_dir: Path,
    key: dict,
    command: str,
    names: Iterable[str],
    folders: Iterable[str],
    record: str = "metrics.json",
) -> dict[str, dict]:
    """`--resume`: the entries, by name, of the images among `names` that an earlier `command` run in `out_dir`
    finished (its `record` file lists them), with their PNG present in each of `folders`; {} when the folder is
    new or empty. One-line errors: a folder that holds something else (not ours to replace), an unreadable or
    older record, or a run made with other options (`key`: the options that decide results)."""
    path = out_dir / record
    if not path.is_file():
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise UserError(f"--resume: {out_dir} holds no {command} run (no {record}); choose another --out")
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"--resume: {path} is unreadable; start afresh with --overwrite") from None
    if not isinstance(old, dict) or "run" not in old:
        raise UserError(f"--resume: {out_dir} holds no {command} run of this version; start afresh with --overwrite")
    diff = [k for k in key if old["run"].get(k) != key[k]]
    if diff:
        k = diff[0]
        raise UserError(
            f"--resume: {out_dir} was made with {k} {old['run'].get(k)!r}, not {key[k]!r}; give the same options, "
            "or --overwrite to start afresh"
        )
    wanted, folders = set(names), tuple(folders)
    dropped = [
        e.get("name") for e in old.get("images", []) if e.get("status") == "done" and e.get("name") not in wanted
    ]
    if dropped:  # the new run's folder would no longer hold them
        raise UserError(
            f"--resume: {out_dir} holds {len(dropped)} finished image(s) this run would drop ({dropped[0]}"
            + (" ..." if len(dropped) > 1 else "")
            + "): give the same --n and inputs, or another --out"
        )
    return {
        e["name"]: e
        for e in old.get("images", [])
        if e.get("status") == "done"
        and e.get("name") in wanted
        and all((out_dir / f / f"{e['name']}.png").is_file() for f in folders)
    }


def run_status(done: int, n: int, resumable: bool = True) -> str:
    """The `status` in a per-image run's record (metrics.json, result.json) with `done` of `n` images finished."""
    if done == n:
        return "complete"
    return f"interrupted: {done} of {n} images done" + (" (--resume computes the rest)" if resumable else "")


def interrupted_line(done: int, n: int, out_dir: Path, record: str = "metrics.json", resumable: bool = True) -> str:
    """What a per-image run says when Ctrl-C stops it after `done` of `n` images (`record` lists them)."""
    return f"interrupted: {done} of {n} images finished, kept in {out_dir} ({record} marks them)" + (
        "; add --resume to compute the rest" if resumable else ""
    )


class PerImageRun(Protocol):
    """A run of one command over images, computed a batch at a time (restore, generate, denoise --clean)."""

    @property
    def done_count(self) -> int: ...

    def compute(self) -> None: ...

    def write(self, tmp: Path) -> None: ...


def keep_finished(
    run: PerImageRun,
    out_dir: Path,
    n: int,
    echo: Callable[[str], None],
    *,
    resume: bool,
    owned: Iterable[str],
    record: str = "metrics.json",
    resumable: bool = True,
) -> None:
    """Compute `run` and write its outputs into a staged folder that replaces `out_dir` complete. On Ctrl-C the
    finished images are written and swapped in (signals held back) and the interrupt goes on, unless that would
    replace an earlier run (--overwrite of a non-empty folder; with `resume` its images are part of this run):
    then the earlier outputs stay. `owned`: every entry the command can write (its method folders, figures,
    records), replaced or removed whole even where this run writes no such entry (`outputs.staged_dir`).
    `resumable`: the command has --resume, and its interrupt line says so."""
    replaces = not resume and any(out_dir.iterdir())
    interrupted: KeyboardInterrupt | None = None
    try:
        with staged_dir(out_dir, owned) as tmp:
            try:
                run.compute()
            except KeyboardInterrupt as e:
                if replaces:
                    raise  # out of the staged block: the earlier outputs stay
                interrupted = e
            run.write(tmp)
    except KeyboardInterrupt as e:
        echo(f"interrupted: the earlier outputs in {out_dir} are as they were (--overwrite)")
        raise reported(e) from None
    if interrupted is not None:
        echo(interrupted_line(run.done_count, n, out_dir, record, resumable))
        raise reported(interrupted)

"""Where a training run writes (its --out folder) and what --resume and --overwrite do to it.

A new run or --resume writes in --out itself, where every checkpoint is complete once written; --overwrite of an
earlier run builds the new one beside it and swaps it in only when complete (`outputs.staged_dir`), so that an
interrupted or diverged run leaves the earlier one, checkpoints included, as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from accelerate import Accelerator

from ..errors import UserError
from ..outputs import prepare_out_dir, staged_dir, write_json, write_text


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class FolderOptions(Protocol):
    """The options that decide what happens to an existing --out."""

    out: str
    resume: bool
    overwrite: bool


def check_out_dir(out: Path, allow_existing: bool) -> None:
    """Read-only version of prepare_out_dir, for the processes that do not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not allow_existing:
        raise UserError(f"{out}: exists and is not empty (use --resume to continue its run, or --overwrite)")


@contextlib.contextmanager
def _run_folder(cfg: FolderOptions, out: Path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Where the main process writes the run: `out` itself, except for --overwrite of an earlier run.

    That one is built beside it and replaces the earlier run's files (`owned`, whole) only when it is
    complete (`staged_dir`): interrupted or failed, it is discarded and the earlier run, checkpoints
    included, stays as it was; a later --resume continues that one. Other files in `out` are kept. A new
    run or --resume writes in `out`, where every checkpoint is complete once written (--resume restarts
    from the latest)."""
    if not (cfg.overwrite and out.is_dir() and any(out.iterdir())):
        yield out
        return
    with staged_dir(out, owned=owned) as work:
        try:
            yield work
        except TrainingDiverged as e:
            raise TrainingDiverged(
                f"{e} (that checkpoint was in the discarded --overwrite run: {out} still holds the earlier run)"
            ) from None


def _remove_cut_writes(out: Path) -> None:
    """--resume after a kill -9: delete what that process was writing (staged checkpoints or export,
    temporary files); complete files are never named like these."""
    for folder in (out, out / "checkpoints", out / "samples"):
        for p in folder.iterdir() if folder.is_dir() else []:
            if not (p.name.startswith(".") and (".partial." in p.name or p.name.endswith(".tmp"))):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint: those steps are trained again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            pass  # a line cut short by a crash
    write_text(path, "".join(line + "\n" for line in keep))


def open_run_folder(
    cfg: FolderOptions,
    out: Path,
    folder: contextlib.ExitStack,
    accelerator: Accelerator,
    start: int,
    owned: tuple[str, ...],
    config_json: dict,
) -> Path:
    """Where the main process writes the run (`_run_folder`, entered into `folder`): prepared, cleaned
    after a cut --resume (partial writes removed, metrics after the checkpoint dropped), config.json written."""
    if accelerator.is_main_process:
        out = folder.enter_context(_run_folder(cfg, out, owned))
        prepare_out_dir(out, overwrite=cfg.resume or cfg.overwrite)
        if cfg.resume:
            _remove_cut_writes(out)
            _truncate_metrics(out / "metrics.jsonl", start)
        write_json(out / "config.json", config_json)
    accelerator.wait_for_everyone()
    return out

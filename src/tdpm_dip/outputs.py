"""Writing results: atomic files, PNGs, grids, run folders. Nothing is left half-written.

Interrupts: a command's outputs are built beside the folder they go to and replace the earlier ones
only once complete (`staged_dir`); SIGTERM is handled like Ctrl-C (`sigterm_as_interrupt`), and the renames
that put results in place run with both signals held back (`signals_deferred`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def ordinary_modes(folder: str | os.PathLike) -> None:
    """safetensors writes its files 0600; give the files under `folder` an ordinary new file's permissions (0666
    less the umask), so that a model in a shared folder loads for everyone its folder admits."""
    for p in Path(folder).rglob("*.safetensors"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600; results get the permissions of an ordinary new file.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def refuse_out_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """The checks of `prepare_out_dir` without creating anything: a command runs them before it loads a model
    or an image, so that a wrong --out costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to write into it)")
    base = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if base is not None and not base.is_dir():
        raise UserError(f"{out}: cannot be made ({base} is a file)")
    if base is not None and not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write there ({base} is not writable)")


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies under it (links and `..` resolved)."""
    p, root = Path(path).resolve(), Path(folder).resolve()
    return p == root or root in p.parents


def refuse_inputs_inside(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """A run replaces its own entries of --out whole (`staged_dir`): an input inside --out (say --input OUT/noisy,
    the layout `add-noise` writes) would be deleted by it. A one-line UserError naming the option, before any
    work. `inputs`: {option: path or None}."""
    for flag, path in inputs.items():
        if path is not None and is_within(path, out):
            raise UserError(
                f"{flag} {path} is inside --out {out}, whose outputs would replace it: choose another --out"
            )


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create an output folder; refuse a non-empty one unless `overwrite` (then `staged_dir` replaces the
    command's own outputs when the new ones are complete; files we did not write stay)."""
    out = Path(out)
    recover_swap(out)
    refuse_out_dir(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tdpm-dip-write-test"
        with signals_deferred():
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror or e})") from None
    return out


# ---------------------------------------------------------------------------------------------- interrupts


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that the same clean-up runs."""


def reported(e: KeyboardInterrupt) -> KeyboardInterrupt:
    """Mark an interrupt whose command already said what it kept: the CLI then adds no generic line of its own."""
    e.tdpm_dip_reported = True  # type: ignore[attr-defined]
    return e


def was_reported(e: BaseException) -> bool:
    """Whether `e`, or the interrupt it wraps (click turns Ctrl-C into Abort), was marked by `reported`."""
    return any(getattr(x, "tdpm_dip_reported", False) for x in (e, e.__cause__, e.__context__))


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (a KeyboardInterrupt): staged outputs are removed
    and earlier ones kept, as on Ctrl-C. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (a few renames), then deliver them.

    A signal then never lands between two renames that belong together. A no-op outside the main
    thread, or where a handler was set outside Python (it could not be restored).
    """
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs} if threading.current_thread() is threading.main_thread() else {}
    if not old or any(h is None for h in old.values()):
        yield
        return
    caught: list[int] = []
    for s in sigs:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # the original handler: KeyboardInterrupt, Terminated, or the default


# ---------------------------------------------------------------------------------------------- staging


def _stage_prefix(final: Path) -> str:
    return f".{final.name}.partial."  # a command's new outputs while they are built


def _aside_prefix(final: Path) -> str:
    return f".{final.name}.old.partial."  # the outputs they replace, during the swap


def recover_swap(final: str | os.PathLike) -> None:
    """Finish a swap of `staged_dir` that a kill -9 cut short (SIGINT and SIGTERM wait for it to end).

    Cut between its two renames, `final` is missing (or empty, recreated since) and the old folder lies
    beside it: it is put back. Cut while the old folder was being deleted: the rest of it is deleted.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return
    prefix = _aside_prefix(final)
    for aside in sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()):
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        if not final.exists():
            os.rename(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`dst` as a hard link to `src` (a copy where the file system has none)."""
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system
        shutil.copy2(src, dst)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`dst`, its folder made if need be, as a hard link to `src` (a copy where the file system has none): how an
    earlier run's finished file is carried into a new run's staged folder."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    _link_or_copy(src, dst)


def _carry(src: Path, dst: Path) -> None:
    """Put `src` (a file, folder or link) at `dst` too, without touching `src`: hard links, not copies."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _swap_in(tmp: Path, final: Path, owned: frozenset[str]) -> bool:
    """Replace the folder `final` by `tmp`, carrying over the old entries the new run does not replace;
    False when `final` cannot be renamed (a mount point, a link): the caller replaces entries in place."""
    if final.is_symlink():
        return False
    fresh = not final.exists() or _is_empty_dir(final)
    written = {p.name for p in tmp.iterdir()}
    if not fresh:
        for old in final.iterdir():
            if old.name not in written and old.name not in owned:
                _carry(old, tmp / old.name)
    os.chmod(tmp, stat.S_IMODE(final.stat().st_mode) if final.exists() else 0o777 & ~_UMASK)
    aside = final.parent / (_aside_prefix(final) + secrets.token_hex(6))
    with signals_deferred():
        try:
            if fresh:
                os.rename(tmp, final)  # one step: rename replaces an empty folder
                return True
            os.rename(final, aside)
        except OSError:
            if not final.exists():
                raise
            for p in tmp.iterdir():  # the in-place way moves only what this run wrote
                if p.name not in written:
                    _remove(p)
            return False
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    return True


def _replace_entries(tmp: Path, final: Path, owned: frozenset[str]) -> None:
    """Replace, inside `final`, each top-level entry the new run wrote (and remove the `owned` ones it did
    not write); everything else in `final` stays as it is."""
    final.mkdir(parents=True, exist_ok=True)
    with signals_deferred():
        for name in sorted(owned - {p.name for p in tmp.iterdir()}):
            _remove(final / name)
        for src in sorted(tmp.iterdir()):
            dst = final / src.name
            if src.is_dir() and (dst.is_dir() or dst.is_symlink()):
                aside = final / (_aside_prefix(dst) + secrets.token_hex(6))
                os.rename(dst, aside)
                os.rename(src, dst)
                _remove(aside)
            else:
                os.replace(src, dst)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, owned: Iterable[str] = (), in_place: bool = False) -> Iterator[Path]:
    """Build a folder's new contents beside it; they replace the old ones only when the block succeeds.

    The block writes into a fresh folder beside `final` (.NAME.partial.XXXX). On success:

    - `final` missing or empty: that folder is renamed to `final`, in one step;
    - otherwise it replaces `final` whole (old folder renamed aside, new one renamed in, old one deleted).
      Each top-level entry the block wrote replaces the old entry of that name whole (so no stale files
      of an earlier run survive inside it), and so does each name in `owned` (the command's own outputs,
      removed even when this run did not write them); every other old entry (what the command did not
      write) is carried over into the new folder, as hard links, before the swap;
    - `in_place=True` replaces those entries inside `final` instead of swapping the folder, for folders
      that other work may be writing into at the same time (a bench run's cache).

    The renames run with SIGINT / SIGTERM held back (`signals_deferred`). On an exception or interrupt in
    the block, `final` is exactly as it was and the temporary folder is removed. A kill -9 between the two
    renames of a swap leaves the old folder beside `final`; `recover_swap` (run here and by
    `prepare_out_dir`) puts it back.
    """
    final = Path(final)
    owned_set = frozenset(owned)
    recover_swap(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_stage_prefix(final), dir=final.parent))
    try:
        yield tmp
        if in_place or not _swap_in(tmp, final, owned_set):
            _replace_entries(tmp, final, owned_set)
    finally:
        if tmp.exists():
            with signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts -> a GitHub Markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

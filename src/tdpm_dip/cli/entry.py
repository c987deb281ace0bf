"""The entry point of `tdpm-dip` (and `python -m tdpm_dip.cli`): run the group, turn the user's problems into one
line and an exit code, and progress bars into lines when stderr is a log file or a pipe.

Every problem the user can fix (paths, images, models, numbers) is one line on stderr and exit code 2; Ctrl-C is
exit code 130, SIGTERM 143, with earlier outputs intact (results are staged, then moved in).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import typing
import warnings

import click

from ..errors import UserError
from ..outputs import Terminated, sigterm_as_interrupt, was_reported
from .common import cli


class ProgressLines(io.TextIOBase):
    """stderr when it is a file or a pipe: a progress bar's carriage-return frames become lines (tqdm draws one
    every PROGRESS_LINE_SECONDS there), and the blank frames that erase a finished bar are dropped."""

    def __init__(self, stream: typing.TextIO) -> None:
        self.stream = stream
        self.at_frame = False  # the last write was a frame turned into a line

    def write(self, s: str) -> int:
        if "\r" in s:
            frames = [f.rstrip() for f in s.split("\r")]
            text = "".join(f + "\n" for f in frames if f.strip())
            self.at_frame = bool(text) or self.at_frame
        elif s == "\n" and self.at_frame:  # a bar left on screen ends with a newline it already has here
            text, self.at_frame = "", False
        else:
            text, self.at_frame = s, False
        self.stream.write(text)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


PROGRESS_LINE_SECONDS = 30


@contextlib.contextmanager
def progress_as_lines() -> typing.Iterator[None]:
    """While a command runs with stderr not a terminal (a log file, a pipe), progress bars print a line every
    PROGRESS_LINE_SECONDS instead of carriage-return frames many times a second."""
    if sys.stderr is None or sys.stderr.isatty():
        yield
        return
    old, old_env = sys.stderr, os.environ.get("TQDM_MININTERVAL")
    os.environ["TQDM_MININTERVAL"] = os.environ.get("TQDM_MININTERVAL", str(PROGRESS_LINE_SECONDS))
    sys.stderr = ProgressLines(old)
    try:
        yield
    finally:
        sys.stderr = old
        if old_env is None:
            os.environ.pop("TQDM_MININTERVAL", None)


@contextlib.contextmanager
def warnings_as_lines() -> typing.Iterator[None]:
    """The project's warnings (UserWarning: a resized mask, a skipped file) as "warning: ..." lines on stderr, not
    Python's file:line header and source line; other categories (libraries') keep Python's format."""
    old = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: typing.TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if category is UserWarning:
            click.echo(f"warning: {message}", err=True)
        else:
            old(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


def main(argv: list[str] | None = None) -> None:
    """`tdpm-dip ARGV` (the console script; argv None: the process's arguments)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with progress_as_lines(), warnings_as_lines():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C (exit code 143 instead of 130)
            cli.main(args=argv, prog_name="tdpm-dip", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
        if not was_reported(e):  # the command's own line says what it kept
            click.echo("interrupted: finished outputs are kept, nothing half-written", err=True)
        sys.exit(143 if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated) else 130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)

"""Helpers shared by the CLI tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import pytest

from tdpm_dip.cli import main


def run(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err

"""Helpers shared by the CLI tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import pytest

from tdpm_dip.cli import main

# `demo` shrunk to seconds (test_demo, test_interrupt): every phase of the real demo at toy sizes, with a few
# training steps, short chains and DIP fits.
DEMO_SHRUNK = [
    "--steps",
    "3",
    "--train-images",
    "16",
    "--n",
    "2",
    "--ddpm-steps",
    "3",
    "--t-noisy",
    "3",
    "--dip-iters",
    "2",
    "--blind-dip-iters",
    "2",
    "--sigma",
    "10",
    "--threads",
    "1",
]


def run(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err

"""The edge: the one thread policy, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from tdpm_dip import runtime
from tdpm_dip.errors import UserError


@pytest.mark.parametrize("load, expected", [(0.0, "all"), (0.5, "all"), (1.0, 1), (7.5, 1)])
def test_threads_follow_the_load(monkeypatch: pytest.MonkeyPatch, load: float, expected: object) -> None:
    """Auto (0): every core on an idle machine, one thread once the 1-minute load reaches half the cores
    (a waiting OpenMP thread on a busy core is many times slower than one thread)."""
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 2)
    assert runtime.pick_threads(0) == (2 if expected == "all" else expected)
    assert runtime.pick_threads(3) == 3  # asked for: as given
    with pytest.raises(UserError, match="--threads"):
        runtime.pick_threads(-1)


def test_threads_without_a_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> tuple[float, float, float]:
        raise OSError

    monkeypatch.setattr(runtime.os, "getloadavg", no_load)
    assert runtime.pick_threads(0) == 1


def test_every_computing_command_takes_threads() -> None:
    from tdpm_dip.cli import cli

    for name in ("generate", "denoise", "bench", "demo", "app"):
        assert "threads" in [p.name for p in cli.commands[name].params], name


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_dtype_is_bf16_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert runtime.pick_amp("auto", torch.device("cpu")) == expected
    assert runtime.pick_amp("fp32", torch.device("cpu")) is None
    assert runtime.pick_amp("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype"):
        runtime.pick_amp("fp8", torch.device("cpu"))

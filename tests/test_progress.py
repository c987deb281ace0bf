"""Progress bars (methods/common.chain and the DIP fit): with ctx.progress every chain and fit shows one bar that
says what it runs and counts each step to its total; without it, none."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from by_hand import T_STAR_25, noisy_8bit
from stubs import SIZE, FakeFit, StubG, eps_zero

from tdpm_dip import dip
from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig
from tdpm_dip.generator import TDPMGenerator
from tdpm_dip.methods import Context, Job, blind, common, paper, run


class RecordingBar:
    """A tqdm stand-in that keeps what a progress bar was asked to show."""

    bars: list[RecordingBar] = []

    def __init__(self, total=None, desc=None, unit="it", leave=True) -> None:
        self.total, self.desc, self.unit, self.leave, self.n, self.closed = total, desc, unit, leave, 0, False
        RecordingBar.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_finished_bar(total: int, desc: str, unit: str) -> None:
    """Exactly one bar was made: `desc` counting `total` `unit`s, run to its total, closed, and not left behind."""
    (bar,) = RecordingBar.bars
    assert (bar.total, bar.desc, bar.unit, bar.leave, bar.n, bar.closed) == (total, desc, unit, False, total, True)


def test_progress_bars_count_every_step_when_asked(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """With ctx.progress, a chain shows one bar of t steps per batch (reaching its total), the DIP fit one of
    iterations x images; the amortized sampler its chain; without ctx.progress there is no bar. The stub network:
    the blind ddpm chains take ~150 calls here."""
    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(dip, "tqdm", RecordingBar)
    RecordingBar.bars = []
    y = noisy_8bit(8, 8, seed=1, n=3)
    ctx = make_ctx(
        eps_zero(),
        dip=DIPConfig(preset="dip-tiny", iters=2),
        batch_size=2,
        progress=True,
        dip_plugin=DIPConfig(preset="dip-tiny", iters=3),
    )
    run(ctx, "denoise", "blind", "ddpm", Job((0, 1, 2), noisy=y, sigma=(25.0,), samples=1))
    _one_finished_bar(T_STAR_25 * 2, "DDPM reverse", "step")
    RecordingBar.bars = []
    run(ctx, "denoise", "blind", "dip", Job((0, 1, 2), noisy=y, sigma=(25.0,)))
    _one_finished_bar(2 * 3, "DIP fit (dip-tiny)", "img-it")
    RecordingBar.bars = []
    run(ctx, "denoise", "blind", "tdpm-dip", Job((0, 1, 2), noisy=y, sigma=(25.0,), samples=1, t_trunc=3))
    assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == [
        ("DIP fit (dip-tiny)", 3 * 3, 3 * 3),
        ("TDPM reverse", 3 * 2, 3 * 2),
    ]
    RecordingBar.bars = []
    gen = TDPMGenerator(StubG(), 4, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    run(
        make_ctx(eps_zero(), batch_size=2, progress=True, generator=gen),
        "generate",
        "unconditional",
        "tdpm",
        Job((0, 1, 2)),
    )
    _one_finished_bar(4 * 2, "TDPM reverse", "step")
    RecordingBar.bars = []
    run(
        make_ctx(eps_zero(), dip=DIPConfig(preset="dip-tiny", iters=2)),
        "denoise",
        "blind",
        "dip",
        Job((0,), noisy=y[:1], sigma=(25.0,)),
    )
    run(make_ctx(eps_zero()), "denoise", "blind", "ddpm", Job((0,), noisy=y[:1], sigma=(25.0,), samples=1))
    assert RecordingBar.bars == []


def test_progress_labels_of_the_paper_and_generation_chains(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """Each chain's bar says what it runs: paper ddpm "DDPM reverse", TDPM-DIP "TDPM reverse", generation ddpm
    "DDPM 1000 steps", generation ddim "DDIM n steps"; every Result carries the seconds it took."""
    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(paper, "fit", FakeFit())  # generation's TDPM-DIP runs paper.oracle_tdpm too
    ctx = make_ctx(eps_zero(), progress=True)  # the stub: generation ddpm runs all 1000 steps
    clean = make_sprites(2, SIZE, seed=2).images
    for task, protocol, method, job, desc, total in (
        ("denoise", "paper", "ddpm", Job((0, 1), clean=clean, t_noisy=7), "DDPM reverse", 7),
        ("denoise", "paper", "tdpm-dip", Job((0, 1), clean=clean, t_noisy=7, t_trunc=3), "TDPM reverse", 3),
        ("generate", "paper", "tdpm-dip", Job((0, 1), reference=clean, t_trunc=4), "TDPM reverse", 4),
        ("generate", "unconditional", "ddpm", Job((0, 1)), "DDPM 1000 steps", 1000),
        ("generate", "unconditional", "ddim", Job((0, 1), ddim_steps=2), "DDIM 2 steps", 2),
    ):
        RecordingBar.bars = []
        res = run(ctx, task, protocol, method, job)
        assert isinstance(res.seconds, float) and res.seconds >= 0, method
        assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == ([] if desc is None else [(desc, total, total)])


def test_blind_tdpm_dip_progress_bar_says_tdpm_reverse(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """The blind TDPM-DIP chain's bar is labelled "TDPM reverse" and counts its steps from the start level."""
    monkeypatch.setattr(common, "tqdm", RecordingBar)
    monkeypatch.setattr(blind, "fit", FakeFit())
    RecordingBar.bars = []
    y = noisy_8bit(SIZE, SIZE, seed=6, n=2)
    run(
        make_ctx(progress=True),
        "denoise",
        "blind",
        "tdpm-dip",
        Job((3, 4), noisy=y, sigma=(25.0,), samples=1, t_trunc=3),
    )
    assert [(b.desc, b.total, b.n) for b in RecordingBar.bars] == [("TDPM reverse", 3, 3)]

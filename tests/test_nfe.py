"""The NFE every method reports is what it did: the network calls it made per image (counted at the denoiser,
`EpsModel.eps`, the one place the UNet is called from, and at the restoration network), plus one per DIP iteration
for the methods that fit a DIP.
The tables' NFE columns and the registry's formulas rest on this, for every registered method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from stubs import tiny_restorer

from tdpm_dip import registry
from tdpm_dip.dip import DIPConfig
from tdpm_dip.methods import Context, Job, run, run_restore
from tdpm_dip.operators import Downsample, Inpaint
from tdpm_dip.sampling import EpsModel

SIZE = 16
N = 2
DIP = DIPConfig(preset="dip-tiny", iters=3, lr=1e-3)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images the UNet was called on, summed over calls (a batch of 2 counts 2)."""
    calls: list[int] = []
    real = EpsModel.eps

    def eps(self: EpsModel, x: torch.Tensor, level: int | torch.Tensor) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        return real(self, x, level)

    monkeypatch.setattr(EpsModel, "eps", eps)
    return calls


def _clean() -> torch.Tensor:
    return torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _dip_iters(ctx: Context, m: registry.Method) -> int:
    cfg = {"plugin": ctx.dip_plugin}.get(m.dip or "", ctx.dip) if m.uses_dip else None
    return 0 if cfg is None else cfg.iters


def _check(res_nfe: float, calls: list[int], dip_iters: int, name: str) -> None:
    assert res_nfe == sum(calls) / N + dip_iters, (name, res_nfe, sum(calls) / N, dip_iters)


def test_denoisers_report_the_calls_they_make(make_ctx: Callable[..., Context], counted: list[int]) -> None:
    ctx = make_ctx(dip=DIP, dip_plugin=DIP, batch_size=N)
    x = _clean()
    jobs = {
        "blind": Job((0, 1), noisy=(x + 0.1 * torch.randn_like(x)).clamp(-1, 1), sigma=(25.0,), samples=2),
        "paper": Job((0, 1), clean=x, t_noisy=6, t_trunc=2),
    }
    for protocol, job in jobs.items():
        for m in registry.methods("denoise", protocol):
            if m.extra is not None:  # FFDNet, BM3D: their own network (one call) or none, not the DDPM
                continue
            counted.clear()
            res = run(ctx, "denoise", protocol, m.name, dataclasses.replace(job, ddim_steps=3))
            _check(res.nfe, counted, _dip_iters(ctx, m), f"{protocol}/{m.name}")


@pytest.mark.parametrize("task", ["sr", "inpaint"])
def test_restorers_report_the_calls_they_make(make_ctx: Callable[..., Context], counted: list[int], task: str) -> None:
    net = tiny_restorer()
    # the restoration network's calls count as the UNet's do: one per image it is called on
    net.register_forward_hook(lambda module, args, out: counted.append(int(args[0].shape[0])))
    ctx = make_ctx(dip=DIP, batch_size=N, restorer=net)
    x = _clean()
    mask = (torch.rand(N, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    op = Downsample(2, SIZE, SIZE) if task == "sr" else Inpaint(mask)
    job = Job((0, 1), observed=op.A(x), operator=op, samples=2, ddim_steps=3, t_trunc=20)
    for m in registry.methods("restore", "blind", operator=task):
        counted.clear()
        res = run_restore(ctx, m.name, job)
        _check(res.nfe, counted, _dip_iters(ctx, m), f"{task}/{m.name}")


def test_generators_report_the_calls_they_make(make_ctx: Callable[..., Context], counted: list[int]) -> None:
    ctx = make_ctx(dip=DIP, batch_size=N)
    for m in registry.methods("generate"):
        if "generator" in m.needs:  # amortized TDPM: its own test counts G_psi's call and the chain's
            continue
        counted.clear()
        job = Job((0, 1), reference=_clean(), t_trunc=3, ddim_steps=4)
        res = run(ctx, "generate", m.protocol, m.name, job)
        _check(res.nfe, counted, _dip_iters(ctx, m), f"generate/{m.name}")

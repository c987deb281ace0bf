"""The Deep Image Prior fit (dip.py, Algorithm 2): its configuration and the presets' defaults, what a fit feeds
the networks, records and returns, batched (vmap) and one-by-one fits, results joined, and the memo of fits per
command (methods/common.fit)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from by_hand import draw, gens
from stubs import SIZE

from tdpm_dip import dip
from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig, DIPResult, dip_defaults, fit_dip
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, common
from tdpm_dip.noise import image_generators, randn


@pytest.fixture(scope="module")
def sprites() -> torch.Tensor:
    return make_sprites(4, SIZE, seed=3).images


# ------------------------------------------------------------------------------------------ configuration


def test_dip_config_validates() -> None:
    with pytest.raises(UserError):
        DIPConfig(lr=0)
    with pytest.raises(UserError):
        DIPConfig(preset="nope")
    with pytest.raises(UserError):
        DIPConfig(average=1.5)


def test_dip_config_accepts_exactly_its_ranges() -> None:
    for ok in ({"iters": 0}, {"lr": 1e-9}, {"lr": 5.0}, {"average": 0.0}, {"average": 0.999}, {"average": None}):
        DIPConfig(preset="dip-tiny", **ok)  # type: ignore[arg-type]
    for bad, message in (
        ({"iters": -1}, "DIP iterations must be >= 0, got -1"),
        ({"lr": 0.0}, "DIP learning rate must be > 0, got 0.0"),
        ({"average": 1.0}, "DIP output averaging must be in [0, 1), got 1.0"),
        ({"average": -0.1}, "DIP output averaging must be in [0, 1), got -0.1"),
    ):
        with pytest.raises(UserError) as e:
            DIPConfig(preset="dip-tiny", **bad)  # type: ignore[arg-type]
        assert str(e.value) == message


def test_dip_defaults_have_one_home() -> None:
    assert dip_defaults("paper", "paper-dip") == DIPConfig(preset="paper-dip", iters=100, lr=1e-4)
    blind = dip_defaults("blind", "dip-small")
    assert blind.iters == 400 and blind.input_noise > 0 and blind.average is not None
    assert dip_defaults("blind", "dip-small", iters=7, lr=2e-3).iters == 7
    assert dip_defaults("plugin", "dip-small").input_noise == 0  # its target holds z: it must fit it exactly


def test_dip_defaults_apply_the_preset_and_its_overrides() -> None:
    cfg = dip_defaults("paper", "dip-tiny")
    assert cfg == DIPConfig(preset="dip-tiny", iters=100, lr=1e-3)  # defaults.DIP_PRESET_OVERRIDES
    assert dip_defaults("blind", "dip-tiny", iters=9, lr=0.5) == DIPConfig(
        preset="dip-tiny", iters=9, lr=0.5, input_noise=1.0, average=0.95
    )
    with pytest.raises(ValueError, match="unknown DIP use 'nope'"):
        dip_defaults("nope", "dip-tiny")


# ------------------------------------------------------------------------------------------ fitting


def test_dip_loss_falls_and_psnr_rises(sprites: torch.Tensor) -> None:
    x = sprites[:2]
    z = randn((3, SIZE, SIZE), image_generators([0, 1]))
    res = fit_dip(x, z, [0, 1], DIPConfig(preset="dip-tiny", iters=40, lr=2e-3, ssim_every=10), reference=x)
    assert res.loss.shape == (40, 2) and res.psnr.shape == (40, 2)
    assert (res.loss[-1] < 0.5 * res.loss[0]).all()
    assert (res.psnr[-1] > res.psnr[0] + 3).all()
    assert res.ssim is not None and res.ssim_iters[0] == 0 and res.ssim_iters[-1] == 39
    assert (res.ssim[-1] > res.ssim[0]).all()


class Recorder:
    """Wraps dip._networks: the real networks, with every forward input and output recorded."""

    def __init__(self, real) -> None:
        self.real, self.inputs, self.outputs = real, [], []

    def __call__(self, *args):
        forward, params = self.real(*args)

        def recorded(x: torch.Tensor) -> torch.Tensor:
            out = forward(x)
            self.inputs.append(x.detach().clone())
            self.outputs.append(out.detach().float().clone())
            return out

        return recorded, params


def test_dip_fit_records_its_curves_and_averages_its_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Algorithm 2 with the blind tricks, from what the networks saw and returned: each step feeds z plus fresh
    N(0, input_noise^2) noise (its own per image and step); loss[i] and psnr[i] are the MSE and PSNR of step i's output
    (before its update); SSIM at every ssim_every-th step and the last; the result is the exponential average of the
    outputs. Without averaging it is the fitted network on z itself, after the last update."""
    rec = Recorder(dip._networks)
    monkeypatch.setattr(dip, "_networks", rec)
    g = torch.Generator().manual_seed(0)
    target, z = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(2, 3, SIZE, SIZE, generator=g)
    reference = (target + 0.1).clamp(-1, 1)
    cfg = DIPConfig(preset="dip-tiny", iters=4, lr=1e-2, input_noise=0.5, average=0.6, ssim_every=3)
    res = fit_dip(target, z, [1, 2], cfg, reference=reference, batch_size=2)
    assert len(rec.outputs) == 4  # no extra call: the average is the result
    noise = torch.stack([x - z for x in rec.inputs])  # [step, image, ...]
    assert abs(float(noise.std()) - 0.5) < 0.03 and abs(float(noise.mean())) < 0.03
    # reproducible from the seeds: image i's perturbations are the draws of seed i + 7919, step after step
    g_noise = gens([1 + 7919, 2 + 7919])
    for step in range(4):
        assert torch.allclose(noise[step], 0.5 * draw((3, SIZE, SIZE), g_noise), rtol=0, atol=1e-6), step
    avg = rec.outputs[0]
    for o in rec.outputs[1:]:
        avg = 0.6 * avg + 0.4 * o
    assert torch.allclose(res.output, avg, rtol=0, atol=1e-6)
    unit = lambda t: ((t + 1) / 2).clamp(0, 1)
    for i, o in enumerate(rec.outputs):
        assert torch.allclose(res.loss[i], ((o - target) ** 2).flatten(1).mean(1), rtol=1e-6, atol=0)
        mse = ((unit(o) - unit(reference)) ** 2).flatten(1).mean(1)
        assert torch.allclose(res.psnr[i], 10 * torch.log10(1 / mse), rtol=1e-5, atol=0)
    assert res.ssim_iters == [0, 3] and res.ssim.shape == (2, 2) and res.seconds > 0
    assert not torch.allclose(rec.outputs[0], rec.outputs[-1])  # the networks were updated

    rec = Recorder(rec.real)
    monkeypatch.setattr(dip, "_networks", rec)
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=7, lr=1e-2, ssim_every=3), reference=reference)
    assert len(rec.outputs) == 8 and torch.equal(rec.inputs[0], z) and torch.equal(rec.inputs[-1], z)
    assert torch.equal(res.output, rec.outputs[-1]) and res.ssim_iters == [0, 3, 6]
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=8, ssim_every=3), reference=reference)
    assert res.ssim_iters == [0, 3, 6, 7]
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=3, ssim_every=0), reference=reference)
    assert res.ssim is None and res.ssim_iters == [] and res.psnr.shape == (3, 2)
    res = fit_dip(target, z, [1, 2], DIPConfig(preset="dip-tiny", iters=0))
    assert res.loss.shape == (0, 2) and res.psnr is None and res.ssim is None and res.output.shape == z.shape


def test_dip_fit_depends_on_its_learning_rate_and_seeds_only() -> None:
    """The same seeds give the same fit; another learning rate or seed another one."""
    g = torch.Generator().manual_seed(1)
    target, z = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(1, 3, SIZE, SIZE, generator=g)
    fit = lambda lr, seed: fit_dip(target, z, [seed], DIPConfig(preset="dip-tiny", iters=3, lr=lr)).output
    a = fit(2e-3, 0)
    assert torch.equal(a, fit(2e-3, 0))
    assert not torch.allclose(a, fit(1e-3, 0), atol=1e-5) and not torch.allclose(a, fit(2e-3, 1), atol=1e-5)


def test_batched_fit_equals_one_by_one(sprites: torch.Tensor) -> None:
    seeds = [5, 6, 7]
    z = randn((3, SIZE, SIZE), image_generators(seeds))
    cfg = DIPConfig(preset="dip-tiny", iters=8, lr=1e-3)
    a = fit_dip(sprites[:3], z, seeds, cfg, batch_size=3, batched=True)
    b = fit_dip(sprites[:3], z, seeds, cfg, batched=False)
    c = fit_dip(sprites[:3], z, seeds, cfg, batch_size=2, batched=True)  # uneven groups
    # fp32 sums are reordered between grouped and plain convolutions: agreement to ~1e-5, not bitwise.
    assert torch.allclose(a.output, b.output, atol=1e-4)
    assert torch.allclose(a.output, c.output, atol=1e-4)
    assert torch.allclose(a.loss, b.loss, rtol=1e-4, atol=1e-6)


def test_batched_fit_works_with_attention_presets(sprites: torch.Tensor) -> None:
    seeds = [0, 1]
    z = randn((3, SIZE, SIZE), image_generators(seeds))
    cfg = DIPConfig(preset="tiny", iters=3, lr=1e-3)  # "tiny" has attention blocks
    a = fit_dip(sprites[:2], z, seeds, cfg, batch_size=2)
    b = fit_dip(sprites[:2], z, seeds, cfg, batched=False)
    assert torch.allclose(a.output, b.output, atol=1e-4)


def test_dip_fit_checks_its_arguments_and_falls_back_when_vmap_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vmap error (layers without a batching rule) refits one image at a time, with a one-line warning; other
    errors propagate; curves and reference slices follow the images through the groups."""
    g = torch.Generator().manual_seed(2)
    target, z = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1, torch.randn(3, 3, SIZE, SIZE, generator=g)
    cfg = DIPConfig(preset="dip-tiny", iters=2, lr=1e-2)
    with pytest.raises(UserError) as e:
        fit_dip(target, z, [0, 1, 2], cfg, batch_size=0)
    assert str(e.value) == "batch size must be >= 1, got 0"
    for t, n, s in ((target[:2], z, [0, 1, 2]), (target, z[:2], [0, 1, 2]), (target, z, [0, 1])):
        with pytest.raises(ValueError, match="target, net_input and seeds must have the same length"):
            fit_dip(t, n, s, cfg)
    alone = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batched=False)
    grouped = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batch_size=1)
    assert torch.equal(alone.output, grouped.output) and torch.equal(alone.psnr, grouped.psnr)

    real = dip._fit_group

    def no_vmap(target, net_input, seeds, *rest):
        if len(seeds) > 1:
            raise RuntimeError("vmap: no batching rule for aten::some_op\nsecond line")
        return real(target, net_input, seeds, *rest)

    monkeypatch.setattr(dip, "_fit_group", no_vmap)
    with pytest.warns(UserWarning) as w:
        res = fit_dip(target, z, [0, 1, 2], cfg, reference=target.flip(-1), batch_size=2)
    assert [str(x.message) for x in w] == [
        "vmap failed for preset dip-tiny (vmap: no batching rule for aten::some_op); fitting one image at a time"
    ]
    assert torch.equal(res.output, alone.output) and torch.equal(res.psnr, alone.psnr) and res.seconds > 0

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(dip, "_fit_group", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit_dip(target, z, [0, 1, 2], cfg)


# ------------------------------------------------------------------------------------------ results


def test_dip_mean_curves_average_over_the_images() -> None:
    loss = torch.tensor([[1.0, 3.0], [0.5, 1.5]])  # [iters, B]
    res = DIPResult(torch.zeros(2, 3, 4, 4), loss)
    assert res.mean_curves() == {"loss": [2.0, 1.0]}
    res = DIPResult(
        torch.zeros(2, 3, 4, 4),
        loss,
        psnr=torch.tensor([[10.0, 20.0], [12.0, 22.0]]),
        ssim=torch.tensor([[0.2, 0.4]]),
        ssim_iters=[1],
    )
    assert res.mean_curves() == {
        "loss": [2.0, 1.0],
        "psnr": [15.0, 17.0],
        "ssim_iters": [1],
        "ssim": [pytest.approx(0.3)],
    }


def test_dip_result_concat_joins_images_and_adds_fit_times() -> None:
    a = DIPResult(
        torch.zeros(1, 3, 2, 2),
        torch.tensor([[1.0], [2.0]]),
        torch.tensor([[5.0], [6.0]]),
        torch.tensor([[0.5]]),
        [0],
        2.0,
    )
    b = DIPResult(
        torch.ones(2, 3, 2, 2),
        torch.tensor([[3.0, 4.0], [5.0, 6.0]]),
        torch.tensor([[7.0, 8.0], [9.0, 1.0]]),
        torch.tensor([[0.6, 0.7]]),
        [0],
        3.0,
    )
    c = DIPResult.concat([a, b])
    assert torch.equal(c.output, torch.cat([a.output, b.output])) and c.seconds == 5.0 and c.ssim_iters == [0]
    assert torch.equal(c.loss, torch.tensor([[1.0, 3.0, 4.0], [2.0, 5.0, 6.0]]))
    assert torch.equal(c.psnr, torch.tensor([[5.0, 7.0, 8.0], [6.0, 9.0, 1.0]]))
    assert torch.equal(c.ssim, torch.tensor([[0.5, 0.6, 0.7]]))
    assert DIPResult.concat([a, b], seconds=1.5).seconds == 1.5
    d = DIPResult.concat([DIPResult(a.output, a.loss), DIPResult(b.output, b.loss)])
    assert d.psnr is None and d.ssim is None and d.seconds == 0.0


# ------------------------------------------------------------------------------------------ the memo (common.fit)


def test_dip_fits_are_memoised_per_input_settings_and_context(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """common.fit fits once per (target, z, reference, seeds, DIP settings, amp dtype, device, batch size) when the
    context has a memo, and every time without one; it hands fit_dip the caller's settings (else ctx.dip) and the
    context's batch size, dtype and progress flag."""
    calls: list[dict] = []

    def fake_fit_dip(
        target, z, seeds, cfg, reference=None, batch_size=16, amp_dtype=None, progress=False, measure=None, **kw
    ):
        calls.append(
            {
                "interrupt": kw.get("interrupt"),
                "cfg": cfg,
                "batch_size": batch_size,
                "amp_dtype": amp_dtype,
                "progress": progress,
                "reference": reference,
                "seeds": list(seeds),
            }
        )
        return DIPResult(target.clone(), torch.zeros(1, target.shape[0]))

    monkeypatch.setattr(common, "fit_dip", fake_fit_dip)
    cfg, other = DIPConfig(preset="dip-tiny", iters=3), DIPConfig(preset="dip-tiny", iters=4)
    ctx = make_ctx(dip=cfg, batch_size=3, progress=True)
    t, z, ref = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    first = common.fit(ctx, t, z, [1, 2], ref)
    assert calls == [
        {"interrupt": None, "cfg": cfg, "batch_size": 3, "amp_dtype": None, "progress": True, "reference": ref}
        | {"seeds": [1, 2]}
    ]
    assert common.fit(ctx, t.clone(), z.clone(), [1, 2], ref.clone()) is first and len(calls) == 1
    variants = [
        ((t + 1, z, [1, 2], ref), {}),
        ((t, z + 1, [1, 2], ref), {}),
        ((t, z, [1, 3], ref), {}),
        ((t, z, [1, 2], ref + 1), {}),
        ((t, z, [1, 2], None), {}),
        ((t, z, [1, 2], ref), {"cfg": other}),
    ]
    for args, kw in variants:
        common.fit(ctx, *args, **kw)
    assert len(calls) == 1 + len(variants) and calls[-1]["cfg"] == other and calls[-2]["reference"] is None
    for changed in ({"amp_dtype": torch.bfloat16}, {"batch_size": 2}, {"device": torch.device("cpu", 0)}):
        common.fit(dataclasses.replace(ctx, **changed), t, z, [1, 2], ref)  # same memo dict, another context
    assert len(calls) == 1 + len(variants) + 3 and calls[-3]["amp_dtype"] == torch.bfloat16
    assert calls[-2]["batch_size"] == 2
    n = len(calls)
    no_memo = dataclasses.replace(ctx, dip_memo=None)
    common.fit(no_memo, t, z, [1, 2], ref)
    common.fit(no_memo, t, z, [1, 2], ref)
    assert len(calls) == n + 2
    stop = dataclasses.replace(no_memo, interrupt=lambda: None)  # the context's stop check reaches every DIP step
    common.fit(stop, t, z, [1, 2], ref)
    assert calls[-1]["interrupt"] is stop.interrupt

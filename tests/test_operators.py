"""Restoration operators: adjointness, A A^+ A = A, projections and proximal steps, PIL's bicubic, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tdpm_dip.errors import UserError
from tdpm_dip.noise import add_noise
from tdpm_dip.operators import (
    Downsample,
    Identity,
    Inpaint,
    check_mask_kind,
    inpaint_biharmonic,
    make_mask,
    upsample_bicubic,
)


def _ops() -> list:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 16, 24, generator=g) > 0.5).float()
    return [Identity(), Inpaint(mask), Downsample(2, 16, 24), Downsample(4, 16, 24)]


@pytest.mark.parametrize("op", _ops(), ids=lambda o: type(o).__name__ + str(getattr(o, "factor", "")))
def test_adjoint_pinv_projection_and_prox(op) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 24, generator=g, dtype=torch.float64).float()
    y = torch.randn(op.A(x).shape, generator=g, dtype=torch.float64).float()
    # <A x, y> = <x, A^T y>
    assert torch.allclose((op.A(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-4, atol=1e-3)
    # A A^+ A = A
    assert torch.allclose(op.A(op.pinv(op.A(x))), op.A(x), atol=1e-4)
    # the projection lands on {A v = y} when y is in A's range, and does not move a point already there
    y_in = op.A(torch.randn(x.shape, generator=g))
    p = op.project(x, y_in)
    assert torch.allclose(op.A(p), y_in, atol=1e-4)
    assert torch.allclose(op.project(p, y_in), p, atol=1e-4)
    # prox: rho -> infinity keeps x; rho = 0 is the projection
    assert torch.allclose(op.prox(x, y_in, 1e8), x, atol=1e-3)
    assert torch.allclose(op.prox(x, y_in, 0.0), p, atol=1e-5)


def test_prox_solves_its_normal_equations() -> None:
    """(A^T A + rho I) v = A^T y + rho x for the closed-form step of the downscaling operator."""
    op = Downsample(2, 8, 8)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    rho = 0.3
    v = op.prox(x, y, rho)
    assert torch.allclose(op.adjoint(op.A(v)) + rho * v, op.adjoint(y) + rho * x, atol=1e-4)


def test_downsample_matches_pil_bicubic() -> None:
    """A matches Image.resize(..., BICUBIC) of an 8-bit RGB image to well above 50 dB."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(64, 48, 3)), 0), 1)
    arr = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
    for k in (2, 4):
        low = np.asarray(Image.fromarray(arr).resize((48 // k, 64 // k), Image.BICUBIC, reducing_gap=None), np.float64)
        x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        mine = ((Downsample(k, 64, 48).A(x)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
        mse = np.mean((mine - low) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 50


def test_bad_scales_and_sizes_are_one_line_errors() -> None:
    for k in (1, 3, 8):
        with pytest.raises(UserError, match="scale"):
            Downsample(k, 64, 64)
    with pytest.raises(UserError, match="multiple"):
        Downsample(4, 62, 64)


def test_masks_are_seeded_and_shaped() -> None:
    assert make_mask("box", 64, 64, 0)[0, 20:44, 20:44].sum() == 0
    assert make_mask("box", 64, 64, 0).sum() == 64 * 64 - 24 * 24
    assert make_mask("half", 8, 10, 0)[0, :, 5:].sum() == 0 and make_mask("half", 8, 10, 0)[0, :, :5].all()
    a, b = make_mask("random:0.8", 64, 64, 3), make_mask("random:0.8", 64, 64, 4)
    assert torch.equal(a, make_mask("random:0.8", 64, 64, 3)) and not torch.equal(a, b)
    assert 0.15 < float(a.mean()) < 0.25
    for bad in ("random", "random:1.5", "ring"):
        with pytest.raises(UserError, match="mask-kind"):
            check_mask_kind(bad)


def test_classical_baselines_and_8bit_observation() -> None:
    x = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    up = upsample_bicubic(Downsample(2, 16, 16).A(x), 2)
    assert up.shape == x.shape and float((up - x).abs().mean()) < 0.05
    mask = make_mask("box", 16, 16, 0)[None]
    filled = inpaint_biharmonic(Inpaint(mask).A(x), mask)
    assert torch.equal(filled[mask.expand_as(x) > 0], x[mask.expand_as(x) > 0].float()) or torch.allclose(
        filled * mask, x * mask, atol=1e-5
    )
    assert float((filled - x).abs().max()) < 0.05  # a linear ramp is biharmonic
    y = add_noise(x, 10.0, [0])
    assert torch.equal(y, torch.round((y + 1) * 127.5) / 127.5 - 1)  # 8-bit levels
    assert torch.equal(y, add_noise(x, 10.0, [0])) and not torch.equal(y, add_noise(x, 10.0, [1]))
    quantised = add_noise(x, 0.0, [0])  # sigma 0: a noise-free 8-bit file
    assert torch.equal(quantised, torch.round((x + 1) * 127.5).clamp(0, 255) / 127.5 - 1)


def test_each_operator_brings_its_classical_estimate() -> None:
    """The start of the chains and the classical baseline come from the operator (`Operator.classical`), so a new
    operator sets its own; the base class falls back to the pseudo-inverse."""
    from tdpm_dip.methods.restore import classical
    from tdpm_dip.operators import Downsample, Inpaint, Operator, inpaint_biharmonic, upsample_bicubic

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    down = Downsample(2, 16, 16)
    y = down.A(x)
    assert torch.equal(classical(y, down), upsample_bicubic(y, 2).clamp(-1, 1))
    assert torch.equal(classical(x * mask, Inpaint(mask)), inpaint_biharmonic(x * mask, mask).clamp(-1, 1))

    class Halve(Operator):
        def A(self, v: torch.Tensor) -> torch.Tensor:
            return v / 2

        def pinv(self, v: torch.Tensor) -> torch.Tensor:
            return v * 2

    assert torch.equal(classical(x, Halve()), x * 2)

    class Flat(Halve):
        def classical(self, v: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(v)

    assert torch.equal(classical(x, Flat()), torch.zeros_like(x))

"""Generation (methods/generate.py): DDPM and DDIM from pure noise against their closed forms, TDPM-DIP under the
paper protocol, and image i depending on seed i only. The amortized `tdpm` method is in test_generator.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from by_hand import SCHED, T0, abar, ddpm_chain_by_hand, draw, gens
from jobs import generate as generate_images
from stubs import PATTERN, SIZE, FakeFit, StubUNet, eps_linear

from tdpm_dip.data import make_sprites
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, paper, run
from tdpm_dip.models import build_unet
from tdpm_dip.noise import image_generators, make_scheduler, randn
from tdpm_dip.sampling import EpsModel, ddim_chain


def test_generate_ddpm_is_the_full_chain_from_noise_by_hand(make_ctx: Callable[..., Context]) -> None:
    """`generate --method ddpm`: x_T from image i's generator at the DDPM's size, then all T = 1000 posterior steps
    on the same generator (the stub: eps = c x, so every step is known by hand)."""
    unet = StubUNet(base=0.01, per_step=1e-4)
    seeds = [2, 3, 4]
    res = run(make_ctx(unet, batch_size=2), "generate", "unconditional", "ddpm", Job(tuple(seeds)))
    g = gens(seeds)
    expected = ddpm_chain_by_hand(StubUNet(base=0.01, per_step=1e-4), draw((3, SIZE, SIZE), g), 1000, g)
    assert res.images.shape == (3, 3, SIZE, SIZE)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-5)
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("ddpm", "unconditional", 1000, 1000)
    assert unet.timesteps == list(range(999, -1, -1)) * 2  # two batches (2 + 1 images)


def test_generate_ddim_draws_x_T_then_steps_with_the_jobs_eta(make_ctx: Callable[..., Context]) -> None:
    """`generate --method ddim`: x_T from image i's generator, then DDIM in job.ddim_steps calls (default: 110, the
    cost of TDPM-DIP) with job.eta, in batches; eta = 1 draws its step noise from the same generators."""
    seeds = (5, 6, 7)
    for eta in (0.0, 1.0):
        unet = eps_linear(1e-3)
        res = run(make_ctx(unet, batch_size=2), "generate", "unconditional", "ddim", Job(seeds, ddim_steps=3, eta=eta))
        g = image_generators(seeds)
        x_T = randn((3, SIZE, SIZE), g)
        expected = ddim_chain(EpsModel(eps_linear(1e-3), SCHED), x_T, 3, g, eta=eta)
        assert torch.allclose(res.images, expected, rtol=0, atol=1e-6), eta
        assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("ddim", "unconditional", 3, 3)
        assert res.info == {"ddim_steps": 3} and unet.timesteps == [999, 666, 332] * 2  # "trailing" spacing
    res = run(make_ctx(batch_size=4), "generate", "unconditional", "ddim", Job((0,)))
    assert res.nfe == 110 and res.info == {"ddim_steps": 110}


def test_generate_tdpm_dip_fits_the_reference_target_then_runs_the_chain(
    monkeypatch: pytest.MonkeyPatch, make_ctx: Callable[..., Context]
) -> None:
    """Generation under the paper protocol: x_T = sqrt(abar_T) x0_i + sqrt(1 - abar_T) z_i from reference image i
    and z_i (image i's first draw), G fitted to it (no reference curves), then T_trunc steps on the same generator;
    T_trunc = 0 returns G(z). Cost: DIP iterations + T_trunc."""
    fake = FakeFit()
    monkeypatch.setattr(paper, "fit", fake)  # generation's TDPM-DIP is the paper protocol's pipeline
    reference = make_sprites(3, SIZE, seed=1).images
    seeds = [4, 5]
    unet = eps_linear()
    res = run(make_ctx(unet), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference))
    g = gens(seeds)
    z = draw((3, SIZE, SIZE), g)
    target = math.sqrt(abar(T0)) * reference[:2] + math.sqrt(1 - abar(T0)) * z
    call = fake.calls[0]
    assert call["seeds"] == seeds and call["reference"] is None and torch.equal(call["z"], z)
    assert torch.allclose(call["target"], target, rtol=0, atol=1e-6)
    expected = ddpm_chain_by_hand(eps_linear(), call["target"] + 0.1 * PATTERN, T0, g)
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6) and unet.timesteps == list(range(T0 - 1, -1, -1))
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("tdpm-dip", "paper", 100 + T0, 100 + T0)
    assert res.seconds >= 100.0 and res.dip is not None and res.dip.seconds == 100.0
    assert set(res.info) == {"t_trunc", "dip_output"} and res.info["t_trunc"] == T0
    assert torch.equal(res.info["dip_output"], call["target"] + 0.1 * PATTERN)

    unet = eps_linear()
    res = run(make_ctx(unet), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference, t_trunc=0))
    assert torch.equal(res.images, fake.calls[-1]["target"] + 0.1 * PATTERN) and unet.timesteps == []
    assert res.reverse_steps == res.nfe == 100 and res.info["t_trunc"] == 0
    for ref in (None, reference[:1]):
        with pytest.raises(UserError) as e:
            run(make_ctx(), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=ref))
        assert str(e.value) == (
            "TDPM-DIP generation follows the paper protocol: it needs --reference-data with at "
            "least --n images (each output reconstructs one of them)"
        )
    run(make_ctx(), "generate", "paper", "tdpm-dip", Job(tuple(seeds), reference=reference[:2]))


def test_image_i_depends_only_on_seed_i(make_ctx: Callable[..., Context]) -> None:
    unet = build_unet("tiny", seed=0, sample_size=8)
    s = make_scheduler("cosine")
    ctx1 = make_ctx(unet, s, batch_size=1)
    ctx3 = make_ctx(unet, s, batch_size=3)
    a = generate_images(ctx1, "ddim", [10, 11, 12], ddim_steps=4)
    b = generate_images(ctx3, "ddim", [10, 11, 12], ddim_steps=4)
    c = generate_images(ctx3, "ddim", [11], ddim_steps=4)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert torch.allclose(c.images[0], a.images[1], atol=1e-5)
    x_T = randn((3, 8, 8), image_generators([10]))
    d = ddim_chain(EpsModel(unet, s), x_T, 4, image_generators([10]))
    assert d.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_truncated_ddpm_refuses_a_chain_from_pure_noise(make_ctx: Callable[..., Context], method: str) -> None:
    """A DDPM trained on levels 1..500 cannot start at level 1000: one line naming the method, the levels and the
    way out (amortized TDPM starts at T_trunc); a DDPM of every level runs."""
    with pytest.raises(UserError) as e:
        run(make_ctx(levels=(1, 500)), "generate", "unconditional", method, Job((0,), ddim_steps=2))
    assert str(e.value) == (
        f"--method {method} starts a chain from pure noise from level 1000, but this DDPM was trained on levels "
        "1..500 only (a truncated diffusion model): use --method tdpm with its generator"
    )
    assert run(make_ctx(levels=(1, 1000)), "generate", "unconditional", "ddim", Job((0,), ddim_steps=2)).nfe == 2

"""Noise levels and schedules (noise.py): the report's level convention, the published schedules, sigma -> level,
the level checks and their one-line messages, and the per-image random streams."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from by_hand import SCHED, cosine_abar, linear_abar

import tdpm_dip
from tdpm_dip.errors import UserError
from tdpm_dip.noise import (
    abar,
    add_noise,
    check_level,
    check_t_trunc,
    image_generators,
    make_scheduler,
    num_levels,
    q_sample,
    randn,
    rescale,
    sigma_to_level,
)

# ------------------------------------------------------------------------------------------ levels


def test_noise_levels_follow_the_report_convention() -> None:
    s = make_scheduler("linear")
    assert abar(s, 0) == 1.0
    assert abar(s, 1) == pytest.approx(float(s.alphas_cumprod[0]))
    assert abar(s, 600) == pytest.approx(float(s.alphas_cumprod[599]))
    y = torch.full((1, 3, 2, 2), 0.5)
    assert torch.equal(rescale(s, y, 600), math.sqrt(float(s.alphas_cumprod[599])) * y)
    assert torch.allclose(rescale(s, rescale(s, y, 10), 600, 10), rescale(s, y, 600), atol=1e-7)
    assert torch.equal(rescale(s, y, 0), y)
    x0, eps = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.allclose(q_sample(s, x0, 0, eps), x0)


def test_level_checks_accept_exactly_their_range_and_say_so() -> None:
    """A noise level is an integer in [0, T]; T_trunc one in [0, T - 1]. The messages are what the CLI prints."""
    s = make_scheduler("linear", 100)
    cases = [
        (check_level, (0, 1, 99, 100), (-1, 101, 2.0), "t must be an integer in [0, 100]"),
        (check_t_trunc, (0, 1, 98, 99), (-1, 100, 5.0), "T_trunc must be an integer in [0, 99]"),
    ]
    for check, good, bad, message in cases:
        for t in good:
            assert check(s, t) == t
        for t in bad:
            with pytest.raises(UserError) as e:
                check(s, t)  # type: ignore[arg-type]
            assert str(e.value) == f"{message}, got {t}"
    with pytest.raises(UserError) as e:
        check_level(s, 101, "--t-noisy")
    assert str(e.value) == "--t-noisy must be an integer in [0, 100], got 101"


# ------------------------------------------------------------------------------------------ schedules


def test_schedulers_are_the_published_schedules() -> None:
    """linear (the default) is Ho et al.'s 1000-step schedule, cosine Nichol and Dhariwal's; both clip the predicted
    x0 to [-1, 1] and predict eps; any T is honoured."""
    for sched, expected in (
        (make_scheduler(), linear_abar()),
        (make_scheduler("linear"), linear_abar()),
        (make_scheduler("cosine"), cosine_abar()),
        (make_scheduler("linear", 50), linear_abar(50)),
        (make_scheduler("squaredcos_cap_v2", 20), cosine_abar(20)),
    ):
        assert num_levels(sched) == len(expected)
        assert torch.allclose(sched.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
        assert sched.config.clip_sample is True and sched.config.prediction_type == "epsilon"
    with pytest.raises(UserError) as e:
        make_scheduler("quadratic")
    assert str(e.value) == "unknown schedule 'quadratic'; choose linear or cosine"


def test_make_scheduler_config_is_the_shipped_checkpoints() -> None:
    """What training writes into a checkpoint's scheduler/ (a DDPMPipeline folder that diffusers reads) is the
    configuration of the shipped DDPMs, key for key: variance_type "fixed_small", clip_sample, epsilon, linear betas."""
    config = dict(make_scheduler().config)
    paths = sorted((Path(tdpm_dip.__file__).parent / "weights").glob("*/scheduler/scheduler_config.json"))
    assert "ddpm-sprites32" in [p.parts[-3] for p in paths]
    for path in paths:
        shipped = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        assert {k: config[k] for k in shipped} == shipped, path
    assert config["variance_type"] == "fixed_small"


# ------------------------------------------------------------------------------------------ sigma -> level


def test_sigma_maps_to_matching_noise_to_signal_ratio() -> None:
    for name in ("linear", "cosine"):
        s = make_scheduler(name)
        levels = [sigma_to_level(s, sig) for sig in (15, 25, 50)]
        assert levels == sorted(levels) and len(set(levels)) == 3
        for sig, t in zip((15, 25, 50), levels):
            a = abar(s, t)
            assert (1 - a) / a == pytest.approx((2 * sig / 255) ** 2, rel=0.1)
    # anchors.md: sigma 25 -> t 56 in 0-based indexing, i.e. level 57 in the report's.
    assert sigma_to_level(make_scheduler("linear"), 25) == 57
    with pytest.raises(UserError):
        sigma_to_level(make_scheduler("linear"), 0)
    with pytest.raises(UserError):
        sigma_to_level(make_scheduler("linear"), 1000)


def test_sigma_levels_of_both_schedules_by_hand() -> None:
    """t* is the level whose (1 - abar) / abar is closest to (2 sigma / 255)^2, on the schedule given."""
    for name, ac in (("linear", linear_abar()), ("cosine", cosine_abar())):
        ratio = (1 - ac) / ac
        for sigma in (1.0, 5.0, 25.0, 80.0, 255.0):
            expected = int((ratio - (2 * sigma / 255) ** 2).abs().argmin()) + 1
            assert sigma_to_level(make_scheduler(name), sigma) == expected, (name, sigma)


def test_sigma_to_level_says_what_sigma_must_be() -> None:
    """The exact one-line message: a noise std outside (0, 255] names "sigma"."""
    for bad in (0, 256.0):
        with pytest.raises(UserError) as e:
            sigma_to_level(SCHED, bad)
        assert str(e.value) == f"sigma must be in (0, 255] (noise std on the 0..255 scale), got {bad}"


# ------------------------------------------------------------------------------------------ per-image random streams


def test_image_generators_and_randn_draw_per_image_streams() -> None:
    """Row i of randn is torch.randn from seed i (on the CPU by default), whatever the other seeds."""
    g = image_generators([5, 7])
    assert [x.device.type for x in g] == ["cpu", "cpu"] and [x.initial_seed() for x in g] == [5, 7]
    x = randn((2, 3), image_generators(range(4, 7)))
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    for i, s in enumerate((4, 5, 6)):
        assert torch.equal(x[i], torch.randn((2, 3), generator=torch.Generator().manual_seed(s)))


def test_add_noise_takes_sigma_from_0_to_255() -> None:
    """sigma 0 is a noise-free 8-bit file (only the rounding), fractional and 255 are allowed; outside [0, 255] a
    one-line error."""
    x = torch.linspace(-1, 1, 3 * 4 * 4).view(1, 3, 4, 4)
    assert torch.equal(add_noise(x, 0.0, [1]), torch.round((x + 1) * 127.5) / 127.5 - 1)
    for ok in (0.5, 255.0):
        assert add_noise(x, ok, [1]).shape == x.shape
    for bad in (-0.5, 255.5):
        with pytest.raises(UserError, match=r"sigma must be in \[0, 255\]"):
            add_noise(x, bad, [1])

"""Restoration on a tiny DDPM: every method keeps what the observation says, image i depends on seed i only,
the chain's data step, native sizes, the API, `tdpm-dip restore` and the app's handler."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run as run_cli
from click.testing import CliRunner
from PIL import Image
from stubs import tiny_restorer

from tdpm_dip import Restorer, registry
from tdpm_dip.cli import cli
from tdpm_dip.data import make_sprites
from tdpm_dip.dip import DIPConfig
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, run_restore
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import abar, image_generators, make_scheduler, q_sample, randn
from tdpm_dip.operators import Downsample, Inpaint, make_mask
from tdpm_dip.sampling import EpsModel, ddim_step, diffpir_step, sample, spaced_levels

SIZE = 16
NETWORK = ("tdpm-dip", "ccdf", "ddnm", "diffpir", "tdpm-dip-nodc")


@pytest.fixture(scope="module")
def ctx(make_ctx: Callable[..., Context]) -> Context:
    return make_ctx(
        build_unet("tiny", seed=0, sample_size=SIZE),
        make_scheduler("linear"),
        DIPConfig(preset="dip-tiny", iters=3, lr=1e-3, input_noise=1.0, average=0.9),
        batch_size=2,
        restorer=tiny_restorer(),
    )


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    # Inside [-0.8, 0.8]: bicubic overshoot stays inside [-1, 1], so the clamped outputs can match y exactly.
    return 0.8 * make_sprites(3, SIZE, seed=2).images


def _jobs(clean: torch.Tensor) -> dict[str, Job]:
    sr = Downsample(2, SIZE, SIZE)
    inp = Inpaint(torch.stack([make_mask("random:0.5", SIZE, SIZE, s) for s in range(3)]))
    opts = {"samples": 2, "ddim_steps": 3, "t_trunc": 20}
    return {
        "sr": Job((0, 1, 2), observed=sr.A(clean), operator=sr, **opts),
        "inpaint": Job((0, 1, 2), observed=inp.A(clean), operator=inp, **opts),
    }


@pytest.mark.parametrize("task", ["sr", "inpaint"])
def test_every_method_keeps_the_observation_and_its_seeds(ctx: Context, clean: torch.Tensor, task: str) -> None:
    job = _jobs(clean)[task]
    assert job.operator is not None and job.observed is not None
    errors = {}
    for m in registry.methods("restore", "blind", operator=task):
        res = run_restore(ctx, m.name, job)
        assert res.images.shape == clean.shape and torch.isfinite(res.images).all(), m.name
        assert res.protocol == "blind"
        errors[m.name] = float((job.operator.A(res.images) - job.observed).abs().max())
        if task == "inpaint" and m.name != "tdpm-dip-nodc":  # the data step keeps every known pixel
            assert errors[m.name] < 1e-6, m.name
        # image 2 alone, with its own seed: the same output (seeds per image, whatever the batch)
        alone = run_restore(ctx, m.name, job.part(slice(2, 3)))
        assert torch.allclose(alone.images[0], res.images[2], atol=1e-5), m.name
    # super-resolution: the untrained network fills A's null space with values beyond [-1, 1], and the clamp of
    # the saved image moves A x off y a little; without the data step it is far off
    for m in ("tdpm-dip", "ccdf", "ddnm", "diffpir"):
        assert errors[m] < errors["tdpm-dip-nodc"] / 2, errors


def test_nfe_is_counted_from_the_chain(ctx: Context, clean: torch.Tensor) -> None:
    job = _jobs(clean)["sr"]
    assert run_restore(ctx, "ccdf", job).nfe == 2 * len(spaced_levels(20, 3)) - 2
    assert run_restore(ctx, "ddnm", job).nfe == 3  # one chain from pure noise
    assert run_restore(ctx, "tdpm-dip", job).nfe == ctx.dip.iters + 2 * 3
    assert run_restore(ctx, "bicubic", job).nfe == 0


def test_full_chains_refuse_a_truncated_ddpm(ctx: Context, clean: torch.Tensor) -> None:
    import dataclasses

    truncated = dataclasses.replace(ctx, levels=(1, 200))
    with pytest.raises(UserError, match="trained on levels 1..200"):
        run_restore(truncated, "ddnm", _jobs(clean)["sr"])
    with pytest.raises(UserError, match="T_trunc"):
        run_restore(truncated, "ccdf", dataclasses.replace(_jobs(clean)["sr"], t_trunc=300))


def test_sampler_step_is_ddim_and_the_x0_step_is_applied(ctx: Context) -> None:
    """One step by hand: x_s = sqrt(abar_s) x0' + sqrt(1 - abar_s) eps for eta = 0, with x0' = x0_step(x0)."""
    model = EpsModel(ctx.unet, ctx.scheduler)
    x = randn((3, SIZE, SIZE), image_generators([0]))
    seen: list[int] = []

    def step(x0: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        return x0 * 0.5

    out = sample(model, x, [30, 10], image_generators([1]), rule=ddim_step(0.0), x0_step=step)
    a30, a10 = abar(ctx.scheduler, 30), abar(ctx.scheduler, 10)
    eps = model.eps(x, 30)
    x0 = ((x - math.sqrt(1 - a30) * eps) / math.sqrt(a30)).clamp(-1, 1) * 0.5
    assert seen == [30]
    assert torch.allclose(out, math.sqrt(a10) * x0 + math.sqrt(1 - a10) * eps, atol=1e-5)
    assert spaced_levels(10, 4) == [10, 8, 5, 2, 0] and spaced_levels(3, 10) == [3, 2, 1, 0]
    # zeta = 1 with a projection onto a full mask returns the observation itself
    y = torch.zeros_like(x)
    full = Inpaint(torch.ones(1, 1, SIZE, SIZE))
    start = q_sample(ctx.scheduler, y, 20, randn((3, SIZE, SIZE), image_generators([2])))
    got = sample(
        model,
        start,
        [20, 10, 0],
        image_generators([3]),
        rule=diffpir_step(1.0),
        x0_step=lambda a, t: full.project(a, y),
    )
    assert torch.equal(got, y)


def test_native_sizes_are_padded_and_cropped(ctx: Context) -> None:
    x = 0.8 * make_sprites(1, 24, seed=1).images[:, :, :22, :18]
    sr = Downsample(2, 22, 18)
    res = run_restore(ctx, "ccdf", Job((0,), observed=sr.A(x), operator=sr, samples=1, ddim_steps=2, t_trunc=10))
    assert res.images.shape[-2:] == (22, 18)
    # consistent up to the clamp and the replicated border the padded operator saw
    assert float((sr.A(res.images) - sr.A(x)).abs().mean()) < 0.02
    m = make_mask("box", 13, 10, 0)[None]
    res = run_restore(
        ctx,
        "ccdf",
        Job((0,), observed=Inpaint(m).A(x[..., :13, :10]), operator=Inpaint(m), samples=1, ddim_steps=2, t_trunc=10),
    )
    assert res.images.shape[-2:] == (13, 10)
    assert torch.equal(res.images * m, x[..., :13, :10] * m)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), folder)
    return str(folder)


def test_api_super_resolve_and_inpaint(tiny: str) -> None:
    r = Restorer.from_pretrained(tiny, device="cpu", dtype="fp32", dip_preset="dip-tiny", dip_iters=2)
    low = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = r.super_resolve(low, scale=2, method="ccdf", samples=1, ddim_steps=2)
    assert out.images[0].shape == (18, 22, 3) and out.images[0].dtype == np.uint8
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    out = r.inpaint(img, mask, method="tdpm-dip", samples=1, ddim_steps=2)
    assert isinstance(out.images[0], Image.Image) and out.nfe == 2 + 2
    known = np.asarray(out.images[0])[:, :8]
    assert np.array_equal(known, np.asarray(img)[:, :8])
    with pytest.raises(UserError, match="does not restore"):
        r.super_resolve(low, method="biharmonic")
    with pytest.raises(UserError, match="scale"):
        r.super_resolve(low, scale=3)


def test_cli_restore_writes_outputs_and_scores(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    for i, x in enumerate(make_sprites(2, SIZE, seed=4).images):
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(clean / f"s{i}.png")
    out = tmp_path / "out"
    args = [
        "restore",
        "--task",
        "inpaint",
        "--model",
        tiny,
        "--clean",
        str(clean),
        "--mask-kind",
        "random:0.5",
        "--method",
        "biharmonic",
        "--method",
        "ccdf",
        "--samples",
        "1",
        "--steps",
        "2",
        "--dip-preset",
        "dip-tiny",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["method"] for row in metrics["rows"]] == ["biharmonic", "ccdf"]
    assert all(row["PSNR"] > 0 for row in metrics["rows"])
    for d in ("observed", "mask", "biharmonic", "ccdf"):
        assert sorted(p.name for p in (out / d).iterdir()) == ["s0.png", "s1.png"]
    assert (out / "comparison.png").is_file()
    # the observation's known pixels come back unchanged
    m = np.asarray(Image.open(out / "mask" / "s0.png"))[..., 0] > 127
    assert np.array_equal(
        np.asarray(Image.open(out / "ccdf" / "s0.png"))[m], np.asarray(Image.open(clean / "s0.png"))[m]
    )
    # bad input: one line, exit 2, nothing written
    for bad, msg in [
        (["--task", "sr", "--scale", "3", "--input", str(clean)], "scale"),
        (["--task", "sr", "--scale", "8", "--input", str(clean)], "scale"),
        (["--task", "inpaint", "--input", str(clean)], "--mask"),
        (["--task", "inpaint", "--clean", str(clean), "--mask-kind", "ring"], "mask-kind"),
        (["--task", "sr", "--input", str(clean), "--max-pixels", "100"], "limit"),
        (["--task", "sr", "--input", str(clean), "--method", "biharmonic"], "does not restore"),
        (["--task", "sr", "--input", str(tmp_path / "nope")], "no such file"),
    ]:
        dest = tmp_path / "bad"
        code, _, err = run_cli(["restore", "--model", tiny, "--device", "cpu", *bad, "--out", dest], capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and not dest.exists(), (bad, err)


def test_restore_interrupt_keeps_finished_images_and_resume_computes_the_rest(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    for i, x in enumerate(make_sprites(4, SIZE, seed=5).images):
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(clean / f"s{i}.png")
    args = ["restore", "--task", "sr", "--scale", "2", "--model", tiny, "--clean", clean, "--method", "bicubic"]
    args += ["--method", "ccdf", "--samples", "1", "--steps", "2", "--device", "cpu", "--batch-size", "1"]
    assert run_cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    real = Restorer.restore_tensors
    seen: list[int] = []

    def counted(stop: int) -> Callable[..., object]:
        def call(self: Restorer, observed: list, *a: object, **k: object) -> object:
            if len(seen) == stop:
                raise KeyboardInterrupt  # Ctrl-C inside the third image's first method
            seen.append(len(observed))
            return real(self, observed, *a, **k)  # type: ignore[arg-type]

        return call

    monkeypatch.setattr(Restorer, "restore_tensors", counted(4))
    # an interrupted --overwrite of a finished run leaves that run as it was, byte for byte
    before = {p: p.read_bytes() for p in sorted((tmp_path / "whole").rglob("*")) if p.is_file()}
    code, _, err = run_cli([*args, "--seed", "3", "--overwrite", "--out", tmp_path / "whole"], capsys)
    assert code == 130 and "as they were" in err, err
    assert {p: p.read_bytes() for p in sorted((tmp_path / "whole").rglob("*")) if p.is_file()} == before
    seen.clear()
    code, _, err = run_cli([*args, "--out", tmp_path / "o"], capsys)
    assert code == 130 and "2 of 4 images finished" in err and "--resume" in err, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (
        metrics["complete"] is False and [e["status"] for e in metrics["images"]] == ["done"] * 2 + ["not computed"] * 2
    )
    assert sorted(p.name for p in (tmp_path / "o" / "ccdf").iterdir()) == ["s0.png", "s1.png"]
    assert [r["n"] for r in metrics["rows"]] == [2, 2] and all(r["PSNR"] > 0 for r in metrics["rows"])
    # --resume with other options refuses, naming the option; with the same ones it computes only the rest
    code, _, err = run_cli([*args, "--seed", "1", "--resume", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "made with seed 0, not 1" in err, err
    other = tmp_path / "other"  # a folder that holds no restore run is not replaced
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli([*args, "--resume", "--out", other], capsys)
    assert code == 2 and "holds no restore run" in err and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    seen.clear()
    monkeypatch.setattr(Restorer, "restore_tensors", counted(99))
    code, _, err = run_cli([*args, "--resume", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert seen == [1] * 4  # two images, two methods each
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert (
        metrics["complete"] is True
        and [e["run"] for e in metrics["images"]] == ["earlier (--resume)"] * 2 + ["this"] * 2
    )
    for m in ("bicubic", "ccdf"):
        for i in range(4):
            assert (tmp_path / "o" / m / f"s{i}.png").read_bytes() == (
                tmp_path / "whole" / m / f"s{i}.png"
            ).read_bytes()
            assert metrics["images"][i][m]["PSNR"] == pytest.approx(whole["images"][i][m]["PSNR"])
    assert [r["PSNR"] for r in metrics["rows"]] == pytest.approx([r["PSNR"] for r in whole["rows"]])

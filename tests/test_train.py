"""Algorithm 1 (train.py): tiny UNet, 16x16 sprites, a few steps on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tdpm_dip.training.ddpm as train_mod
from tdpm_dip.errors import UserError
from tdpm_dip.training.ddpm import sample_timesteps, step_draws, train
from tdpm_dip.training.loop import TrainingDiverged, batch_indices, derive_seed, list_checkpoints
from tdpm_dip.training.options import TrainConfig


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        preset="tiny",
        size=16,
        steps=6,
        batch_size=4,
        warmup_steps=2,
        checkpoint_every=3,
        sample_every=0,
        n_samples=0,
        sample_steps=2,
        log_every=1,
    )
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(lr=float("nan")),
        dict(t_max=0),
        dict(t_max=1001),
        dict(preset="nope"),
        dict(schedule="quadratic"),
        dict(size=17),
        dict(size=4),
        dict(mixed_precision="fp8"),
        dict(ema_decay=1.0),
        dict(grad_clip=-1.0),
        dict(sample_steps=0),
        dict(warmup_steps=-1),
        dict(resume=True, overwrite=True),
        dict(fill="purple-ish"),
        dict(epochs=0),
    ],
)
def test_config_validation(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(UserError):
        tiny_cfg(tmp_path, tmp_path / "run", **bad)


def test_config_fields_have_help() -> None:
    from dataclasses import fields

    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f.name


def test_batch_larger_than_dataset(sprite_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="larger than the dataset"):
        train(tiny_cfg(sprite_dir, tmp_path / "run", batch_size=9), progress=False)


def test_nonempty_out_dir_refused(sprite_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        train(tiny_cfg(sprite_dir, tmp_path / "run"), progress=False)


# ---------------------------------------------------------------- randomness


def test_t_max_restricts_timesteps() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 10, g)
    assert t.min() == 0 and t.max() == 9  # levels 1..10 are diffusers timesteps 0..9
    full = sample_timesteps(4000, None, g)
    assert full.min() >= 0 and full.max() <= 999 and full.max() > 900
    _, t_step, _ = step_draws(0, 512, 8, seed=0, t_max=3, device=torch.device("cpu"))
    assert set(t_step.tolist()) == {0, 1, 2}


def test_batches_are_epoch_permutations_and_deterministic() -> None:
    n, b = 10, 3  # 3 batches per epoch, one image dropped
    epoch0 = torch.cat([batch_indices(i, n, b, seed=1) for i in range(3)])
    assert len(set(epoch0.tolist())) == 9
    assert torch.equal(batch_indices(4, n, b, seed=1), batch_indices(4, n, b, seed=1))
    assert not torch.equal(epoch0, torch.cat([batch_indices(i, n, b, seed=2) for i in range(3)]))
    a = step_draws(7, 4, 8, 0, None, torch.device("cpu"))
    c = step_draws(7, 4, 8, 0, None, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert derive_seed(0, "step", 1) != derive_seed(0, "step", 2) != derive_seed(0, "order", 1)


# ---------------------------------------------------------------- a short run and its outputs


@pytest.fixture(scope="module")
def short_run(sprite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("short") / "run"
    cfg = tiny_cfg(sprite_dir, out, steps=4, checkpoint_every=2, sample_every=2, n_samples=4, log_every=2)
    assert train(cfg, progress=False) == out / "model"
    return out


def test_short_run_writes_run_folder(short_run: Path) -> None:
    conf = json.loads((short_run / "config.json").read_text())
    assert conf["config"]["preset"] == "tiny" and conf["config"]["n_images"] == 8
    assert conf["device"] == "cpu" and conf["mixed_precision"] == "no" and "torch" in conf["versions"]
    lines = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert all(r["loss"] > 0 and "lr" in r and r["it_s"] > 0 for r in lines)
    assert sorted(p.name for p in (short_run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert [p.name for p in list_checkpoints(short_run)] == ["step_000002", "step_000004"]
    state = json.loads((short_run / "checkpoints" / "step_000004" / "training_state.json").read_text())
    assert state["step"] == 4 and state["ema"]["num_updates"] == 4
    assert not list(short_run.rglob("*.tmp")) and not list(short_run.rglob(".*"))


def test_export_loads_in_diffusers_and_samples(short_run: Path) -> None:
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(short_run / "model")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    # The export holds the EMA weights of the last step.
    ema = load_file(short_run / "checkpoints" / "step_000004" / "ema.safetensors")
    exported = pipe.unet.state_dict()
    assert all(torch.equal(ema[k], exported[k]) for k in ema)


def test_resume_refuses_changed_options(short_run: Path, sprite_dir: Path) -> None:
    cfg = tiny_cfg(sprite_dir, short_run, steps=4, checkpoint_every=2, lr=3e-4, resume=True)
    with pytest.raises(UserError, match="cannot resume"):
        train(cfg, progress=False)


def test_epochs_and_overwrite(sprite_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_cfg(sprite_dir, out, epochs=2, checkpoint_every=1, keep_checkpoints=3), progress=True)
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 4  # 2 epochs x 8 // 4
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000003", "step_000004"]
    # --overwrite starts a new run: the old run's checkpoints must not be picked up by a later --resume.
    train(tiny_cfg(sprite_dir, out, steps=1, overwrite=True), progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["step_000001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------- resume = uninterrupted


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(sprite_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(tiny_cfg(sprite_dir, full), progress=False)

    def stop_at_5(step: int) -> None:
        if step == 5:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(tiny_cfg(sprite_dir, cut), progress=False, callback=stop_at_5)
    assert [p.name for p in list_checkpoints(cut)] == ["step_000003"]
    train(tiny_cfg(sprite_dir, cut, resume=True), progress=False)

    for name in ("model.safetensors", "ema.safetensors", "training_state.safetensors"):
        a = load_file(full / "checkpoints" / "step_000006" / name)
        b = load_file(cut / "checkpoints" / "step_000006" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    # metrics of steps 4-5 logged before the interruption were dropped, then logged again once
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_nan_stops_and_keeps_last_good_checkpoint(
    sprite_dir: Path, tmp_path: Path, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_mod.diffusion_loss
    calls = {"n": 0, "t": []}

    def poisoned(model, scheduler, x0, t, eps):
        calls["n"] += 1
        calls["t"].append(t.clone())
        loss = real(model, scheduler, x0, t, eps)
        if calls["n"] < 5:
            return loss
        if what == "loss":
            return loss * float("nan")
        z = model.conv_in.weight.sum()
        return loss + 0 * torch.sqrt(z - z.detach())  # value unchanged, gradient NaN

    monkeypatch.setattr(train_mod, "diffusion_loss", poisoned)
    out = tmp_path / "run"
    # Poisoned from step 5, detected at the step-6 read (log_every=3), before step 6 is checkpointed.
    cfg = tiny_cfg(
        sprite_dir,
        out,
        steps=8,
        checkpoint_every=2,
        log_every=3,
        t_max=5,
        grad_clip=0.0 if what == "gradient norm" else 1.0,
    )
    with pytest.raises(TrainingDiverged, match=rf"{what} became nan at step 5; last good checkpoint: .*step_000004"):
        train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004"]
    assert not (out / "model").exists()
    assert int(torch.cat(calls["t"]).max()) <= 4  # t_max=5: diffusers timesteps 0..4 only
    weights = load_file(out / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------- several processes (accelerate / torchrun)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TDPM_SLOW"), reason="spawns 2 processes; set TDPM_SLOW=1")
def test_two_processes_match_one(sprite_dir: Path, tmp_path: Path) -> None:
    """The global batch is split over processes, and its draws do not depend on their number."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from tdpm_dip.training.ddpm import train\n"
        "from tdpm_dip.training.options import TrainConfig\n"
        f"train(TrainConfig(data={str(sprite_dir)!r}, out=sys.argv[1], preset='tiny', size=16, steps=4,\n"
        "    batch_size=4, warmup_steps=1, checkpoint_every=2, sample_every=0, n_samples=0, log_every=1),\n"
        "    progress=False)\n"
    )
    # accelerate needs ACCELERATE_USE_CPU to run distributed (gloo) on CPUs; on GPUs `accelerate launch` suffices.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "two")],
        check=True,
        env=env,
        capture_output=True,
    )
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_processes"] == 2
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step_000004" / name)
        b = load_file(tmp_path / "two" / "checkpoints" / "step_000004" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 4  # written once, not twice


# ---------------------------------------------------------------- truncated diffusion models


def test_a_truncated_ddpm_records_its_levels_and_refuses_pure_noise(
    sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--t-max 50 writes trained_levels.json (1..50); a fine-tune of it over levels 20..80 records 1..80; `generate`
    from pure noise with it is one error line, and the export without the file is a full model."""
    from cli_helpers import run as run_cli

    from tdpm_dip.models import LEVELS_FILE, trained_levels
    from tdpm_dip.noise import make_scheduler

    sched = make_scheduler("linear")
    trunc = train(tiny_cfg(sprite_dir, tmp_path / "trunc", steps=1, t_max=50), progress=False)
    assert json.loads((trunc / LEVELS_FILE).read_text()) == {"levels": [1, 50]}
    assert trained_levels(trunc, sched) == (1, 50)
    wider = train(tiny_cfg(sprite_dir, tmp_path / "ft", steps=1, init=str(trunc), t_min=20, t_max=80), progress=False)
    assert trained_levels(wider, sched) == (1, 80)
    # config.json names the preset a fresh network was built from, and none for a fine-tune (--init's network)
    assert json.loads((trunc.parent / "config.json").read_text())["config"]["preset"] == "tiny"
    # weights and checkpoints get an ordinary new file's permissions (safetensors writes 0600): others can load them
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for f in [*trunc.rglob("*.safetensors"), *(trunc.parent / "checkpoints").rglob("*.safetensors")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert json.loads((wider.parent / "config.json").read_text())["config"]["preset"] is None
    full = train(tiny_cfg(sprite_dir, tmp_path / "full", steps=1), progress=False)
    assert trained_levels(full, sched) == (1, 1000)
    (full / LEVELS_FILE).unlink()
    assert trained_levels(full, sched) == (1, 1000)  # a folder without the file: all levels

    for method in ("ddim", "ddpm"):
        out = tmp_path / f"gen-{method}"
        args = ["generate", "--model", trunc, "--method", method, "--n", "1", "--out", out, "--device", "cpu"]
        code, _, err = run_cli(args, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "trained on levels 1..50 only" in lines[0], err
        assert not out.exists()
    # A chain from a level above the trained ones (paper protocol at t 60) is refused; at t 40 it runs.
    clean = sprite_dir
    for t, ok in ((60, False), (40, True)):
        out = tmp_path / f"den-{t}"
        args = ["denoise", "--model", trunc, "--clean", clean, "--protocol", "paper", "--method", "ddpm"]
        code, _, err = run_cli(args + ["--t-noisy", str(t), "--n", "1", "--out", out, "--device", "cpu"], capsys)
        if ok:
            assert code == 0, err
        else:
            lines = [x for x in err.splitlines() if x.strip()]
            assert code == 2 and len(lines) == 1 and "chain from level 60" in lines[0] and "1..50 only" in lines[0]
            assert not out.exists()
    (trunc / LEVELS_FILE).write_text('{"levels": [0, 50]}')
    with pytest.raises(UserError, match="outside 1..1000"):
        trained_levels(trunc, sched)

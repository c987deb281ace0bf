"""Every user error is one line on stderr and exit code 2, Ctrl-C is exit code 130, and neither
leaves half-written outputs. Everything goes through `tdpm_dip.cli.main`, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from PIL import Image, ImageOps

from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.training.loop import list_checkpoints

SIZE = 16
# Cheap settings for commands that should succeed: the tiny DIP for a few iterations, no long chains.
FAST_DENOISE = ["--method", "dip", "--dip-preset", "dip-tiny", "--dip-iters", "3", "--sigma", "25"]
FAST_TRAIN = [
    "--preset",
    "tiny",
    "--size",
    str(SIZE),
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--warmup-steps",
    "0",
    "--checkpoint-every",
    "0",
    "--sample-every",
    "0",
    "--n-samples",
    "0",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return path


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and exactly one 'error:' line (progress bars may share stderr), no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


def files_under(path: Path) -> dict[str, bytes]:
    return (
        {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        if path.exists()
        else {}
    )


def assert_no_leftovers(folder: Path) -> None:
    names = [p.name for p in folder.rglob("*")]
    assert not [n for n in names if ".partial" in n or n.endswith(".tmp")], names


def image_folder(
    tmp_path: Path, sprite_dir: Path, extra: dict[str, Image.Image | bytes] | None = None, n: int = 2
) -> Path:
    """A folder with n good sprites plus `extra` files (PIL images or raw bytes)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(sprite_dir.glob("*.png"))[:n]:
        (folder / p.name).write_bytes(p.read_bytes())
    for name, obj in (extra or {}).items():
        if isinstance(obj, bytes):
            (folder / name).write_bytes(obj)
        else:
            obj.save(folder / name)
    return folder


def rgb(w: int = 24, h: int = 20) -> Image.Image:
    a = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


# ------------------------------------------------------------------------------------------ images


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty": (b"", "empty file"),
    "truncated": (_png_bytes(rgb(64, 64))[:200], "zz_bad.png"),
    "not_an_image": (b"this is a text file, not a picture\n" * 4, "not an image"),
    "tiny": (_png_bytes(rgb(5, 5)), "smaller than 8"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_is_a_one_line_error(
    kind: str, model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, fragment = BAD_IMAGES[kind]
    folder = image_folder(tmp_path, sprite_dir, {"zz_bad.png": data})
    code, _, err = run(["denoise", "--model", model, "--clean", folder, *FAST_DENOISE, "--out", tmp_path / "o"], capsys)
    assert_user_error(code, err, "zz_bad.png", fragment)
    assert files_under(tmp_path / "o") == {}


def test_skip_bad_skips_broken_images_in_training(
    sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    extra = {f"zz_{k}.png": v[0] for k, v in BAD_IMAGES.items()}
    folder = image_folder(tmp_path, sprite_dir, extra, n=4)
    code, _, err = run(["train", "--data", folder, "--out", tmp_path / "run", *FAST_TRAIN], capsys)
    assert_user_error(code, err, "--skip-bad")
    assert not list_checkpoints(tmp_path / "run")
    code, out, err = run(["train", "--data", folder, "--out", tmp_path / "run2", "--skip-bad", *FAST_TRAIN], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert cfg["config"]["n_images"] == 4  # the four broken files were skipped
    assert (tmp_path / "run2" / "model" / "unet" / "config.json").is_file()


def _modes() -> dict[str, Image.Image]:
    base = rgb(30, 20)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1))))
    a16 = (np.random.default_rng(1).random((20, 30)) * 65535).astype(np.uint16)
    return {
        "rgba.png": rgba,
        "gray.png": base.convert("L"),
        "palette.png": base.convert("P"),
        "gray16.png": Image.fromarray(a16),
        "huge.png": Image.new("RGB", (5000, 3000), (200, 30, 40)),
    }


def test_unusual_image_modes_and_sizes_work(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "modes"
    folder.mkdir()
    modes = _modes()
    for name, img in modes.items():
        img.save(folder / name)
    assert Image.open(folder / "gray16.png").mode.startswith("I")  # really 16-bit on disk
    code, out, err = run(
        ["denoise", "--model", model, "--clean", folder, *FAST_DENOISE, "--out", tmp_path / "o"], capsys
    )
    assert code == 0, err
    outputs = sorted(p.name for p in (tmp_path / "o" / "dip").glob("*.png"))
    assert outputs == sorted(modes)
    for p in (tmp_path / "o" / "dip").glob("*.png"):
        assert Image.open(p).size == (SIZE, SIZE)


# ------------------------------------------------------------------------------------------ paths


def test_missing_input_and_model(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        ["denoise", "--model", model, "--clean", tmp_path / "nope", *FAST_DENOISE, "--out", tmp_path / "o"], capsys
    )
    assert_user_error(code, err, "nope")
    code, _, err = run(
        ["denoise", "--model", tmp_path / "no_model", "--clean", tmp_path, *FAST_DENOISE, "--out", tmp_path / "o2"],
        capsys,
    )
    assert_user_error(code, err, "no_model")
    code, _, err = run(["train", "--data", tmp_path / "nope", "--out", tmp_path / "r", *FAST_TRAIN], capsys)
    assert_user_error(code, err, "nope")


def test_output_folder_that_cannot_be_created(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for cmd in (
        ["denoise", "--model", model, "--clean", sprite_dir, *FAST_DENOISE],
        ["generate", "--model", model, "--method", "ddim", "--ddim-steps", "2", "--n", "1"],
        ["train", "--data", sprite_dir, *FAST_TRAIN],
        ["demo", "--model", model, "--n", "1"],
    ):
        code, _, err = run([*cmd, "--out", blocker / "sub"], capsys)
        assert_user_error(code, err, "a_file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="running as root: chmod 0o500 does not stop root from writing"
)
def test_read_only_output_folder(model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(
            ["denoise", "--model", model, "--clean", sprite_dir, *FAST_DENOISE, "--out", ro / "o"], capsys
        )
        assert_user_error(code, err, "cannot write")
    finally:
        ro.chmod(0o700)


def test_existing_output_is_refused_unless_overwrite(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["denoise", "--model", model, "--clean", sprite_dir, "--n", "2", *FAST_DENOISE, "--out", out]
    code, _, err = run(args, capsys)
    assert_user_error(code, err, "not empty", "--overwrite")
    assert files_under(out) == {"mine.txt": b"keep me"}
    code, _, err = run([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "metrics.json").is_file() and (out / "mine.txt").read_text() == "keep me"
    code, _, err = run(["train", "--data", sprite_dir, *FAST_TRAIN, "--out", out], capsys)
    assert_user_error(code, err, "not empty")


# ------------------------------------------------------------------------------------------ models


def _break_model(model: Path, dest: Path, how: str) -> Path:
    import shutil

    shutil.copytree(model, dest)
    cfg_path = dest / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    if how == "no_unet":
        shutil.rmtree(dest / "unet")
    elif how == "beta_schedule":
        cfg["beta_schedule"] = "exotic"
    elif how == "v_prediction":
        cfg["prediction_type"] = "v_prediction"
    elif how == "not_a_scheduler":
        cfg = {"_class_name": "SomethingElse"}
    elif how == "channels":
        shutil.rmtree(dest / "unet")
        unet = build_unet("dip-tiny", seed=0, sample_size=SIZE)
        one = type(unet)(**{**dict(unet.config), "in_channels": 1, "out_channels": 1})
        save_ddpm(one, make_scheduler("linear"), dest)
    elif how == "bad_weights":
        for f in (dest / "unet").glob("*.safetensors"):
            f.write_bytes(b"garbage")
    cfg_path.write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    "how,fragment",
    [
        ("no_unet", "unet"),
        ("beta_schedule", "exotic"),
        ("v_prediction", "v_prediction"),
        ("not_a_scheduler", "scheduler"),
        ("channels", "channels"),
        ("bad_weights", "weights"),
    ],
)
def test_unusable_models_are_one_line_errors(
    how: str, fragment: str, model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = _break_model(model, tmp_path / "bad", how)
    code, _, err = run(
        ["denoise", "--model", bad, "--clean", sprite_dir, *FAST_DENOISE, "--out", tmp_path / "o"], capsys
    )
    assert_user_error(code, err, fragment)
    assert files_under(tmp_path / "o") == {}


def test_hub_id_offline_fails_fast(
    sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    code, _, err = run(
        [
            "denoise",
            "--model",
            "nobody-xyz/no-such-model",
            "--clean",
            sprite_dir,
            *FAST_DENOISE,
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert_user_error(code, err, "nobody-xyz/no-such-model")
    assert len(err.strip().splitlines()) == 1, err  # no library warnings around the message
    assert time.perf_counter() - t0 < 20


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "cmd,extra,fragment",
    [
        ("denoise", ["--n", "0"], "--n"),
        ("denoise", ["--symmetries", "9"], "--symmetries"),
        ("denoise", ["--symmetries", "0"], "--symmetries"),
        ("denoise", ["--n", "-3"], "--n"),
        ("denoise", ["--batch-size", "0"], "--batch-size"),
        ("denoise", ["--samples", "0", "--method", "tdpm-dip"], "--samples"),
        ("denoise", ["--dip-iters", "0"], "--dip-iters"),
        ("denoise", ["--dip-lr", "0"], "--dip-lr"),
        ("denoise", ["--dip-lr", "-1e-3"], "--dip-lr"),
        ("denoise", ["--sigma", "0"], "--sigma"),
        ("denoise", ["--sigma", "-5"], "--sigma"),
        ("denoise", ["--t-trunc", "1000", "--method", "tdpm-dip"], "T_trunc"),
        ("denoise", ["--protocol", "paper", "--t-trunc", "1000", "--method", "tdpm-dip"], "T_trunc"),
        ("generate", ["--n", "0"], "--n"),
        ("generate", ["--t-trunc", "1000", "--method", "tdpm-dip"], "T_trunc"),
        ("generate", ["--t-trunc", "-1", "--method", "tdpm-dip"], "T_trunc"),
        ("train", ["--steps", "0"], "--steps"),
        ("train", ["--steps", "-5"], "--steps"),
        ("train", ["--lr", "0"], "--lr"),
        ("train", ["--lr", "-1e-4"], "--lr"),
        ("train", ["--batch-size", "9"], "larger than the dataset"),
        ("demo", ["--n", "0"], "--n"),
        ("demo", ["--steps", "0"], "--steps"),
        ("demo", ["--sigma", "0"], "--sigma"),
    ],
)
def test_bad_numbers(
    cmd: str,
    extra: list[str],
    fragment: str,
    model: Path,
    sprite_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "o"
    base = {
        "denoise": ["denoise", "--model", model, "--clean", sprite_dir, *FAST_DENOISE],
        "generate": [
            "generate",
            "--model",
            model,
            "--method",
            "ddim",
            "--ddim-steps",
            "2",
            "--n",
            "2",
            "--reference-data",
            sprite_dir,
            "--dip-preset",
            "dip-tiny",
            "--dip-iters",
            "2",
        ],
        "train": ["train", "--data", sprite_dir, *FAST_TRAIN],
        "demo": ["demo", "--model", model],
    }[cmd]
    code, _, err = run([*base, *extra, "--out", out], capsys)  # later options win over FAST_* defaults
    assert_user_error(code, err, fragment)
    assert files_under(out) == {}


# ------------------------------------------------------------------------------------------ interrupts


def _interrupt(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    """Make module.name raise KeyboardInterrupt (as Ctrl-C would) when the command reaches it."""
    import importlib

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), name, boom)


@pytest.mark.parametrize("where", [("tdpm_dip.methods.dispatch", "run"), ("tdpm_dip.reporting", "comparison_figure")])
def test_interrupted_denoise_keeps_earlier_outputs(
    where: tuple[str, str],
    model: Path,
    sprite_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "o"
    args = ["denoise", "--model", model, "--clean", sprite_dir, "--n", "2", *FAST_DENOISE, "--out", out]
    code, _, err = run(args, capsys)
    assert code == 0, err
    before = files_under(out)
    # comparison_figure runs after the first images were staged: the stage must vanish with them.
    _interrupt(monkeypatch, *where)
    code, _, err = run([*args, "--dip-iters", "4", "--overwrite"], capsys)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert files_under(out) == before
    assert_no_leftovers(tmp_path)


def test_interrupted_clean_denoise_keeps_the_finished_images(
    model: Path, sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tdpm_dip.api import Denoiser

    args = ["denoise", "--model", model, "--clean", sprite_dir, "--n", "3", *FAST_DENOISE, "--method", "tdpm-dip"]
    args += ["--batch-size", "1"]
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    real, calls = Denoiser.run, []

    def counted(self: Denoiser, *a: object, **k: object) -> object:
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the second image's second method
        calls.append(1)
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Denoiser, "run", counted)
    out = tmp_path / "o"
    code, _, err = run([*args, "--out", out], capsys)
    assert code == 130 and "1 of 3 images finished" in err and "Traceback" not in err, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["status"] == "interrupted: 1 of 3 images done"
    assert [r["n"] for r in metrics["rows"]] == [1, 1] and [e["name"] for e in metrics["images"]] == ["sprite00000"]
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["images"][0] == whole["images"][0]  # the same image as in the uninterrupted run
    for m in ("dip", "tdpm-dip"):
        assert sorted(p.name for p in (out / m).iterdir()) == ["sprite00000.png"]
        assert (out / m / "sprite00000.png").read_bytes() == (tmp_path / "whole" / m / "sprite00000.png").read_bytes()
    assert_no_leftovers(tmp_path)


def test_interrupted_generate_keeps_earlier_outputs(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "g"
    args = ["generate", "--model", model, "--method", "ddim", "--ddim-steps", "2", "--n", "2", "--out", out]
    code, _, err = run(args, capsys)
    assert code == 0, err
    before = files_under(out)
    _interrupt(monkeypatch, "tdpm_dip.workflows.generate", "save_grid")  # after the images were staged
    code, _, err = run([*args, "--seed", "5", "--overwrite"], capsys)
    assert code == 130, err
    assert files_under(out) == before
    assert_no_leftovers(tmp_path)


def test_generate_interrupt_keeps_finished_images_and_resume_makes_the_rest(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tdpm_dip.api import Generator

    args = ["generate", "--model", model, "--method", "ddim", "--ddim-steps", "2", "--n", "3", "--batch-size", "1"]
    assert run([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    real, seen = Generator.generate, []

    def counted(stop: int):
        def call(self: Generator, n: int, *a: object, **k: object) -> object:
            if len(seen) == stop:
                raise KeyboardInterrupt  # Ctrl-C inside the third image
            seen.append(n)
            return real(self, n, *a, **k)  # type: ignore[arg-type]

        return call

    monkeypatch.setattr(Generator, "generate", counted(2))
    out = tmp_path / "o"
    code, _, err = run([*args, "--out", out], capsys)
    assert code == 130 and "2 of 3 images finished" in err and "--resume" in err, err
    result = json.loads((out / "result.json").read_text())
    assert result["complete"] is False and [e["status"] for e in result["images"]] == ["done", "done", "not computed"]
    assert (
        sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
        and (out / "grid.png").is_file()
    )
    # --resume with other options refuses, naming the option; with the same ones it makes only the rest
    code, _, err = run([*args, "--ddim-steps", "3", "--resume", "--out", out], capsys)
    assert code == 2 and "made with ddim_steps 2, not 3" in err, err
    seen.clear()
    monkeypatch.setattr(Generator, "generate", counted(99))
    code, _, err = run([*args, "--resume", "--out", out], capsys)
    assert code == 0 and seen == [1] and "3 images (2 made earlier)" in err, err
    result = json.loads((out / "result.json").read_text())
    assert result["complete"] is True and result["made_here"] == 1
    assert [e["run"] for e in result["images"]] == ["earlier (--resume)"] * 2 + ["this"]
    for i in range(3):
        name = f"images/{i:05d}.png"
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert_no_leftovers(tmp_path)


def test_interrupted_train_keeps_earlier_checkpoints(
    sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tdpm_dip.training.loop as train_mod

    out = tmp_path / "run"
    real = train_mod.write_json

    def write_json(path, obj):
        if Path(path).name == "training_state.json" and obj.get("step") == 4:
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(train_mod, "write_json", write_json)
    args = ["train", "--data", sprite_dir, *FAST_TRAIN, "--steps", "6", "--checkpoint-every", "2", "--out", out]
    code, _, err = run(args, capsys)
    assert code == 130, err
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    ckpt = files_under(out / "checkpoints" / "step_000002")
    assert {"model.safetensors", "ema.safetensors", "training_state.json"} <= set(ckpt)
    assert_no_leftovers(tmp_path)
    assert not (out / "model").exists()
    monkeypatch.undo()
    code, _, err = run([*args[:-2], "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(out)][-1] == "step_000006"
    assert (out / "model" / "unet" / "config.json").is_file()


def test_ctrl_c_on_a_real_process(sprite_dir: Path, tmp_path: Path) -> None:
    """SIGINT to a running `tdpm-dip train`: exit 130, finished checkpoints complete, nothing partial."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "tdpm_dip.cli",
        "train",
        "--data",
        str(sprite_dir),
        *FAST_TRAIN,
        "--steps",
        "100000",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "100",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The child starts with SIGINT's default disposition, as under a shell, so that Python installs its
    # KeyboardInterrupt handler even if this process was left ignoring SIGINT (an ignored signal is inherited).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 90
        while len(list_checkpoints(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert len(list_checkpoints(out)) >= 2, "no checkpoints within 90 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    for ck in list_checkpoints(out):
        assert {"model.safetensors", "ema.safetensors", "training_state.json", "training_state.safetensors"} <= {
            p.name for p in ck.iterdir()
        }
    assert_no_leftovers(tmp_path)


def test_denoise_overwrite_replaces_every_method_folder_and_runs_a_repeated_method_once(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / "a.png")
    out = tmp_path / "o"
    args = ["denoise", "--model", model, "--input", src, "--sigma", "25", "--device", "cpu", "--out", out]
    assert run([*args, "--method", "tweedie", "--method", "ensemble"], capsys)[0] == 0
    code, _, err = run([*args, "--method", "tweedie", "--method", "tweedie", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "metrics.json", "metrics.md", "noisy", "tweedie"]
    assert [r["method"] for r in json.loads((out / "metrics.json").read_text())["rows"]] == ["tweedie"]


def test_prepare_data_names_a_missing_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for source in ("/no/such/folder", "./missing", "no-such-folder"):
        code, _, err = run(["prepare-data", "--source", source, "--out", tmp_path / "o"], capsys)
        assert_user_error(code, err, "no such file or folder")
        assert not (tmp_path / "o").exists()


def test_generate_ddim_steps_above_the_levels_and_train_out_inside_data(
    model: Path, sprite_dir_factory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "g"
    args = ["generate", "--model", model, "--method", "ddim", "--n", "1", "--device", "cpu", "--out", out]
    code, _, err = run([*args, "--ddim-steps", "5000"], capsys)
    assert_user_error(code, err, "--ddim-steps must be in 1..1000")
    assert not out.exists()
    data = sprite_dir_factory(4, SIZE)
    for inside in (data / "run", data):
        code, _, err = run(["train", "--data", data, *FAST_TRAIN, "--out", inside, "--overwrite"], capsys)
        assert_user_error(code, err, "is inside --data")
    assert not (data / "run").exists()
    gen = ["train-generator", "--model", model, "--t-trunc", "5", "--objective", "distill", "--ddim-steps", "5000"]
    code, _, err = run([*gen, "--out", tmp_path / "gen"], capsys)
    assert_user_error(code, err, "--ddim-steps must be in [1, 1000]")


def test_inputs_inside_out_are_refused_and_resume_never_drops_finished_images(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    noisy = out / "noisy"  # the layout add-noise writes: denoise --out o would replace o/noisy
    noisy.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(noisy / f"{i}.jpg")
    before = files_under(noisy)
    den = ["denoise", "--model", model, "--sigma", "10", "--method", "tweedie", "--device", "cpu"]
    code, _, err = run([*den, "--input", noisy, "--out", out, "--overwrite"], capsys)
    assert_user_error(code, err, "is inside --out")
    sr = ["restore", "--model", model, "--task", "sr", "--scale", "2", "--method", "bicubic", "--device", "cpu"]
    code, _, err = run([*sr, "--input", noisy, "--out", out, "--overwrite"], capsys)
    assert_user_error(code, err, "is inside --out")
    assert files_under(noisy) == before  # the inputs untouched
    # a complete 3-image run; --resume with --n 2 would drop the third: refused, the run kept
    done = tmp_path / "done"
    assert run([*den, "--input", noisy, "--out", done], capsys)[0] == 0
    kept = files_under(done)
    code, _, err = run([*den, "--input", noisy, "--out", done, "--resume", "--n", "2"], capsys)
    assert_user_error(code, err, "would drop")
    assert files_under(done) == kept


def test_add_noise_reads_images_upright_and_checks_its_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show
    img.save(src / "r.jpg", exif=exif.tobytes(), quality=95)
    code, _, err = run(["add-noise", "--input", src, "--sigma", "5", "--size", "40", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    with Image.open(src / "r.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float64)  # 24 wide, 40 high
    clean = np.asarray(Image.open(tmp_path / "o" / "clean" / "r.png"), dtype=np.float64)
    # padded to a square: the upright image's 40 rows fill the height, its 24 columns sit in the middle
    assert np.abs(clean[:, 8:32] - upright).mean() < 3, np.abs(clean[:, 8:32] - upright).mean()
    for size in ("3", "100000"):
        code, _, err = run(
            ["add-noise", "--input", src, "--sigma", "5", "--size", size, "--out", tmp_path / "b"], capsys
        )
        assert_user_error(code, err, "--size must be in 8..4000")

"""`tdpm-dip demo`, shrunk to seconds: the report, its figures and both protocols' rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import DEMO_SHRUNK as SHRUNK
from cli_helpers import run

from tdpm_dip import registry
from tdpm_dip.methods import Context
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler


def check_report(run_dir: Path, stdout: str, from_noise: bool = True) -> str:
    """The report's figures and rows; `from_noise`: its DDPM was trained on every level (a DDPM-from-noise row)."""
    report = run_dir / "report.md"
    assert stdout.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"generation.png", "denoise_paper.png", "denoise_blind.png"} <= set(figures)
    for f in figures:
        assert (run_dir / f).is_file() and (run_dir / f).stat().st_size > 0, f
    rows = [ln for ln in text.splitlines() if ln.startswith("| denoising |")]
    blind = [m.name for m in registry.methods("denoise", "blind") if m.extra is None]  # the demo runs these
    assert [r.split("|")[3].strip() for r in rows if "| paper |" in r] == ["ddpm", "dip", "tdpm-dip"]
    assert [r.split("|")[3].strip() for r in rows if "| blind |" in r] == blind
    assert any(ln.startswith("| generation | unconditional | ddpm") for ln in text.splitlines()) == from_noise
    assert any(ln.startswith("| generation | paper | tdpm-dip") for ln in text.splitlines())
    assert "oracle" in text and "blind" in text  # the protocols are explained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {r["protocol"] for r in metrics["denoising"]} == {"paper", "blind"}
    blind_rows = {r["method"]: r for r in metrics["denoising"] if r["protocol"] == "blind"}
    assert len({round(r["input PSNR"], 6) for r in blind_rows.values()}) == 1  # every method saw the same noisy images
    assert blind_rows["tweedie"]["NFE"] == 1 and blind_rows["ensemble"]["NFE"] == 8
    assert [p["phase"] for p in metrics["phases"]][-1].startswith("denoising, blind")
    assert not [p for p in run_dir.parent.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    return text


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default demo: a short training run (Algorithm 1) beside the embedded default DDPM, which makes
    the generation and denoising figures; the report says which model made which."""
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", *SHRUNK, "--out", out], capsys)
    assert code == 0, err
    text = check_report(out, stdout, from_noise=False)  # the embedded DDPM is truncated: levels 1..500
    assert "## Training" in text and (out / "train" / "model" / "unet" / "config.json").is_file()
    assert "embedded default DDPM" in text and "levels 1..500 only" in text
    # The report's commands name the demo's model: denoise's own default is another one.
    from tdpm_dip.embedded import default_ddpm

    reproduce = text[text.index("## Reproduce single steps") :].split("```")[1]
    assert reproduce.count(f"--model {default_ddpm('generate')} ") == 2, reproduce
    assert any(ln.startswith("| generation | unconditional | tdpm") for ln in text.splitlines())
    assert "denoising, paper protocol (t=3)" in err  # --t-noisy given: it wins
    assert any(ln.startswith("| generation | unconditional | ddim-50, 3-step model") for ln in text.splitlines())
    # ... but not in the figure, where it would be a row of pure noise. Rows: held-out, training, DIP output,
    # TDPM-DIP, amortized TDPM.
    assert "Not in the figure, only in the table: DDIM 50, the 3-step model" in text
    from PIL import Image

    with Image.open(out / "generation.png") as im:
        assert im.height == 2 + 5 * (32 * 4 + 2)  # 32 px cells upscaled 4x, 2 px apart
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["size_used"] == 32  # the embedded model's size, not a training choice
    assert "embedded" in metrics["config"]["model_used"]
    assert len(list((out / "data" / "test").glob("*.png"))) == 2
    assert len(list((out / "data" / "train").glob("*.png"))) == 16
    for phase in ("data", "load model", "train", "generation: amortized TDPM", "report"):
        assert f"] {phase}" in err  # each phase announces itself and its time on stderr

    # The embedded model fixes the size: another one is refused in one line, before anything is written.
    code, _, err = run(["demo", *SHRUNK, "--size", "16", "--out", tmp_path / "other"], capsys)
    assert code == 2 and "--no-embedded" in err and not (tmp_path / "other").exists()


def test_demo_trains_its_own_model_and_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    own = [*SHRUNK, "--no-embedded", "--size", "16"]
    code, stdout, err = run(["demo", *own, "--out", out], capsys)
    assert code == 0, err
    text = check_report(out, stdout)
    assert "embedded default DDPM" not in text and str(out / "train" / "model") in text
    assert json.loads((out / "metrics.json").read_text())["config"]["size_used"] == 16

    # An existing run folder is refused, then replaced with --overwrite (same data files, no strays).
    code, _, err = run(["demo", *own, "--out", out], capsys)
    assert code == 2 and "--overwrite" in err
    code, stdout, err = run(["demo", *own, "--train-images", "17", "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert len(list((out / "data" / "train").glob("*.png"))) == 17


def test_demo_with_a_given_model_and_data(sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    out = tmp_path / "demo"
    code, stdout, err = run(
        ["demo", *SHRUNK, "--size", "16", "--model", model, "--data", sprite_dir, "--out", out], capsys
    )
    assert code == 0, err
    text = check_report(out, stdout)
    assert "## Training" not in text and not (out / "train").exists()
    assert str(model) in text and "note: --model is" not in stdout + err
    # a --size the model does not have is said, not silently replaced
    args = ["demo", *SHRUNK, "--size", "32", "--model", model, "--data", sprite_dir, "--out", out, "--overwrite"]
    code, stdout, err = run(args, capsys)
    assert code == 0 and "--model is 16 px, so the demo runs at 16 px, not --size 32" in stdout + err, err


def test_the_paper_level_defaults_to_the_ddpms_top_trained_level(make_ctx: Callable[..., Context]) -> None:
    """--t-noisy omitted: the report's 600, or the top level of a truncated DDPM (the shipped sprite one: 500)."""
    from tdpm_dip.workflows.demo import DemoConfig, DemoRun, _settings

    unet = build_unet("tiny", seed=0, sample_size=16)
    for levels, given, expected in (((1, 500), None, 500), (None, None, 600), ((1, 500), 3, 3), ((1, 1000), None, 600)):
        d = DemoRun(DemoConfig(out="x", t_noisy=given), Path("s"), Path("f"), None, "cpu", 1, "")  # type: ignore[arg-type]
        d.ctx = make_ctx(unet, make_scheduler("linear"), levels=levels)
        _settings(d)
        assert d.t_noisy == expected, (levels, given)

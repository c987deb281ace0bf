"""Files in, files out (issue 32): every input gets its own output (sub-folders kept, colliding stems made
unique), bad inputs are one line and exit 2 before any work, and a run's outputs say what they are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run
from PIL import Image

from tdpm_dip.data import file_names
from tdpm_dip.errors import UserError
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

SIZE = 16
FAST = ["--method", "tweedie", "--sigma", "25", "--threads", "1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return path


def noisy_image(seed: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def colliding_folder(root: Path) -> Path:
    """a.png and a.jpg (one stem), x/p.png and y/p.png (one name in two sub-folders; y/p.png 24 px wide)."""
    for rel, seed in (("a.png", 0), ("a.jpg", 1), ("x/p.png", 2), ("y/p.png", 3)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        noisy_image(seed, (24, SIZE) if rel == "y/p.png" else (SIZE, SIZE)).save(root / rel)
    return root


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ names


def test_file_names_keep_sub_folders_and_make_colliding_stems_unique(tmp_path: Path) -> None:
    root = colliding_folder(tmp_path / "in")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert file_names(root, files) == ["a.jpg", "a.png", "x/p", "y/p"]
    assert file_names(root / "x" / "p.png", [root / "x" / "p.png"]) == ["p"]
    (tmp_path / "c").mkdir()
    for n in ("B.png", "b.png"):  # one file on macOS and Windows: refused, naming both
        noisy_image(0).save(tmp_path / "c" / n)
    with pytest.raises(UserError, match=r"B\.png and .*b\.png would write the same output"):
        file_names(tmp_path / "c", sorted((tmp_path / "c").iterdir()))


def test_denoise_writes_every_input_once(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = colliding_folder(tmp_path / "in")
    code, _, err = run(["denoise", "--model", model, "--input", root, *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert tree(tmp_path / "o" / "tweedie") == ["a.jpg.png", "a.png.png", "x/p.png", "y/p.png"]
    assert tree(tmp_path / "o" / "noisy") == tree(tmp_path / "o" / "tweedie")
    images = json.loads((tmp_path / "o" / "metrics.json").read_text())["images"]
    assert sorted(e["name"] for e in images) == ["a.jpg", "a.png", "x/p", "y/p"]
    assert {e["name"]: e["size"] for e in images}["y/p"] == f"24x{SIZE}"  # width x height
    # --reference matches the clean originals by the same relative names
    code, _, err = run(
        ["denoise", "--model", model, "--input", root, "--reference", root, *FAST, "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err


def test_add_noise_writes_every_input_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = colliding_folder(tmp_path / "in")
    code, _, err = run(["add-noise", "--input", root, "--sigma", "25", "--size", "16", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert tree(tmp_path / "o" / "noisy") == ["a.jpg.png", "a.png.png", "x/p.png", "y/p.png"]
    assert tree(tmp_path / "o" / "clean") == tree(tmp_path / "o" / "noisy")


def test_add_noise_on_a_decompression_bomb_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    noisy_image(0, (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > twice the limit: PIL's DecompressionBombError
    code, _, err = run(
        ["add-noise", "--input", tmp_path / "bomb.png", "--sigma", "25", "--out", tmp_path / "o"], capsys
    )
    assert code == 2 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [ln for ln in err.splitlines() if ln]
    assert "bomb.png" in err and not (tmp_path / "o").exists()

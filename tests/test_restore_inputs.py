"""`tdpm-dip restore` on the files a user has: grey, alpha and 16-bit files, masks in sub-folders, unreadable
files, an all-unknown mask, a reference of the wrong size, an --overwrite of another task's run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run as run_cli
from PIL import Image

from tdpm_dip import Restorer
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

SIZE = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), folder)
    return str(folder)


def _restore(tiny: str, args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    common = ["--model", tiny, "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--samples", "1"]
    return run_cli(["restore", *common, "--steps", "2", *args], capsys)


def _rgb(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _half_mask(h: int = SIZE, w: int = SIZE) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    return Image.fromarray(m)


def _one_image(tmp_path: Path, name: str = "a.png") -> Path:
    """A folder `in` holding one random 16 px RGB file."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_rgb(0)).save(src / name)
    return src


def _kinds(folder: Path) -> Path:
    """A grey, an RGBA and a 16-bit grey file."""
    folder.mkdir()
    Image.fromarray(_rgb(0)[..., 0], "L").save(folder / "grey.png")
    rgba = np.dstack([_rgb(1), np.random.default_rng(2).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    g16 = np.random.default_rng(3).integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    Image.fromarray(g16).save(folder / "deep.png")
    return folder


def test_outputs_keep_each_files_kind(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _kinds(tmp_path / "in")
    code, _, err = _restore(tiny, ["--task", "sr", "--scale", "2", "--input", src, "--out", tmp_path / "sr"], capsys)
    assert code == 0, err
    modes = {p.stem: Image.open(p).mode for p in (tmp_path / "sr" / "ccdf").iterdir()}
    # grey stays grey, 16-bit grey stays 16-bit, the alpha is upscaled with the colours
    assert modes == {"grey": "L", "alpha": "RGBA", "deep": "I;16"}, modes
    assert Image.open(tmp_path / "sr" / "ccdf" / "grey.png").size == (2 * SIZE, 2 * SIZE)
    alpha_in = Image.open(src / "alpha.png").getchannel("A")
    alpha_out = np.asarray(Image.open(tmp_path / "sr" / "ccdf" / "alpha.png").getchannel("A"))
    assert np.array_equal(alpha_out, np.asarray(alpha_in.resize((2 * SIZE, 2 * SIZE), Image.Resampling.BICUBIC)))
    mask = tmp_path / "half.png"
    _half_mask().save(mask)
    args = ["--task", "inpaint", "--input", src, "--mask", mask, "--method", "ccdf", "--method", "biharmonic"]
    code, _, err = _restore(tiny, [*args, "--out", tmp_path / "inp"], capsys)
    assert code == 0, err
    for m in ("ccdf", "biharmonic"):
        out = tmp_path / "inp" / m
        assert {p.stem: Image.open(p).mode for p in out.iterdir()} == {"grey": "L", "alpha": "RGBA", "deep": "I;16"}
        # alpha passes through unchanged; the known pixels come back as they were
        a_in, a_out = np.asarray(Image.open(src / "alpha.png")), np.asarray(Image.open(out / "alpha.png"))
        assert np.array_equal(a_out[..., 3], a_in[..., 3])
        g_in, g_out = np.asarray(Image.open(src / "grey.png")), np.asarray(Image.open(out / "grey.png"))
        assert np.array_equal(g_out[:, : SIZE // 2], g_in[:, : SIZE // 2])


def test_masks_are_matched_like_the_outputs_are_named(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, masks = tmp_path / "in", tmp_path / "masks"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        (masks / sub).mkdir(parents=True)
        Image.fromarray(_rgb(ord(sub))).save(src / sub / "x.png")
    _half_mask().save(masks / "a" / "x.png")
    Image.fromarray(255 - np.asarray(_half_mask())).save(masks / "b" / "x.png")  # the other half known
    Image.fromarray(_rgb(5)).save(src / "p.png")
    Image.fromarray(_rgb(6)).save(src / "p.jpg", quality=95)
    _half_mask().save(masks / "p.png")  # both p.png and p.jpg (outputs p.png.png, p.jpg.png) take it
    args = ["--task", "inpaint", "--input", src, "--mask", masks, "--method", "biharmonic", "--out", tmp_path / "o"]
    code, _, err = _restore(tiny, args, capsys)
    assert code == 0, err
    names = json.loads((tmp_path / "o" / "metrics.json").read_text())["images"]
    assert sorted(e["name"] for e in names) == ["a/x", "b/x", "p.jpg", "p.png"]
    a = np.asarray(Image.open(tmp_path / "o" / "biharmonic" / "a" / "x.png"))
    b = np.asarray(Image.open(tmp_path / "o" / "biharmonic" / "b" / "x.png"))
    assert np.array_equal(a[:, : SIZE // 2], _rgb(ord("a"))[:, : SIZE // 2])  # each image its own mask
    assert np.array_equal(b[:, SIZE // 2 :], _rgb(ord("b"))[:, SIZE // 2 :])
    (masks / "b" / "x.png").unlink()
    code, _, err = _restore(tiny, [*args[:-1], tmp_path / "o2"], capsys)
    assert code == 2 and "no mask named like b/x" in err and not (tmp_path / "o2").exists(), err


def test_unreadable_files_all_unknown_masks_and_repeated_methods(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = _one_image(tmp_path, "ok.png")
    (src / "broken.png").write_bytes(b"not an image")
    sr = ["--task", "sr", "--scale", "2", "--input", src, "--method", "bicubic"]
    code, _, err = _restore(tiny, [*sr, "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--skip-bad" in err and not (tmp_path / "a").exists(), err
    code, _, err = _restore(tiny, [*sr, "--skip-bad", "--method", "bicubic", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [r["method"] for r in metrics["rows"]] == ["bicubic"]  # named twice, run once
    assert [e["name"] for e in metrics["images"]] == ["ok"]
    # a mask with no known pixel: the methods run and say so (the classical start is flat grey)
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(black)
    args = ["--task", "inpaint", "--input", src / "ok.png", "--mask", black, "--method", "biharmonic"]
    code, _, err = _restore(tiny, [*args, "--method", "ccdf", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "warning: ok: the mask marks every pixel unknown" in err and "UserWarning" not in err, err
    assert np.all(np.asarray(Image.open(tmp_path / "b" / "biharmonic" / "ok.png")) == 128)
    assert Image.open(tmp_path / "b" / "ccdf" / "ok.png").size == (SIZE, SIZE)


def test_a_reference_of_the_wrong_size_is_refused_before_any_work(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    low, ref = tmp_path / "low", tmp_path / "ref"
    low.mkdir()
    ref.mkdir()
    Image.fromarray(_rgb(0, 8, 8)).save(low / "a.png")
    Image.fromarray(_rgb(1, 8, 8)).save(ref / "a.png")  # 8 px: the 2x output is 16 px

    def never(*a: object, **k: object) -> None:
        raise AssertionError("restored before the reference was checked")

    monkeypatch.setattr(Restorer, "restore_tensors", never)
    args = ["--task", "sr", "--scale", "2", "--input", low, "--reference", ref, "--out", tmp_path / "o"]
    code, _, err = _restore(tiny, args, capsys)
    assert code == 2 and "a.png: 8x8 px, but a restores to 16x16" in err, err
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_every_output_of_an_earlier_run(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = _one_image(tmp_path)
    out = tmp_path / "o"
    args = ["--task", "inpaint", "--input", src, "--mask-kind", "box", "--method", "biharmonic", "--method", "ccdf"]
    assert _restore(tiny, [*args, "--out", out], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    sr = ["--task", "sr", "--scale", "2", "--input", src, "--method", "bicubic", "--overwrite", "--out", out]
    code, _, err = _restore(tiny, sr, capsys)
    assert code == 0, err
    # the earlier run's method folders and masks are gone; what the command did not write stays
    assert sorted(p.name for p in out.iterdir()) == [
        "bicubic",
        "comparison.png",
        "metrics.json",
        "metrics.md",
        "notes.txt",
        "observed",
    ]


def test_option_texts(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _one_image(tmp_path)
    sr = ["--task", "sr", "--scale", "2", "--input", src, "--out", tmp_path / "o"]
    # a level above the DDPM's own is not called a truncated model's limit
    code, _, err = _restore(tiny, [*sr, "--t-trunc", "5000"], capsys)
    assert code == 2 and "this DDPM has levels 1..1000" in err and "truncated" not in err, err
    # --dip-preset names the DIP networks, not the DDPM presets
    code, _, err = _restore(tiny, [*sr, "--dip-preset", "nope"], capsys)
    assert code == 2 and "dip-tiny" in err and "sprites" not in err, err


def test_an_interrupt_says_one_thing(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _one_image(tmp_path)
    out = tmp_path / "o"
    sr = ["--task", "sr", "--scale", "2", "--input", src, "--method", "bicubic", "--out", out]
    assert _restore(tiny, sr, capsys)[0] == 0

    def stop(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Restorer, "restore_tensors", stop)
    code, _, err = _restore(tiny, [*sr, "--overwrite"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert code == 130 and lines == [f"interrupted: the earlier outputs in {out} are as they were (--overwrite)"], err


def test_resume_keeps_each_sub_folders_own_result(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--resume carries each finished image from its own sub-folder: `sub/a` is not `a`, and an image that lives
    only in a sub-folder is found."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_rgb(1, 8, 8)).save(root / "a.png")
    Image.fromarray(_rgb(2, 8, 8)).save(root / "sub" / "a.png")
    Image.fromarray(_rgb(3, 8, 8)).save(root / "sub" / "x.png")
    args = ["--task", "sr", "--scale", "2", "--method", "bicubic", "--input", root, "--out", tmp_path / "o"]
    assert _restore(tiny, args, capsys)[0] == 0
    first = {p: np.asarray(Image.open(tmp_path / "o" / "bicubic" / p)) for p in ("a.png", "sub/a.png", "sub/x.png")}
    code, _, err = _restore(tiny, [*args, "--resume"], capsys)
    assert code == 0, err
    for p, img in first.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "bicubic" / p)), img), p
    assert not np.array_equal(first["a.png"], first["sub/a.png"])


def test_masks_are_read_on_their_own_scale_upright_and_never_guessed(tmp_path: Path) -> None:
    """A 16-bit mask splits at half of 65535 (a 30 % grey hole is a hole), a float array at 0.5, a mask with
    transparent pixels is refused (which side they mean is a guess), and an EXIF-rotated mask is turned upright as
    its image is; an all-known mask warns in the API too."""
    from PIL import Image as PILImage

    from tdpm_dip.api import read_mask, warn_mask_coverage
    from tdpm_dip.errors import UserError

    hole = np.ones((8, 8))
    hole[2:6, 2:6] = 0.3
    want = (hole >= 0.5).astype(np.float32)
    m16 = PILImage.fromarray((hole * 65535).astype(np.uint16))
    assert np.array_equal(read_mask(m16, (8, 8))[0].numpy(), want)
    assert np.array_equal(read_mask(hole.astype(np.float32), (8, 8))[0].numpy(), want)
    # a float image is read as images of its mode are (0..1, or 0..255 when larger): a hole of 0.3 x 255 is a hole
    assert np.array_equal(read_mask(PILImage.fromarray((hole * 255).astype(np.float32), "F"), (8, 8))[0].numpy(), want)
    assert np.array_equal(read_mask((hole * 255).astype(np.uint8), (8, 8))[0].numpy(), want)
    rgba = PILImage.new("RGBA", (8, 8), (255, 255, 255, 255))
    rgba.paste((255, 255, 255, 0), (2, 2, 6, 6))
    with pytest.raises(UserError, match="transparent pixels"):
        read_mask(rgba, (8, 8))
    wide = np.zeros((6, 10), np.uint8)
    wide[:, :3] = 255  # known: the left 3 columns, as stored
    exif = PILImage.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the known band becomes the top 3 rows
    PILImage.fromarray(wide).save(tmp_path / "m.jpg", exif=exif, quality=100)
    up = read_mask(tmp_path / "m.jpg", (10, 6))[0].numpy()
    assert up[:3].all() and not up[4:].any()
    with pytest.warns(UserWarning, match="every pixel known"):
        warn_mask_coverage(read_mask(np.ones((4, 4), np.float32), (4, 4)), "image 0")

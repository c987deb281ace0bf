"""Files in, files out (issue 32): every input gets its own output (sub-folders kept, colliding stems made
unique), bad inputs are one line and exit 2 before any work, and a run's outputs say what they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from PIL import Image

from tdpm_dip.data import file_names
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context
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


def test_add_noise_reads_files_as_the_models_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """add-noise's clean file is what training and the bench read from the same file (`data.load_image`), down to
    the reduced-scale decoding of a large JPEG, so a noisy file and its clean original are one image."""
    from tdpm_dip.data import load_image
    from tdpm_dip.images import to_uint8

    big = tmp_path / "in" / "big.jpg"
    big.parent.mkdir()
    noisy_image(3, (600, 400)).save(big, quality=90)
    code, _, err = run(["add-noise", "--input", big, "--sigma", "10", "--size", "32", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    written = np.asarray(Image.open(tmp_path / "o" / "clean" / "big.png"))
    assert np.array_equal(written, to_uint8(load_image(big, 32)))


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


# ------------------------------------------------------------------------------------------ kinds


def test_results_come_back_as_the_inputs_came_in(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Grey stays grey (one channel, no colour noise), alpha passes through unchanged, 16-bit grey stays 16-bit."""
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "gray.png")
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)).save(root / "g16.png")
    assert Image.open(root / "g16.png").mode == "I;16"
    code, _, err = run(["denoise", "--model", model, "--input", root, *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    out = tmp_path / "o" / "tweedie"
    assert Image.open(out / "gray.png").mode == "L"
    assert Image.open(out / "g16.png").mode == "I;16"
    g16 = np.asarray(Image.open(out / "g16.png"))
    assert len(np.unique(g16 % 257)) > 1  # not 8-bit values scaled up
    back = Image.open(out / "rgba.png")
    assert back.mode == "RGBA" and np.array_equal(np.asarray(back)[..., 3], rgba[..., 3])
    assert Image.open(tmp_path / "o" / "noisy" / "gray.png").mode == "L"
    kinds = {e["name"]: e["kind"] for e in json.loads((tmp_path / "o" / "metrics.json").read_text())["images"]}
    assert kinds == {"g16": "grey, 16-bit", "gray": "grey, 8-bit", "rgba": "RGB + alpha, 8-bit"}


def test_the_api_hands_back_grey_and_alpha(make_ctx: Callable[..., Context]) -> None:
    from tdpm_dip.api import Denoiser

    unet = build_unet("tiny", seed=0, sample_size=SIZE).eval()
    den = Denoiser(make_ctx(unet, make_scheduler("linear")))
    gray, rgba = noisy_image(0, mode="L"), noisy_image(1, mode="RGBA")
    out = den.denoise([gray, rgba, np.asarray(gray)], sigma=25, method="tweedie")
    assert out.images[0].mode == "L" and out.images[1].mode == "RGBA"
    assert np.array_equal(np.asarray(out.images[1])[..., 3], np.asarray(rgba)[..., 3])
    assert out.images[2].shape == (SIZE, SIZE) and out.images[2].dtype == np.uint8


# ------------------------------------------------------------------------------------------ limits


def test_an_image_over_the_pixel_limit_is_one_line_before_any_work(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    noisy_image(0, (40, 30)).save(tmp_path / "big.png")
    args = ["denoise", "--model", model, "--input", tmp_path / "big.png", *FAST]
    code, _, err = run([*args, "--max-megapixels", "0.001", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "big.png is 40x30 px (0.0 Mpx), over the limit of 0.001 Mpx" in err and "--max-megapixels" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run([*args, "--max-megapixels", "0.0012", "--out", tmp_path / "o"], capsys)
    assert code == 0, err


def test_mistyped_input_and_unwritable_out_are_reported_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tdpm_dip.workflows.denoise as wf

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(wf, "load_context", no_model)
    code, _, err = run(["denoise", "--input", tmp_path / "typo", "--sigma", "25", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "typo: no such file or folder" in err, err
    (tmp_path / "in").mkdir()
    noisy_image(0).save(tmp_path / "in" / "a.png")
    (tmp_path / "file").write_text("x")
    code, _, err = run(["denoise", "--input", tmp_path / "in", "--out", tmp_path / "file" / "o"], capsys)
    assert code == 2 and "cannot be made" in err, err


# ------------------------------------------------------------------------------------------ interrupts


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> list[int]:
    """Ctrl-C in the call after `calls` calls of Denoiser.denoise_tensors; returns the list of images per call."""
    from tdpm_dip.api import Denoiser

    real = Denoiser.denoise_tensors
    seen: list[int] = []

    def counted(self: Denoiser, images: list, *a: object, **k: object) -> object:
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(len(images))
        return real(self, images, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Denoiser, "denoise_tensors", counted)
    return seen


def test_an_interrupt_keeps_finished_images_and_resume_computes_the_rest(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        noisy_image(i).save(root / f"im{i}.png")
    args = ["denoise", "--model", model, "--input", root, *FAST, "--batch-size", "1"]
    code, _, err = run([*args, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 130 and "2 of 4 images finished" in err and "--resume" in err, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["complete"] is False and metrics["status"].startswith("interrupted: 2 of 4")
    assert [e["status"] for e in metrics["images"]] == ["done", "done", "not computed", "not computed"]
    assert tree(tmp_path / "o" / "tweedie") == ["im0.png", "im1.png"]
    assert metrics["rows"][0]["n"] == 2
    # a plain re-run refuses the folder; --resume with other options refuses too, naming the option
    code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run([*args, "--seed", "1", "--resume", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "made with seed 0, not 1" in err, err
    (tmp_path / "other").mkdir()  # a folder that holds no denoise run is not replaced
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run([*args, "--resume", "--out", tmp_path / "other"], capsys)
    assert code == 2 and "holds no denoise --input run" in err and tree(tmp_path / "other") == ["notes.txt"], err
    with monkeypatch.context() as mp:
        seen = _interrupt_after(mp, 99)
        code, _, err = run([*args, "--resume", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert seen == [1, 1]  # only the two missing images
    for rel in tree(tmp_path / "whole"):
        if rel.endswith(".png") and rel != "comparison.png":
            assert (tmp_path / "o" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes(), rel
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["complete"] is True and [e["run"] for e in metrics["images"]][:2] == ["earlier (--resume)"] * 2


def test_an_interrupted_overwrite_never_mixes_old_and_new(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        noisy_image(i).save(root / f"im{i}.png")
    args = ["denoise", "--model", model, "--input", root, *FAST, "--batch-size", "1", "--out", tmp_path / "o"]
    assert run(args, capsys)[0] == 0
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 1)
        code, _, err = run([*args, "--seed", "5", "--overwrite"], capsys)
    assert code == 130, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["run"]["seed"] == 5 and [e["status"] for e in metrics["images"]][0] == "done"
    assert tree(tmp_path / "o" / "tweedie") == ["im0.png"]  # the old im1, im2 are gone with the old run


def test_an_image_run_in_tiles_is_its_own_batch(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small image before a large one is written before the large one starts (Ctrl-C keeps it)."""
    root = tmp_path / "in"
    root.mkdir()
    noisy_image(0).save(root / "a_small.png")
    noisy_image(1, (64, 64)).save(root / "b_large.png")  # over the tiny model's tiles (3 x 16 px)
    with monkeypatch.context() as mp:
        seen = _interrupt_after(mp, 1)
        code, _, err = run(["denoise", "--model", model, "--input", root, *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 130 and seen == [1], err
    assert tree(tmp_path / "o" / "tweedie") == ["a_small.png"]


# ------------------------------------------------------------------------------------------ logs


def test_progress_to_a_file_is_occasional_lines_not_frames(tmp_path: Path) -> None:
    """A command whose stderr is a file prints its progress bars as lines, at most one per 30 s per bar."""
    import io
    import sys

    from tqdm.auto import tqdm

    from tdpm_dip.cli import ProgressLines, progress_as_lines

    buf = io.StringIO()
    lines = ProgressLines(buf)
    for _ in tqdm(range(5), desc="work", file=lines, mininterval=0, leave=True):
        pass
    with tqdm(range(3), desc="gone", file=lines, mininterval=0, leave=False) as bar:
        for _ in bar:
            pass
    text = buf.getvalue()
    assert "\r" not in text and "\n\n" not in text and text.count("work") >= 2, text
    assert all(ln.strip() for ln in text.splitlines())
    old = sys.stderr
    with open(tmp_path / "log", "w") as f:
        sys.stderr = f
        try:
            with progress_as_lines():
                assert isinstance(sys.stderr, ProgressLines)
                for _ in tqdm(range(1000), desc="many"):
                    pass
        finally:
            sys.stderr = old
    log = (tmp_path / "log").read_text()
    assert "\r" not in log and log.count("many") <= 3, log


def test_help_texts_say_what_the_code_does(capsys: pytest.CaptureFixture) -> None:
    """--dtype auto is bf16 on CPUs that compute bf16 natively (runtime.pick_amp); the DIP defaults name their use."""
    code, out, _ = run(["denoise", "--help"], capsys)
    text = " ".join(out.split()).replace("- ", "-")  # click wraps at hyphens
    assert code == 0 and "auto = bf16 on GPUs and on CPUs that compute bf16 natively" in text
    assert "(plugin)" not in text and "200 (blind tdpm-dip)" in text


def test_prepare_data_names_both_files_that_share_a_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = colliding_folder(tmp_path / "in")
    code, _, err = run(["prepare-data", "--source", root, "--test", "1", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "a.jpg and" in err and "a.png share the name 'a'" in err


def _png16_rgb(path: Path, a: np.ndarray) -> Path:
    """A 48-bit RGB PNG (PIL writes none): signature, IHDR, one zlib IDAT of unfiltered rows, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def test_16_bit_rgb_read_as_8_bits_says_so(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    _png16_rgb(tmp_path / "in" / "rgb16.png", rng.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16))
    code, _, err = run(
        ["denoise", "--model", model, "--input", tmp_path / "in", *FAST, "--out", tmp_path / "o"], capsys
    )
    assert code == 0, err
    # one line, as the user reads it: no file:line header, no source line
    warned = [ln for ln in err.splitlines() if "16 bits per sample" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "rgb16.png" in warned[0], err
    assert "UserWarning" not in err


def test_sigma_estimated_from_a_jpeg_comes_with_a_warning(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    noisy_image(0, (32, 32)).save(tmp_path / "in" / "a.jpg", quality=90)
    args = ["denoise", "--model", model, "--input", tmp_path / "in", "--method", "tweedie", "--threads", "1"]
    code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 0 and "a.jpg: JPEG compression removes part of the noise" in err, err
    code, _, err = run([*args, "--sigma", "25", "--out", tmp_path / "o2"], capsys)
    assert code == 0 and "JPEG" not in err, err


def test_blind_sigma_names_the_clean_looking_files_and_warns_on_binary_ones(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without --sigma, a clean-looking file stops the run with one line that names it (not "these images"); a
    1-bit image, whose estimate reaches the 255 cap, runs with a warning that names it."""
    root = tmp_path / "in"
    root.mkdir()
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    grey[4:12, 4:12] = (200, 30, 30)
    Image.fromarray(grey).save(root / "logo.png")
    ramp = np.tile(np.linspace(0, 255, SIZE), (SIZE, 1)).astype(np.uint8)
    Image.fromarray(ramp).convert("1").save(root / "scan.png")  # a grey ramp, dithered to black and white
    args = ["denoise", "--model", model, "--input", root, "--method", "tweedie", "--threads", "1"]
    code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and errors == [
        f"error: {root / 'logo.png'}: the estimated noise level is ~0 (looks clean); give --sigma"
    ]
    (root / "logo.png").unlink()
    code, out, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert f"warning: {root / 'scan.png'} (255): an estimated sigma this high" in out + err


def test_inputs_leave_out_hidden_files_and_follow_linked_folders(tmp_path: Path) -> None:
    """macOS's ._ twins and hidden folders are not images to denoise; a linked folder is walked (once, even when a
    link points back up the tree)."""
    from tdpm_dip.data import list_images

    root, elsewhere = tmp_path / "in", tmp_path / "set1"
    (root / ".thumbnails").mkdir(parents=True)
    elsewhere.mkdir()
    noisy_image(0).save(root / "photo.png")
    (root / "._photo.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    noisy_image(1).save(root / ".thumbnails" / "photo.png")
    noisy_image(2).save(elsewhere / "q.png")
    (root / "set1").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(root, target_is_directory=True)  # a loop
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == ["photo.png", "set1/q.png"]


def test_an_animation_says_that_only_its_first_frame_is_used(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    frames = [noisy_image(i) for i in range(3)]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:])
    code, _, err = run(
        ["denoise", "--model", model, "--input", tmp_path / "in", *FAST, "--out", tmp_path / "o"], capsys
    )
    assert code == 0, err
    assert [ln for ln in err.splitlines() if "frames" in ln] == [
        f"warning: {tmp_path / 'in' / 'anim.gif'}: 3 frames; only the first is used"
    ]


def test_a_reference_folder_is_read_only_for_the_inputs_it_scores(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An unrelated broken file beside the clean originals is not read: it cannot stop the run."""
    (tmp_path / "in").mkdir()
    (tmp_path / "ref").mkdir()
    noisy_image(0).save(tmp_path / "in" / "a.png")
    noisy_image(1).save(tmp_path / "ref" / "a.png")
    (tmp_path / "ref" / "unrelated.png").write_bytes(b"")
    args = ["denoise", "--model", model, "--input", tmp_path / "in", "--reference", tmp_path / "ref", *FAST]
    code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "PSNR" in json.loads((tmp_path / "o" / "metrics.json").read_text())["images"][0]["tweedie"]


def test_32_bit_grey_files_are_read_on_their_range_or_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A 32-bit integer file holding 0..255 comes back 8-bit (not x257 as 16-bit); a float file in 0..1 comes back
    16-bit (not cut to 8 bits); a float file beyond 0..255 is refused with one line, not written all white."""
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (SIZE, SIZE)).astype(np.float32)
    (tmp_path / "in").mkdir()
    Image.fromarray(g.astype(np.int32), "I").save(tmp_path / "in" / "i8.tif")
    Image.fromarray(g / 255, "F").save(tmp_path / "in" / "f1.tif")
    args = ["denoise", "--model", model, *FAST]
    code, _, err = run([*args, "--input", tmp_path / "in", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "o" / "tweedie" / "i8.png")).dtype == np.uint8
    assert np.asarray(Image.open(tmp_path / "o" / "tweedie" / "f1.png")).dtype == np.uint16
    (tmp_path / "big").mkdir()
    Image.fromarray(g * 257, "F").save(tmp_path / "big" / "f65535.tif")
    code, _, err = run([*args, "--input", tmp_path / "big", "--out", tmp_path / "o2"], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "f65535.tif" in errors[0] and "outside 0..1, 0..255" in errors[0], err
    assert not (tmp_path / "o2").exists()


def test_the_api_takes_16_bit_grey_arrays() -> None:
    from tdpm_dip.data import read_user_image_kind

    a = np.random.default_rng(0).integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    x, kind = read_user_image_kind(a)
    assert kind.gray and kind.bits == 16
    assert torch.allclose((x[0] + 1) / 2 * 65535, torch.from_numpy(a.astype(np.float32)), atol=0.05)
    with pytest.raises(UserError, match="16-bit grey"):
        read_user_image_kind(np.zeros((SIZE, SIZE, 3), np.uint16))


def test_prepare_data_refuses_an_out_inside_its_source_and_a_huge_size(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A split written inside its source would become part of it (the next split, a training run); --size is bounded
    before any image is read (100000 px would take all the memory)."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        noisy_image(i).save(root / f"img{i}.png")
    for args, words in (
        (["--out", root / "split"], "is inside --source"),
        (["--out", root, "--overwrite"], "is inside --source"),
        (["--size", "100000", "--out", tmp_path / "o"], "--size must be 0"),
    ):
        code, _, err = run(["prepare-data", "--source", root, "--test", "1", *args], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in root.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert not (tmp_path / "o").exists()


def test_add_noise_skips_unreadable_files_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Like denoise: a bad file stops the run with one line that offers --skip-bad; with it, the file is skipped
    with a warning and --n counts readable images."""
    root = tmp_path / "in"
    root.mkdir()
    noisy_image(0).save(root / "a.png")
    (root / "b.png").write_bytes(b"")
    noisy_image(1).save(root / "c.png")
    args = ["add-noise", "--input", root, "--sigma", "10", "--size", "16", "--n", "2"]
    code, _, err = run([*args, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "b.png: empty file (use --skip-bad" in err and not (tmp_path / "o").exists(), err
    code, _, err = run([*args, "--skip-bad", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "warning: skipping" in err and "b.png" in err, err
    assert tree(tmp_path / "o" / "noisy") == ["a.png", "c.png"]

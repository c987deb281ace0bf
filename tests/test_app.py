"""The browser app's handlers, called directly with a tiny model: no Gradio needed."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from PIL import Image
from stubs import tiny_unet

from tdpm_dip import registry
from tdpm_dip.api import Denoiser
from tdpm_dip.app import (
    AppModels,
    denoise_handler,
    denoise_methods,
    denoise_summary,
    generate_handler,
    generate_methods,
    load_models,
    parse_sigma,
    write_examples,
)
from tdpm_dip.data import make_sprites
from tdpm_dip.errors import UserError
from tdpm_dip.images import make_grid
from tdpm_dip.methods import Result
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

SIZE = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> AppModels:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return load_models(str(path), device="cpu", dip_preset="dip-tiny")


def _noisy_png(folder: Path, h: int, w: int, sigma: float = 25.0, seed: int = 0) -> tuple[Path, Path]:
    """An 8-bit noisy PNG of a sprite (not square, not a multiple of the UNet's factor) and its original."""
    x = (make_sprites(1, max(h, w), seed=seed).images[0, :, :h, :w].permute(1, 2, 0).numpy() + 1) * 127.5
    y = np.clip(np.round(x + np.random.default_rng(seed).normal(0, sigma, x.shape)), 0, 255).astype(np.uint8)
    noisy, clean = folder / f"noisy{seed}.png", folder / f"clean{seed}.png"
    Image.fromarray(y).save(noisy)
    Image.fromarray(np.round(x).astype(np.uint8)).save(clean)
    return noisy, clean


def test_method_lists_come_from_the_registry() -> None:
    den = [m.name for m in denoise_methods()]
    # Expected independently of the app: the registry's blind methods, best first, less those whose optional
    # extra cannot be imported here.
    expected = [
        m.name
        for m in registry.methods("denoise", "blind")
        if m.extra is None or importlib.util.find_spec(m.extra) is not None
    ]
    assert den == expected
    assert den[0] == registry.names("denoise", "blind")[0]  # the default is the registry's best
    assert {"ddpm", "ddim"} <= {m.name for m in generate_methods()}
    assert "tdpm-dip" not in {m.name for m in generate_methods()}  # it needs reference data


def test_denoise_keeps_the_uploads_size(models: AppModels, tmp_path: Path) -> None:
    noisy, clean = _noisy_png(tmp_path, 21, 30)
    d = denoise_handler(models, str(noisy), "tweedie", sigma=25.0, clean=str(clean))
    assert d.image.shape == d.input.shape == (21, 30, 3) and d.image.dtype == np.uint8
    assert np.array_equal(d.input, np.asarray(Image.open(noisy)))  # the input shown is the file, untouched
    assert not np.array_equal(d.image, d.input)
    i = d.info
    assert i["method"] == "tweedie" and i["nfe"] == 1 and i["sigma"] == 25.0 and not i["sigma_estimated"]
    assert np.isfinite([i["psnr"], i["ssim"], i["input_psnr"], i["seconds"]]).all()
    assert "NFE 1" in denoise_summary(d) and "PSNR" in denoise_summary(d)
    # the same image given as an array, and the default method (the registry's first)
    d2 = denoise_handler(models, np.asarray(Image.open(noisy)), None, sigma=25.0)
    assert d2.info["method"] == denoise_methods()[0].name and d2.image.shape == (21, 30, 3)
    # Content: with the identity denoiser (a real UNet whose eps is 0, tests/stubs.py) the page shows the upload
    # itself, pixel for pixel (declipped pixels are clamped back): the pad to the networks' sides is cropped off at
    # the right corner.
    ident = AppModels(
        Denoiser(dataclasses.replace(models.ctx, unet=tiny_unet(zero=True), dip_memo={})),
        models.generator,
        models.model,
    )
    for method in ("tweedie", "ensemble"):
        d3 = denoise_handler(ident, str(noisy), method, sigma=25.0)
        assert d3.image.shape == (21, 30, 3) and np.array_equal(d3.image, d3.input), method


def test_denoise_estimates_sigma(models: AppModels, tmp_path: Path) -> None:
    noisy, _ = _noisy_png(tmp_path, 24, 24, sigma=30.0, seed=1)
    d = denoise_handler(models, str(noisy), "tweedie")
    assert d.info["sigma_estimated"] and abs(d.info["sigma"] - 30) < 3  # within 10 % (28.7 on this image)
    assert "(estimated)" in denoise_summary(d)


def test_denoise_downscales_large_uploads_with_a_notice(models: AppModels, tmp_path: Path) -> None:
    noisy, clean = _noisy_png(tmp_path, 40, 30, seed=2)
    d = denoise_handler(models, str(noisy), "tweedie", sigma=25.0, clean=str(clean), max_side=20)
    assert d.image.shape == (20, 15, 3) and d.notices and "40x30" in d.notices[0].replace("30x40", "40x30")
    assert "Note:" in denoise_summary(d) and np.isfinite(d.info["psnr"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n garbage", "noisy image corrupt.png"),
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_bad_uploads_give_one_clear_line(models: AppModels, tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        denoise_handler(models, str(bad), "tweedie")
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)  # no server-side path in the page


def test_denoise_refuses_what_it_cannot_do(models: AppModels, tmp_path: Path) -> None:
    noisy, _ = _noisy_png(tmp_path, 24, 24, seed=3)
    other, _ = _noisy_png(tmp_path, 20, 24, seed=4)
    cases = [
        (dict(noisy=None), "upload a noisy image"),
        (dict(method="nope"), "unknown denoising method"),
        (dict(sigma=300.0), "sigma"),
        (dict(clean=str(other)), "same size"),
        (dict(noisy=np.zeros((4, 4), np.uint8)), "smaller than"),
    ]
    for kwargs, message in cases:
        args = {"noisy": str(noisy), "method": "tweedie", **kwargs}
        with pytest.raises(UserError, match=message):
            denoise_handler(models, **args)
    flat = np.full((24, 24, 3), 128, np.uint8)  # a clean-looking image: nothing to estimate
    with pytest.raises(
        UserError, match=r"^this image: the estimated noise level is ~0 \(looks clean\); enter its sigma$"
    ):
        denoise_handler(models, flat, "tweedie")


def test_sigma_field() -> None:
    assert parse_sigma("") is None and parse_sigma("  ") is None and parse_sigma(None) is None
    assert parse_sigma(" 25 ") == 25.0
    for bad, message in [("abc", "must be a number"), ("0", "in \\(0, 255\\]"), ("300", "in \\(0, 255\\]")]:
        with pytest.raises(UserError, match=message):
            parse_sigma(bad)


def test_generate_grid_is_seeded(models: AppModels) -> None:
    g = generate_handler(models, "ddim", n=3, seed=7, steps=3)
    up = max(1, 96 // SIZE)
    assert g.grid.shape == make_grid(torch.zeros(3, 3, SIZE, SIZE), upscale=up).shape and g.grid.dtype == np.uint8
    assert g.images.shape == (3, 3, SIZE, SIZE) and torch.isfinite(g.images).all()
    assert g.info["nfe"] == 3 and g.info["n"] == 3
    again = generate_handler(models, "ddim", n=3, seed=7, steps=3)
    assert np.array_equal(g.grid, again.grid)
    other = generate_handler(models, "ddim", n=3, seed=8, steps=3)
    assert torch.equal(other.images[:2], generate_handler(models, "ddim", n=2, seed=8, steps=3).images)
    assert not np.array_equal(g.grid, other.grid)
    with pytest.raises(UserError, match="n must be"):
        generate_handler(models, "ddim", n=0)
    with pytest.raises(UserError, match="unknown generation method"):
        generate_handler(models, "tdpm-dip", n=1)


def visitor_leaving() -> tuple[list[int], Callable[[], bool]]:
    """(the checks made, `alive`): alive for the check at the lock and one step, then the visitor has gone."""
    checks: list[int] = []

    def alive() -> bool:
        checks.append(1)
        return len(checks) < 3

    return checks, alive


def test_generate_requests_keep_to_their_budget(models: AppModels) -> None:
    """Generation keeps to the request's budget as denoising does: past it, one line; a visitor who leaves stops
    it after the network call under way (for ddim and ddpm, not after the whole chain)."""
    from tdpm_dip import app

    with pytest.raises(UserError, match="more than the 0 s a request may take here"):
        generate_handler(models, "ddim", n=1, steps=3, max_seconds=0)
    for method in ("ddim", "ddpm"):
        checks, alive = visitor_leaving()
        with pytest.raises(app.Cancelled):
            generate_handler(models, method, n=1, steps=5, alive=alive)
        assert len(checks) == 3, method


SEEN: dict = {}


def fake_generator(ctx, job):
    SEEN["t_trunc"] = job.t_trunc
    return Result("fake-tdpm", "unconditional", torch.zeros(len(job.seeds), 3, SIZE, SIZE), 0.0, 11, 11)


def test_a_newly_registered_generator_appears(models: AppModels, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Generate tab reads the registry: a generator registered from outside the package is listed and
    receives T_trunc, without a change to the app."""
    monkeypatch.setattr(registry, "METHODS", list(registry.METHODS))
    registry.register(
        registry.Method(
            "fake-tdpm", "generate", "unconditional", f"{__name__}:fake_generator", "test entry", "1 + T_trunc"
        )
    )
    assert "fake-tdpm" in [x.name for x in generate_methods()]
    g = generate_handler(models, "fake-tdpm", n=2, seed=0, t_trunc=10)
    assert SEEN["t_trunc"] == 10 and g.info["nfe"] == 11


def test_examples_are_noisy_sprites(tmp_path: Path) -> None:
    rows = write_examples(tmp_path, n=2, size=32)
    assert len(rows) == 2
    noisy, clean = (np.asarray(Image.open(p), dtype=float) for p in rows[0])
    assert noisy.shape == clean.shape == (32, 32, 3) and 10 < (noisy - clean).std() < 30


def test_app_command_without_gradio(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    code, out, err = run(["app", "--port", "0"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: the app needs Gradio, which is not installed: pip install 'tdpm-dip[app]'"
    ]


def test_space_requirements_match_the_package() -> None:
    """space/requirements.txt repeats the package's dependencies (a Space cannot pip-install the package)."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (root / "space" / "requirements.txt").read_text().splitlines()]
    assert [ln for ln in lines if ln and not ln.startswith("#")] == deps


def test_a_generator_makes_tdpm_available(tmp_path: Path) -> None:
    """`tdpm-dip app --generator G`: the Generate tab's tdpm runs G_psi(z) + T_trunc steps (1 + T_trunc NFE)."""
    from tdpm_dip.training.generator import train_generator
    from tdpm_dip.training.options import GeneratorConfig

    ddpm = tmp_path / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), ddpm)
    gen = train_generator(
        GeneratorConfig(
            model=str(ddpm),
            t_trunc=3,
            out=str(tmp_path / "g"),
            objective="distill",
            steps=2,
            batch_size=4,
            pairs=4,
            ddim_steps=2,
            checkpoint_every=0,
            sample_every=0,
            n_samples=0,
        ),
        progress=False,
    )
    m = load_models(str(ddpm), str(gen), device="cpu", dip_preset="dip-tiny")
    g = generate_handler(m, "tdpm", n=2, seed=3)
    assert g.info["nfe"] == 4 and g.images.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(generate_handler(m, "tdpm", n=2, seed=3).images, g.images)
    with pytest.raises(UserError) as e:  # a T_trunc the generator was not trained for: no server path
        generate_handler(m, "tdpm", n=1, t_trunc=5)
    assert str(e.value) == "T_trunc 5 does not match the loaded generator's 3" and str(tmp_path) not in str(e.value)


# ------------------------------------------------------------------------------------------ budget and messages


def test_requests_keep_to_their_budget(models: AppModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large upload is denoised at the pixel budget; past the time budget the work stops between tiles with one
    line; a visitor who left cancels it; an upload over the upload limit is refused from its header."""
    from tdpm_dip import app

    noisy, _ = _noisy_png(tmp_path, 120, 160, seed=5)
    d = denoise_handler(models, str(noisy), "tweedie", sigma=25.0, max_pixels=60 * 80)
    assert d.image.shape == (60, 80, 3) and "Mpx" in d.notices[0]
    with pytest.raises(UserError, match="more than the 0 s a request may take here"):
        denoise_handler(models, str(noisy), "tweedie", sigma=25.0, max_seconds=0)
    with pytest.raises(app.Cancelled):
        denoise_handler(models, str(noisy), "tweedie", sigma=25.0, alive=lambda: False)
    monkeypatch.setattr(app, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(UserError) as e:
        denoise_handler(models, str(noisy), "tweedie", sigma=25.0)
    assert str(e.value).startswith("noisy image noisy5.png is 160x120 px") and "--" not in str(e.value)


def test_page_messages_are_for_the_page(models: AppModels, tmp_path: Path) -> None:
    """No CLI options, no exception names, no Python-level failure for out-of-range numbers."""
    noisy, _ = _noisy_png(tmp_path, 24, 24, seed=6)
    for seed in (2**70, -1, "x"):
        with pytest.raises(UserError, match="seed must be"):
            denoise_handler(models, str(noisy), "tweedie", sigma=25.0, seed=seed)  # type: ignore[arg-type]
        with pytest.raises(UserError, match="seed must be"):
            generate_handler(models, "ddim", n=1, seed=seed, steps=2)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="steps must be in 1..1000"):
        generate_handler(models, "ddim", n=1, steps=10**9)
    with pytest.raises(UserError) as e:
        denoise_handler(models, np.full((24, 24, 3), 128, np.uint8), "tweedie")
    assert "--sigma" not in str(e.value) and "enter its sigma" in str(e.value)


def test_restore_handlers_upscale_and_inpaint(models: AppModels) -> None:
    from tdpm_dip.app import mask_from_editor, restore_handler, restore_methods

    low = np.random.default_rng(3).integers(0, 256, (11, 9, 3), dtype=np.uint8)
    # the registry's best that this DDPM can run: no restoration network in its folder, so not ccdf-net
    assert restore_methods(models, "sr")[0] == "ccdf" and "ccdf-net" not in restore_methods(models, "inpaint")
    r = restore_handler(models, "sr", low, scale=2, method="bicubic")
    assert r.image.shape == (22, 18, 3) and r.info["nfe"] == 0 and r.info["width"] == 18
    with pytest.raises(UserError, match="limit"):
        restore_handler(models, "sr", low, scale=4, method="bicubic", max_pixels=100)
    with pytest.raises(UserError, match="upload"):
        restore_handler(models, "sr", None)
    img = np.random.default_rng(4).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    layer = np.zeros((12, 10, 4), np.uint8)
    layer[4:8, 3:6, 3] = 255  # a painted rectangle
    image, mask = mask_from_editor({"background": img, "layers": [layer], "composite": img})
    assert mask.sum() == 120 - 12 and not mask[4:8, 3:6].any()
    r = restore_handler(models, "inpaint", image, mask, method="biharmonic")
    assert np.array_equal(r.image[mask], img[mask]) and (r.input[~mask] == 0).all()
    with pytest.raises(UserError, match="paint"):
        mask_from_editor(None)


def test_restore_requests_stop_inside_the_work(models: AppModels) -> None:
    """Restoration keeps to the request's budget: past it, one line; a visitor who leaves stops it after the
    DIP step or chain step under way (not after the whole method)."""
    from tdpm_dip import app
    from tdpm_dip.app import restore_handler

    low = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="more than the 0 s a request may take here"):
        restore_handler(models, "sr", low, scale=2, method="ccdf", max_seconds=0)
    for method in ("ccdf", "dip"):
        checks, alive = visitor_leaving()
        with pytest.raises(app.Cancelled):
            restore_handler(models, "sr", low, scale=2, method=method, alive=alive)
        assert len(checks) == 3, method


def test_the_download_keeps_the_uploads_kind(models: AppModels, tmp_path: Path) -> None:
    """A grey upload comes back grey and an RGBA one with its alpha unchanged (downscaled with the image when the
    upload is over the page's budget); the page itself shows RGB."""
    y, _ = _noisy_png(tmp_path, 20, 24, seed=7)
    rgb = np.asarray(Image.open(y))
    grey = tmp_path / "grey.png"
    Image.fromarray(rgb.mean(2).round().astype(np.uint8), "L").save(grey)
    d = denoise_handler(models, str(grey), "tweedie", sigma=25.0)
    assert d.file is not None and d.file.mode == "L" and d.file.size == (24, 20) and d.image.shape == (20, 24, 3)
    alpha = np.random.default_rng(1).integers(0, 256, (20, 24), dtype=np.uint8)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(rgba)
    d = denoise_handler(models, str(rgba), "tweedie", sigma=25.0)
    assert d.file is not None and d.file.mode == "RGBA"
    assert np.array_equal(np.asarray(d.file)[..., 3], alpha)
    small = denoise_handler(models, str(rgba), "tweedie", sigma=25.0, max_pixels=10 * 12)
    assert small.file is not None and small.file.size == (small.image.shape[1], small.image.shape[0])
    assert np.asarray(small.file).shape[-1] == 4


def test_a_closed_handler_stops_its_work() -> None:
    """The page's handlers are generators over work in a thread: Gradio closes a generator when its page
    disconnects or the request is cancelled, and the work must then see alive() False and stop; finished work
    yields its result, and its errors reach the handler."""
    import threading
    import time

    pytest.importorskip("gradio")
    import gradio as gr

    from tdpm_dip.app_ui import RESULT_OUTPUTS, _in_worker

    stopped = threading.Event()

    def forever(alive) -> str:
        while alive():
            time.sleep(0.01)
        stopped.set()
        return "never shown"

    handler = _in_worker(forever)
    first = next(handler)  # "no change" while the work runs
    assert len(first) == RESULT_OUTPUTS and all(u == gr.skip() for u in first)
    assert not stopped.is_set()
    handler.close()  # what Gradio does on /cancel and on a disconnect
    assert stopped.wait(5)
    assert list(_in_worker(lambda alive: ("a", "b", "c", "d")))[-1] == ("a", "b", "c", "d")

    def fails(alive) -> None:
        raise gr.Error("one line")

    with pytest.raises(gr.Error, match="one line"):
        list(_in_worker(fails))


def test_a_downscale_notice_names_only_the_limits_the_upload_passes() -> None:
    from tdpm_dip.app import fit_side

    x = torch.zeros(3, 500, 600)
    small, notice = fit_side(x, 1024, 512 * 512)
    assert notice is not None and "over the 0.26 Mpx limit" in notice and "1024" not in notice
    assert small.shape[-2] * small.shape[-1] <= 512 * 512
    _, notice = fit_side(torch.zeros(3, 100, 2000), 1024, 512 * 512)
    assert notice is not None and "over the 1024 px limit" in notice and "Mpx" not in notice
    assert fit_side(torch.zeros(3, 64, 64), 1024, 512 * 512)[1] is None

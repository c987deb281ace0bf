"""The Python API (`from tdpm_dip import Denoiser, Generator`), and the README's example run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdpm_dip import Denoiser, Generator, Restorer
from tdpm_dip.errors import UserError
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.operators import Operator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), folder)
    return str(folder)


def test_denoise_keeps_each_inputs_size_and_type(tiny: str) -> None:
    den = Denoiser.from_pretrained(tiny, device="cpu", dtype="fp32", dip_preset="dip-tiny")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    pil = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = den.denoise([arr, pil], sigma=25, method="tweedie", seed=3)
    assert isinstance(out.images[0], np.ndarray) and out.images[0].shape == (19, 23, 3)
    assert out.images[0].dtype == np.uint8
    assert isinstance(out.images[1], Image.Image) and out.images[1].size == (16, 16)
    assert out.method == "tweedie" and out.sigma == [25.0, 25.0] and not out.sigma_estimated and out.nfe == 1
    again = den.denoise(arr, sigma=25, method="tweedie", seed=3)  # image 0 alone: the same seed, the same result
    assert np.array_equal(again.images[0], out.images[0])
    for shape in ((16, 16), (16, 16, 1)):  # a grey array comes back in its own shape
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
        assert den.denoise(grey, sigma=25, method="tweedie").images[0].shape == shape


def test_denoise_estimates_sigma_and_checks_its_input(tiny: str) -> None:
    den = Denoiser.from_pretrained(tiny, device="cpu", dtype="fp32")
    x = np.full((32, 32, 3), 255, np.uint8)
    noisy = np.clip(np.round(x + np.random.default_rng(1).normal(0, 20, x.shape)), 0, 255).astype(np.uint8)
    out = den.denoise(noisy, method="tweedie")
    assert out.sigma_estimated and abs(out.sigma[0] - 20) < 2
    with pytest.raises(UserError, match="sigmas for"):
        den.denoise([noisy, noisy], sigma=[20.0], method="tweedie")
    with pytest.raises(UserError, match="unknown denoise method"):
        den.denoise(noisy, sigma=20, method="nope")
    with pytest.raises(UserError, match="no such file"):
        den.denoise("does/not/exist.png", sigma=20)


def test_generate_gives_seeded_pil_images(tiny: str) -> None:
    gen = Generator.from_pretrained(tiny, device="cpu", dtype="fp32")
    assert gen.methods[0] == "ddim"  # no generator loaded: tdpm cannot run
    a = gen.generate(3, seed=5, ddim_steps=2)
    b = gen.generate(1, seed=6, ddim_steps=2)
    assert len(a.images) == 3 and a.images[0].size == (16, 16) and a.nfe == 2
    assert np.array_equal(np.asarray(a.images[1]), np.asarray(b.images[0]))  # image i uses seed SEED + i
    with pytest.raises(UserError, match="needs a generator"):
        gen.generate(1, method="tdpm")


def test_arguments_a_caller_may_get_wrong_are_one_line_errors(tiny: str) -> None:
    den = Denoiser.from_pretrained(tiny, device="cpu", dtype="fp32")
    noisy = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # numpy numbers are numbers; a string is not a list of sigmas
    assert den.denoise(noisy, sigma=np.float32(25), method="tweedie").sigma == [25.0]
    assert den.denoise([noisy, noisy], sigma=np.array([10, 20]), method="tweedie").sigma == [10.0, 20.0]
    for bad, msg in [
        ({"sigma": "25"}, "sigma must be a number"),
        ({"sigma": [10, "x"]}, "sigma must be a number"),
        ({"seed": 2**70}, "seed must be a whole number"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"foo": 1}, "unknown option 'foo'"),
    ]:
        with pytest.raises(UserError, match=msg):
            den.denoise([noisy, noisy], method="tweedie", **bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="expected an 8-bit image array"):
        den.denoise(np.zeros((16, 16, 5), np.uint8), sigma=25)
    gen = Generator.from_pretrained(tiny, device="cpu", dtype="fp32")
    for args, kw, msg in [
        ((1.5,), {}, "n must be a whole number"),
        ((1,), {"seed": 1.5}, "seed must"),
        ((1,), {"eta": float("nan")}, "eta must be a number in"),  # NaN images, silently, before
        ((1,), {"eta": 5}, "eta must be a number in"),
        ((1,), {"eta": "x"}, "eta must be a number in"),
        ((1,), {"t_trunc": "5"}, "t_trunc must be a whole number"),
        ((1,), {"method": "tdpm-dip", "reference": [Image.new("RGB", (16, 16))]}, "reference must be a tensor"),
    ]:
        with pytest.raises(UserError, match=msg):
            gen.generate(*args, ddim_steps=2, **kw)  # type: ignore[arg-type]


def test_restorer_limits_and_empty_calls(tiny: str) -> None:
    r = Restorer.from_pretrained(tiny, device="cpu", dtype="fp32", dip_preset="dip-tiny")
    assert r.super_resolve([], scale=2).images == [] and r.inpaint([], []).images == []
    low = np.zeros((40, 40, 3), np.uint8)
    r.max_pixels = 100 * 100
    with pytest.raises(UserError, match="would be 160x160 px, above the limit of 10000"):
        r.super_resolve(low, scale=4, method="bicubic")
    assert r.super_resolve(low, scale=2, method="bicubic").images[0].shape == (80, 80, 3)
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 4), dtype=np.uint8), "RGBA")
    up = r.super_resolve(rgba, scale=2, method="bicubic").images[0]  # the alpha is upscaled with the colours
    assert up.mode == "RGBA" and up.size == (24, 20)
    with pytest.raises(UserError, match="C <= 4"):
        r.inpaint(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 5), np.uint8), method="biharmonic")

    class Grey(Operator):  # another operator: Restorer says where it runs instead of failing inside
        def A(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(-3, keepdim=True).expand_as(x)

    with pytest.raises(UserError, match="run another operator through methods.run_restore"):
        r.restore_tensors([torch.zeros(3, 8, 8)], [Grey()], "ccdf", [0])


def test_semi_transparent_pixels_keep_their_colours(tiny: str) -> None:
    """The alpha channel is kept aside and put back: the colours under it must not be washed toward the white that
    fully transparent pixels are shown as."""
    den = Denoiser.from_pretrained(tiny, device="cpu", dtype="fp32")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[...] = (200, 30, 30, 128)
    rgba[:4, :4, 3] = 0  # fully transparent: shown to the model as white, its colour invisible either way
    out = den.denoise(rgba, sigma=5, method="tweedie").tensors[0]
    mean = ((out[:, 8:, 8:].mean((1, 2)) + 1) * 127.5).tolist()
    assert abs(mean[0] - 200) < 25 and mean[1] < 80 and mean[2] < 80, mean  # composited over white: ~(228, 143, 143)


def test_the_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    """The README's Python block, executed as it stands (with the shipped models), from a folder holding the
    example file it reads."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "example_noisy.png", tmp_path / "docs" / "example_noisy.png")
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = Image.open(tmp_path / "denoised.png")
    assert out.size == Image.open(tmp_path / "docs" / "example_noisy.png").size

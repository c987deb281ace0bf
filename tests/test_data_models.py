"""Presets, image loading (modes, bad files, order, padding) and DDPM folders (models.py, data.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from tdpm_dip.config import PRESETS
from tdpm_dip.data import load_image, load_images, make_sprites
from tdpm_dip.errors import UserError
from tdpm_dip.models import build_unet, count_params, load_ddpm, save_ddpm
from tdpm_dip.noise import make_scheduler

WHITE, BLACK = 1.0, -1.0


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.params_m is not None])
def test_preset_parameter_counts(name: str) -> None:
    # On the meta device: shapes only, no memory or init time even for the 113M-parameter DDPM.
    with torch.device("meta"):
        unet = UNet2DModel(**PRESETS[name].unet_kwargs())
    assert count_params(unet) / 1e6 == pytest.approx(PRESETS[name].params_m, abs=0.01)


def test_build_unet_is_seeded() -> None:
    a, b = build_unet("dip-tiny", seed=3, sample_size=16), build_unet("dip-tiny", seed=3, sample_size=16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config.sample_size == 16


# ---------------------------------------------------------------- image modes


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 255  # red, but fully transparent...
    a[8:, :, 3] = 255  # ...except the bottom half, which is opaque red
    x = load_image(_save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, :8], torch.full_like(x[:, :8], WHITE))
    assert torch.allclose(
        x[
            :,
            8:,
            :,
        ],
        torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 16),
    )


def test_la_mode(tmp_path: Path) -> None:
    a = np.zeros((16, 16, 2), np.uint8)  # black luminance
    a[:, 8:, 1] = 255  # opaque on the right half only
    x = load_image(_save(Image.fromarray(a, "LA"), tmp_path / "la.png"), 16)
    assert torch.allclose(x[:, :, :8], torch.full_like(x[:, :, :8], WHITE))
    assert torch.allclose(x[:, :, 8:], torch.full_like(x[:, :, 8:], BLACK))


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black, index 1 green
    img.paste(1, (0, 0, 16, 8))
    img.info["transparency"] = 0  # black is transparent -> white background
    x = load_image(_save(img, tmp_path / "p.png"), 16)
    assert torch.allclose(x[:, 8:], torch.full_like(x[:, 8:], WHITE))
    assert torch.allclose(x[:, :8], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 16))


def test_16bit_grayscale_full_scale(tmp_path: Path) -> None:
    a = np.full((16, 16), 65535, np.uint16)
    a[:, 8:] = 0
    path = _save(Image.fromarray(a), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    x = load_image(path, 16)
    assert torch.allclose(x[:, :, :8], torch.full_like(x[:, :, :8], WHITE))  # 65535 -> 255, not clipped
    assert torch.allclose(x[:, :, 8:], torch.full_like(x[:, :, 8:], BLACK))


def test_grayscale_and_cmyk(tmp_path: Path) -> None:
    g = load_image(_save(Image.new("L", (16, 16), 0), tmp_path / "l.png"), 16)
    assert torch.allclose(g, torch.full_like(g, BLACK))
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    cmyk.paste((0, 255, 255, 0), (0, 0, 16, 8))  # magenta + yellow: red
    x = load_image(_save(cmyk, tmp_path / "c.tif"), 16)
    assert torch.allclose(x[:, 8:], torch.full_like(x[:, 8:], WHITE))
    assert torch.allclose(x[:, :8], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 16))


def test_pad_to_square_with_white(tmp_path: Path) -> None:
    x = load_image(_save(Image.new("RGB", (16, 8), (0, 0, 0)), tmp_path / "wide.png"), 16)
    assert torch.allclose(x[:, :4], torch.full_like(x[:, :4], WHITE))  # padding above
    assert torch.allclose(x[:, 12:], torch.full_like(x[:, 12:], WHITE))  # and below
    assert torch.allclose(x[:, 4:12], torch.full_like(x[:, 4:12], BLACK))  # the image, centred
    black = load_images(tmp_path / "wide.png", 16, fill="black").images[0]
    assert torch.allclose(black, torch.full_like(black, BLACK))


# ---------------------------------------------------------------- folders and bad files


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    sprites = make_sprites(3, 16)
    for x, name in zip(sprites.images, ["b", "a", "sub/c"]):
        arr = ((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        _save(Image.fromarray(arr), root / f"{name}.png")
    return root


def test_sorted_deterministic_order(good_folder: Path) -> None:
    a, b = load_images(good_folder, 16), load_images(good_folder, 16)
    assert a.names == ["a", "b", "sub/c"]  # the path under the folder: sub-folders never collide
    assert torch.equal(a.images, b.images) and a.images.shape == (3, 3, 16, 16)
    assert a.images.min() >= -1 and a.images.max() <= 1


@pytest.mark.parametrize("kind", ["truncated", "empty", "not-an-image"])
def test_bad_files_name_the_path(good_folder: Path, kind: str) -> None:
    bad = good_folder / "zz_bad.png"
    if kind == "truncated":
        data = (good_folder / "a.png").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("this is not a PNG\n")
    with pytest.raises(UserError, match="zz_bad.png"):
        load_images(good_folder, 16)
    with pytest.warns(UserWarning, match="zz_bad.png"):
        kept = load_images(good_folder, 16, skip_bad=True)
    assert kept.names == ["a", "b", "sub/c"]


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images"):
        load_images(tmp_path / "empty", 16)
    with pytest.raises(UserError, match="no such"):
        load_images(tmp_path / "missing", 16)


# ---------------------------------------------------------------- DDPM folders


def test_save_load_ddpm_roundtrip(tmp_path: Path) -> None:
    unet, sched = build_unet("tiny", seed=0, sample_size=16), make_scheduler("cosine")
    save_ddpm(unet, sched, tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet2, sched2 = load_ddpm(tmp_path / "m")
    sd, sd2 = unet.state_dict(), unet2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert sched2.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.allclose(sched.alphas_cumprod, sched2.alphas_cumprod)
    assert not unet2.training


def test_load_ddpm_rejects_folder_without_unet(tmp_path: Path) -> None:
    make_scheduler().save_pretrained(tmp_path / "m" / "scheduler")
    with pytest.raises(UserError, match="unet"):
        load_ddpm(tmp_path / "m")
    with pytest.raises(UserError):
        load_ddpm(tmp_path / "no-such-folder")


def test_load_ddpm_refuses_weights_that_lack_the_unets_keys(tmp_path: Path) -> None:
    """A weights file without one of the UNet's tensors, or another network's file, is one line that names what
    is missing (diffusers would leave those weights without data, and the first move to a device would fail)."""
    from safetensors.torch import load_file, save_file

    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), tmp_path / "m")
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors.pop("conv_out.bias")
    save_file(tensors, weights)
    with pytest.raises(UserError, match=r"m: cannot load the UNet weights \(the file lacks conv_out.bias\)"):
        load_ddpm(tmp_path / "m")
    save_file({"foo": torch.zeros(3)}, weights)
    with pytest.raises(UserError, match=r"the file lacks .* and \d+ more"):
        load_ddpm(tmp_path / "m")


def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # whatever the environment said at import time
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="nobody-tdpm/not-a-model"):
        load_ddpm("nobody-tdpm/not-a-model")
    assert time.perf_counter() - t0 < 20

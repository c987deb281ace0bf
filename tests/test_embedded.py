"""The embedded default models shipped in the package (the sprite DDPM and its amortized TDPM generator):
their size, config, hashes, and seeded generation without --model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from PIL import Image

from tdpm_dip import embedded
from tdpm_dip.config import get_preset
from tdpm_dip.models import load_ddpm, trained_levels


def _safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes from a safetensors header (8-byte length, then JSON), without loading the tensors."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_weights_are_within_budget_and_unchanged() -> None:
    files = embedded.shipped_files()
    assert sum(p.stat().st_size for p in files.values()) <= embedded.BUDGET_BYTES
    # Exactly the pinned files, each with its pinned hash: a changed, added or lost file fails here.
    assert set(files) == set(embedded.EXPECTED_SHA256)
    for name, path in files.items():
        assert embedded.sha256(path) == embedded.EXPECTED_SHA256[name], f"{name} changed"
    # No shipped text names a folder of the machine that exported it (diffusers' _name_or_path, say).
    for name, path in files.items():
        if name.endswith(".json"):
            text = path.read_text()
            assert "/work/" not in text and "/home/" not in text and "../shared" not in text, name
    weights = [p for name, p in files.items() if name.endswith(".safetensors")]
    assert weights and all(_safetensors_dtypes(p) == {"F16"} for p in weights)


def test_default_ddpm_config_and_loading() -> None:
    path = embedded.default_ddpm()
    assert embedded.resolve_model(None) == str(path) and embedded.resolve_model("some/model") == "some/model"
    unet, scheduler = load_ddpm(path)
    assert embedded.default_size() == unet.config.sample_size == 32
    preset = get_preset("sprites").unet_kwargs(32)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block"):
        assert tuple(np.atleast_1d(unet.config[key])) == tuple(np.atleast_1d(preset[key])), key
    assert next(unet.parameters()).dtype == torch.float32  # fp16 on disk, upcast on load
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    assert trained_levels(path, scheduler) == (1, 500)  # a truncated DDPM: amortized TDPM starts below 500


def test_the_embedded_ddpm_refuses_chains_from_pure_noise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """It was trained below level 500 only: DDIM and DDPM from pure noise are one error line, nothing written."""
    for method in ("ddim", "ddpm"):
        out = tmp_path / method
        code, _, err = run(["generate", "--method", method, "--n", "2", "--device", "cpu", "--out", out], capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "levels 1..500 only" in lines[0] and "--method tdpm" in lines[0]
        assert not out.exists()


def test_the_shipped_generator_belongs_to_the_shipped_ddpm_and_is_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tdpm_dip.generator import load_generator
    from tdpm_dip.models import ddpm_fingerprint

    path = embedded.default_generator()
    assert path is not None and embedded.resolve_generator(None, None) == str(path)
    assert embedded.resolve_generator("some/model", None) is None  # a user's --model never gets it
    unet, scheduler = load_ddpm(embedded.default_ddpm())
    gen = load_generator(path, unet, scheduler)
    assert gen.info["ddpm_fingerprint"] == ddpm_fingerprint(unet, scheduler)  # paired with these very weights
    assert (gen.t_trunc, gen.reverse_steps, gen.w_dim, gen.z_shape) == (400, 10, 64, (3, 32, 32))
    assert next(gen.unet.parameters()).dtype == torch.float32  # fp16 on disk, upcast on load
    # No --model, --method or --generator: amortized TDPM with the shipped pair, 1 + 10 calls, seeded.
    outs = []
    for name in ("a", "b"):
        code, _, err = run(["generate", "--n", "2", "--seed", "3", "--device", "cpu", "--out", tmp_path / name], capsys)
        assert code == 0, err
        res = json.loads((tmp_path / name / "result.json").read_text())
        assert (res["method"], res["nfe"], res["generator"]) == ("tdpm", 11, str(path)), res
        assert res["reverse_steps"] == 10  # the chain's steps, as the model card says; the generator's call is in nfe
        assert res["model"] == str(embedded.default_ddpm()) and res["t_trunc"] == 400
        outs.append([np.asarray(Image.open(p)) for p in sorted((tmp_path / name / "images").glob("*.png"))])
    assert all(np.array_equal(x, y) for x, y in zip(*outs)) and not np.array_equal(outs[0][0], outs[0][1])


def test_missing_embedded_model_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(embedded, "weights_dir", lambda: tmp_path / "nothing")
    code, _, err = run(["generate", "--method", "ddim", "--n", "1", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "pass --model" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_sprites_command_writes_the_recipe_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tdpm-dip sprites` (the recipe's first step): the PNGs read back as make_sprites' images, losslessly."""
    from tdpm_dip.data import load_images, make_sprites

    out = tmp_path / "s"
    code, _, err = run(["sprites", "--n", "3", "--size", "16", "--seed", "2", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}_sprite{i:05d}.png" for i in range(3)]
    assert torch.equal(load_images(out, 16).images, make_sprites(3, 16, seed=2).images)
    code, _, err = run(["sprites", "--n", "3", "--size", "4", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "--size" in err and not (tmp_path / "bad").exists()


def test_export_restorer_ships_fp16_weights_that_a_ddpm_export_keeps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from stubs import tiny_restorer

    from tdpm_dip.models import build_unet, save_ddpm
    from tdpm_dip.noise import make_scheduler
    from tdpm_dip.restoration_net import load_restorer, save_restorer

    monkeypatch.setattr(embedded, "weights_dir", lambda: tmp_path / "weights")
    trained = tmp_path / "runs" / "restorer"
    save_restorer(tiny_restorer(), trained, {"data": "/home/someone/data/train", "steps": 5})
    ddpm = tmp_path / "runs" / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), ddpm)
    shipped = embedded.export_ddpm(ddpm, name=embedded.DENOISER_NAME)
    dest = embedded.export_restorer(trained)
    assert dest == shipped / "restorer"
    record = json.loads((dest / "restorer.json").read_text())
    assert record["data"] == "train" and record["steps"] == 5  # no path of the machine that trained it
    net = load_restorer(dest)
    assert net.dtype == torch.float32  # stored as fp16, loaded as fp32
    assert torch.allclose(net.conv_out.weight, tiny_restorer().conv_out.weight.half().float())
    embedded.export_ddpm(ddpm, name=embedded.DENOISER_NAME)  # a new DDPM export keeps its restorer
    assert load_restorer(shipped / "restorer").config.block_out_channels == [8, 16]

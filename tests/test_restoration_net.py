"""The restoration network: what it is told about an observation, its folder, its training, the net and ccdf-net
methods, and a DDPM folder that ships one (then it is the default restorer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import run as run_cli
from click.testing import CliRunner
from PIL import Image
from stubs import tiny_restorer

from tdpm_dip import Restorer
from tdpm_dip.cli import cli
from tdpm_dip.data import make_sprites
from tdpm_dip.errors import UserError
from tdpm_dip.methods import Context, Job, run_restore
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.operators import Downsample, Inpaint, make_mask
from tdpm_dip.restoration_net import RESTORER_DIR, estimate, inputs, load_restorer, save_restorer
from tdpm_dip.training.options import RestorerConfig
from tdpm_dip.training.restorer import build_restorer, observe, train_restorer

SIZE = 16


def test_the_network_is_told_what_was_measured_and_how_noisy() -> None:
    start = torch.zeros(2, 3, SIZE, SIZE)
    mask = torch.stack([make_mask("random:0.5", SIZE, SIZE, s) for s in (0, 1)])
    x = inputs(start, Inpaint(mask), 0.1)
    assert x.shape == (2, 5, SIZE, SIZE)
    assert torch.equal(x[:, 3:4], mask) and torch.all(x[:, 4] == 0.1)
    x = inputs(start, Downsample(4, SIZE, SIZE), 0.0)
    assert torch.all(x[:, 3] == 1 / 16) and torch.all(x[:, 4] == 0)


def test_a_new_network_starts_as_the_classical_estimate() -> None:
    start = 0.9 * make_sprites(2, SIZE, seed=0).images
    net = build_restorer((8, 16), SIZE, seed=0)
    assert torch.equal(estimate(net, start, Downsample(2, SIZE, SIZE), 0.0), start)
    assert not torch.equal(estimate(tiny_restorer(), start, Downsample(2, SIZE, SIZE), 0.0), start)


def test_observations_are_8_bit_and_missing_pixels_hold_nothing() -> None:
    x = make_sprites(1, SIZE, seed=3).images
    for kind in ("sr2", "sr4", "random", "box", "rect", "half"):
        for seed in range(4):  # some draws are noisy
            y, op, sigma = observe(x, kind, torch.Generator().manual_seed(seed))
            levels = (y + 1) * 127.5
            known = op.mask.expand_as(y) > 0.5 if isinstance(op, Inpaint) else torch.ones_like(y, dtype=torch.bool)
            assert torch.allclose(levels[known], levels[known].round(), atol=1e-4), kind
            if isinstance(op, Inpaint):
                assert torch.all(y[~known] == 0) and 0 < op.mask.mean() < 1, kind
            else:
                assert y.shape[-1] == SIZE // op.factor, kind
            assert 0 <= sigma <= 2 * 15 / 255


def test_train_save_load_and_bad_folders(sprite_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    cfg = RestorerConfig(data=str(sprite_dir), out=str(out), size=16, repeats=1, steps=3, channels="8,16")
    train_restorer(cfg, progress=False)
    net = load_restorer(out)
    record = json.loads((out / "restorer.json").read_text())
    assert record["images"] == 8 and record["steps"] == 3 and record["format"] == "tdpm-dip restorer"
    # trained: no longer the identity on the classical estimate
    assert float(net.conv_out.weight.detach().abs().sum()) > 0
    with pytest.raises(UserError, match="exists"):
        RestorerConfig(data=str(sprite_dir), out=str(out), size=16).check()
    with pytest.raises(UserError, match="--channels"):
        RestorerConfig(data=str(sprite_dir), out=str(tmp_path / "x"), channels="8,abc").check()
    with pytest.raises(UserError, match="not a restorer folder"):
        load_restorer(tmp_path)
    from safetensors.torch import load_file, save_file

    weights = out / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors.pop("conv_out.bias")
    save_file(tensors, weights)  # a file without one of the network's tensors: one line, as for a DDPM
    with pytest.raises(UserError, match=r"r: cannot load the restorer weights \(the file lacks conv_out.bias\)"):
        load_restorer(out)
    wrong = tmp_path / "wrong"
    save_restorer(build_unet("tiny", seed=0, sample_size=SIZE), wrong, {})  # a DDPM's 3-channel UNet
    with pytest.raises(UserError, match="takes 5 channels"):
        load_restorer(wrong)


@pytest.fixture(scope="module")
def ctx(make_ctx: Callable[..., Context]) -> Context:
    return make_ctx(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), restorer=tiny_restorer())


def test_net_and_ccdf_net_keep_what_was_observed(ctx: Context) -> None:
    x = 0.8 * make_sprites(2, SIZE, seed=4).images
    op = Inpaint(torch.stack([make_mask("box", SIZE, SIZE, 0)] * 2))
    job = Job((0, 1), observed=op.A(x), operator=op, samples=2, ddim_steps=3)
    net = run_restore(ctx, "net", job)
    assert net.nfe == 1 and torch.allclose(op.A(net.images), op.A(x), atol=1e-6)
    chain = run_restore(ctx, "ccdf-net", job)
    assert chain.nfe == 1 + 2 * 3 and chain.info["start"] == "net" and chain.info["t_trunc"] == 100
    assert torch.allclose(op.A(chain.images), op.A(x), atol=1e-6)
    assert not torch.allclose(chain.images, net.images)
    # the start is the network's: a network that returns the classical estimate gives another result
    plain = run_restore(Context(ctx.unet, ctx.scheduler, restorer=build_restorer((8, 16), SIZE, 0)), "net", job)
    assert not torch.allclose(plain.images, net.images)
    with pytest.raises(UserError, match="restoration network"):
        run_restore(Context(ctx.unet, ctx.scheduler), "net", job)


@pytest.fixture(scope="module")
def with_restorer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm_restorer")
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), folder)
    save_restorer(tiny_restorer(), folder / RESTORER_DIR, {"steps": 0})
    return folder


def test_a_ddpm_folder_that_holds_a_restorer_makes_it_the_default(
    with_restorer: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    r = Restorer.from_pretrained(str(with_restorer), device="cpu", dtype="fp32")
    assert r.ctx.restorer is not None and r.methods("sr")[0] == "ccdf-net" and "net" in r.methods("inpaint")
    low = Image.fromarray(
        (make_sprites(1, 8, seed=1).images[0].permute(1, 2, 0).numpy() * 127.5 + 127.5).astype("uint8")
    )
    low.save(tmp_path / "a.png")

    def sr2(model: Path) -> list[str]:
        return ["restore", "--task", "sr", "--scale", "2", "--input", str(tmp_path / "a.png"), "--model", str(model)]

    args = sr2(with_restorer)
    res = CliRunner().invoke(cli, [*args, "--samples", "1", "--steps", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "o" / "ccdf-net" / "a.png").size == (2 * 8, 2 * 8)
    # a DDPM without one: the methods that need it are not offered, the default is ccdf
    bare = tmp_path / "bare"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), bare)
    r = Restorer.from_pretrained(str(bare), device="cpu", dtype="fp32")
    assert r.ctx.restorer is None and r.methods("sr")[0] == "ccdf" and "net" not in r.methods("sr")
    args = [*sr2(bare), "--method", "net"]
    code, _, err = run_cli([*args, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "cannot run with this DDPM (it needs a restoration network" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


def test_train_restorer_command_refuses_bad_options_in_one_line(
    sprite_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train-restorer", "--data", sprite_dir, "--out", tmp_path / "r", "--size", "12"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.strip() == "error: --size must be a multiple of 8 up to 512, got 12"
    assert not (tmp_path / "r").exists()
    code, out, _ = run_cli([*args[:-1], "16", "--steps", "2", "--repeats", "1", "--channels", "8,16"], capsys)
    assert code == 0 and load_restorer(tmp_path / "r").config.block_out_channels == [8, 16]

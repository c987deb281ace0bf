"""benchmarks/speed.py runs end to end on the CPU; benchmarks/fastdip.py's batched-matmul DIP equals fit_dip."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tdpm_dip.dip import DIPConfig, fit_dip
from tdpm_dip.errors import UserError
from tdpm_dip.models import build_unet

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "speed.py"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # benchmarks/ is not a package: its modules import as top-level names

import fastdip  # noqa: E402


def _load_script():
    spec = importlib.util.spec_from_file_location("tdpm_speed_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_speed_script_tiny_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    speed = _load_script()
    out = tmp_path / "speed.json"
    result = speed.main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--size",
            "16",
            "--n-images",
            "2",
            "--slow-images",
            "2",
            "--baseline-images",
            "1",
            "--iters",
            "2",
            "--t-trunc",
            "2",
            "--ddpm-steps",
            "3",
            "--baseline-ddpm-steps",
            "2",
            "--ddpm-batches",
            "1,2",
            "--train-batch",
            "2",
            "--train-steps",
            "2",
            "--train-warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| section | method |" in printed
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"], default=str))
    rows = data["rows"]
    errors = [(r["method"], r["error"]) for r in rows if r["error"]]
    assert not errors, errors
    by_section = {s: [r for r in rows if r["section"] == s] for s in ("dip", "ddpm", "train")}
    assert len(by_section["dip"]) == 6 and len(by_section["ddpm"]) == 4 and len(by_section["train"]) == 3
    for r in rows:
        for k in ("s_per_img", "ratio", "tflops"):
            assert r[k] is not None and math.isfinite(r[k]) and r[k] > 0, (r["method"], k, r[k])
        assert r["method"] in data["markdown"]
    base = by_section["dip"][0]
    assert base["method"].startswith("baseline") and base["ratio"] == pytest.approx(1.0)
    for r in by_section["dip"]:
        assert r["psnr"] is not None and r["d_psnr"] is not None and r["d_ssim"] is not None
        if r["dtype"] == "fp32":  # same seeds, same init (build_unet(seed) on the CPU): the same result
            assert abs(r["d_psnr"]) < 1e-3, r
    assert data["floors"]["dip_params"] > 0


def _images(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.randn(n, 3, size, size, generator=g)


@pytest.mark.parametrize("impl", fastdip.IMPLS)
def test_fit_dip_fast_matches_fit_dip(impl: str) -> None:
    target, z = _images(3)
    cfg = DIPConfig(preset="dip-tiny", iters=3)
    ref = fit_dip(target, z, [0, 1, 2], cfg, reference=target, batch_size=3)
    fast = fastdip.fit_dip_fast(target, z, [0, 1, 2], cfg, reference=target, batch_size=2, impl=impl)
    torch.testing.assert_close(fast.output, ref.output, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.loss, ref.loss, atol=1e-6, rtol=1e-4)
    assert fast.psnr.shape == ref.psnr.shape


@pytest.mark.parametrize("impl", fastdip.IMPLS)
def test_stacked_forward_and_gradients_match_each_network(impl: str) -> None:
    # "tiny" has attention in a down and an up block, and in the mid block: all go through the stacked layers.
    models = [build_unet("tiny", seed=s, sample_size=16) for s in (3, 4)]
    net = fastdip.stack_unets(models, impl)
    x, _ = _images(2)
    y = net(x, torch.zeros(2, dtype=torch.long)).sample
    (y.square().mean(dim=(1, 2, 3)).sum()).backward()
    for b, m in enumerate(models):
        yb = m(x[b : b + 1], 0).sample
        torch.testing.assert_close(y[b : b + 1], yb, atol=1e-5, rtol=1e-4)
        yb.square().mean().backward()
        grads = fastdip.unstack(net, b, grad=True)
        for name, p in m.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_unstack_round_trip_and_device_init() -> None:
    models = [build_unet("dip-tiny", seed=s, sample_size=16) for s in (0, 1)]
    net = fastdip.stack_unets(models, "taps")
    sd = fastdip.unstack(net, 1)
    ref = models[1].state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], atol=0, rtol=0)
    # Device init: image b depends only on seed b; PyTorch's default law U(+-1/sqrt(fan_in)), norms 1 / 0.
    a = fastdip.init_stacked("dip-tiny", [5, 6], "cpu", sample_size=16)
    b = fastdip.init_stacked("dip-tiny", [6], "cpu", sample_size=16)
    sa, sb = fastdip.unstack(a, 1), fastdip.unstack(b, 0)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)
    for k, w in sa.items():
        if "norm" in k:
            assert torch.all(w == (1.0 if k.endswith("weight") else 0.0)), k
        else:
            bound = 1 / math.sqrt(ref[k].numel() // ref[k].shape[0]) if k.endswith("weight") else None
            assert w.shape == ref[k].shape
            if bound is not None:
                assert w.abs().max() <= bound and ref[k].abs().max() <= bound, k
                if w.numel() >= 1000:
                    assert abs(float(w.std()) / float(ref[k].std()) - 1) < 0.1, k


def test_fastdip_rejects_bad_arguments() -> None:
    target, z = _images(1)
    with pytest.raises(UserError):
        fastdip.fit_dip_fast(target, z, [0], DIPConfig(preset="dip-tiny", iters=1), impl="winograd")
    with pytest.raises(UserError):
        fastdip.fit_dip_fast(target, z, [0], DIPConfig(preset="dip-tiny", iters=1), init="gpu")

"""`bench restore`: per-task tables and figures, and a stopped run resumes per image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdpm_dip import defaults
from tdpm_dip.api import Restorer
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.workflows import bench_restore as br


def _tiny(tmp_path: Path) -> tuple[Path, Restorer]:
    """A tiny 16 px DDPM folder and a Restorer on it (a 2-iteration dip-tiny DIP)."""
    model = tmp_path / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    return model, Restorer.from_pretrained(str(model), device="cpu", dtype="fp32", dip_preset="dip-tiny", dip_iters=2)


def test_bench_restore_writes_tables_and_resumes_per_image(
    tmp_path: Path, sprite_dir_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, restorer = _tiny(tmp_path)
    data = sprite_dir_factory(4, 16)
    restorer.ctx.batch_size = 2
    b = br.RestoreBench(str(model), str(data), 4, ("sr2", "box"), ("bicubic", "biharmonic", "ccdf"), 1, 1, 0)
    calls: list[int] = []
    real = Restorer.restore_tensors

    def counting(self, observed, *args, **kwargs):
        calls.append(len(observed))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped in bicubic's second batch
        return real(self, observed, *args, **kwargs)

    monkeypatch.setattr(Restorer, "restore_tensors", counting)
    with pytest.raises(KeyboardInterrupt):
        br.bench_restore(b, tmp_path / "run", restorer, lambda _: None)
    calls.clear()

    def count(self, observed, *args, **kwargs):
        calls.append(len(observed))
        return real(self, observed, *args, **kwargs)

    monkeypatch.setattr(Restorer, "restore_tensors", count)
    tables = br.bench_restore(b, tmp_path / "run", restorer, lambda _: None)
    # sr2: bicubic's second batch (its first was cached before the stop), then ccdf; box: biharmonic and ccdf
    assert calls == [2] * 7
    assert [r["method"] for r in tables["sr2"]] == ["bicubic", "ccdf"]
    assert [r["method"] for r in tables["box"]] == ["biharmonic", "ccdf"]
    assert all(r["n"] == 4 and r["PSNR"] > 0 for rows in tables.values() for r in rows)
    for task in ("sr2", "box"):
        md = (tmp_path / "run" / "restore" / f"{task}.md").read_text()
        assert "Settings: model " in md and "dip-tiny, 2 iterations" in md  # what was shrunk
        assert (tmp_path / "run" / "restore" / f"{task}.png").is_file()
        record = json.loads((tmp_path / "run" / "restore" / f"{task}.json").read_text())
        assert record["rows"] == json.loads(json.dumps(tables[task]))  # the table's numbers, unrounded
    calls.clear()
    br.bench_restore(b, tmp_path / "run", restorer, lambda _: None)
    assert calls == []  # everything cached: nothing recomputed


def test_bench_restore_kid_leaves_the_restored_images_out_of_its_reference(
    tmp_path: Path, sprite_dir_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from tdpm_dip.errors import UserError
    from tdpm_dip.metrics import TorchExtractor

    model, restorer = _tiny(tmp_path)
    data = sprite_dir_factory(7, 16)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    seen: list[int] = []

    def extractor(weights: str | None) -> TorchExtractor:
        ext = TorchExtractor(net, "conv")
        real = ext.__call__

        class Counting:
            def __call__(self, images: torch.Tensor) -> torch.Tensor:
                seen.append(images.shape[0])
                return real(images)

        return Counting()  # type: ignore[return-value]

    monkeypatch.setattr(br, "inception_extractor", extractor)
    b = br.RestoreBench(str(model), str(data), 4, ("box",), ("biharmonic", "ccdf"), 1, 1, 0, fid=True)
    rows = br.bench_restore(b, tmp_path / "run", restorer, lambda _: None)["box"]
    assert seen[0] == 3  # the 7 images but the 4 restored ones
    assert seen[1:] == [4, 4, 4]  # each method's outputs, then the clean images
    assert [r["method"] for r in rows] == ["biharmonic", "ccdf", "the clean images themselves"]
    kids = [r["KID"] for r in rows]
    assert all(isinstance(k, float) for k in kids) and len(set(kids)) == 3  # computed per row, not copied
    assert "KID" in (tmp_path / "run" / "restore" / "box.md").read_text()
    with pytest.raises(UserError, match="KID needs real images"):
        br.bench_restore(
            br.RestoreBench(str(model), str(data), 7, ("box",), ("biharmonic",), 1, 1, 0, fid=True),
            tmp_path / "run2",
            restorer,
            lambda _: None,
        )


def test_bench_restore_keys_its_cache_on_the_weights_and_refuses_progress(
    tmp_path: Path, sprite_dir_factory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model retrained in the same folder is another model (the key holds its weights' fingerprint, not its
    path); `--progress`, which computes nothing for table1..4, is refused for restore instead of running it all."""
    from cli_helpers import run as run_cli

    from tdpm_dip.models import build_unet, save_ddpm
    from tdpm_dip.noise import make_scheduler

    model, restorer = _tiny(tmp_path)
    b = br.RestoreBench(str(model), "data", 2, ("sr2",), ("ccdf",), 1, 1, 0)
    before = br._key(b, "sr2", "ccdf", 0, restorer)
    save_ddpm(build_unet("tiny", seed=7, sample_size=16), make_scheduler("linear"), model)  # retrained in place
    again = Restorer.from_pretrained(str(model), device="cpu", dtype="fp32", dip_preset="dip-tiny")
    assert br._key(b, "sr2", "ccdf", 0, again) != before
    # a default of the chains changed in the code is another row too, not a stale one read back
    same = br._key(b, "sr2", "ccdf", 0, again)
    monkeypatch.setattr(defaults, "RESTORE_LAMBDA", defaults.RESTORE_LAMBDA * 2)
    assert br._key(b, "sr2", "ccdf", 0, again) != same
    data = sprite_dir_factory(2, 16)
    args = ["bench", "restore", "--data", data, "--n", "2", "--tasks", "sr2", "--methods", "bicubic", "--progress"]
    code, _, err = run_cli([*args, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "--progress reports table1..4" in err and not (tmp_path / "r").exists(), err


def test_bench_restore_keeps_to_the_tables_out_rule(
    tmp_path: Path, sprite_dir_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench restore refuses a non-empty folder that is not a bench run, as the tables do, and a restore run
    folder counts as a bench run for the tables."""
    from cli_helpers import run as run_cli

    from tdpm_dip.workflows.bench import check_out_dir

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    data = sprite_dir_factory(2, 16)
    args = ["bench", "restore", "--data", data, "--n", "2", "--tasks", "sr2", "--methods", "bicubic", "--threads", "1"]
    code, _, err = run_cli([*args, "--out", other], capsys)
    assert code == 2 and "is not a bench run" in err and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    both = [*args[:-6], "--tasks", "sr2,box", "--methods", "bicubic"]
    code, _, err = run_cli([*both, "--out", tmp_path / "never"], capsys)
    assert code == 2 and "none restores box (inpaint); add one of" in err and not (tmp_path / "never").exists(), err
    (tmp_path / "r" / "restore" / "cache").mkdir(parents=True)
    assert check_out_dir(tmp_path / "r", overwrite=False) == tmp_path / "r"

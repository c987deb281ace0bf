"""`bench restore`: per-task tables and figures, and a stopped run resumes per image."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdpm_dip.api import Restorer
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.workflows import bench_restore as br


def test_bench_restore_writes_tables_and_resumes_per_image(
    tmp_path: Path, sprite_dir_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    data = sprite_dir_factory(4, 16)
    restorer = Restorer.from_pretrained(str(model), device="cpu", dtype="fp32", dip_preset="dip-tiny", dip_iters=2)
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
        assert (tmp_path / "run" / "restore" / f"{task}.md").is_file()
        assert (tmp_path / "run" / "restore" / f"{task}.png").is_file()
    calls.clear()
    br.bench_restore(b, tmp_path / "run", restorer, lambda _: None)
    assert calls == []  # everything cached: nothing recomputed

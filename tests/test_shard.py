"""Per-image work split over launched processes (shard.py) gives a single process's outputs,
each image runs once, and only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from safetensors.torch import load_file

from tdpm_dip.methods.shard import owned_batches
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

N, BATCH = 5, 2  # three batches (2 + 2 + 1): the first process gets two, the second one, the short one


@pytest.mark.parametrize("n,batch,world", [(5, 2, 2), (1, 4, 3), (17, 4, 3), (200, 16, 8), (8, 1, 3)])
def test_owned_batches_cover_each_image_once_in_whole_batches(n: int, batch: int, world: int) -> None:
    parts = [owned_batches(n, batch, r, world) for r in range(world)]
    flat = [b for p in parts for b in p]
    # the single process's batches, in order, each given to exactly one process
    assert [(b.start, b.stop) for b in flat] == [(lo, min(n, lo + batch)) for lo in range(0, n, batch)]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _without_timings(obj: object) -> object:
    """A result file's content with wall-clock fields removed (they differ from run to run)."""
    if isinstance(obj, dict):
        return {
            k: _without_timings(v)
            for k, v in obj.items()
            if k
            not in (
                "seconds",
                "dip_seconds",
                "finished",
                "load average",
                "load average when written",
                "s/img",
                "s_per_img",
            )
            and "speed-up (time)" not in k
        }
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_two_processes_equal_one(tmp_path: Path, sprite_dir_factory, capsys: pytest.CaptureFixture) -> None:
    data = sprite_dir_factory(N, 16)
    model = tmp_path / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    common = [
        "--model",
        model,
        "--device",
        "cpu",
        "--batch-size",
        BATCH,
        "--dip-preset",
        "dip-tiny",
        "--dip-iters",
        "3",
    ]

    def commands(root: Path) -> list[list[str]]:
        bench = [
            "bench",
            "table2",
            "--protocol",
            "blind",
            "--model",
            model,
            "--data",
            data,
            "--n",
            N,
            "--device",
            "cpu",
            "--batch-size",
            BATCH,
            "--fig-images",
            2,
            "--out",
            root / "bench",
        ]
        cmds = [
            [
                "generate",
                "--method",
                "tdpm-dip",
                "--reference-data",
                data,
                "--n",
                N,
                "--t-trunc",
                3,
                *common,
                "--out",
                root / "gen",
            ],
            [
                "denoise",
                "--clean",
                data,
                "--method",
                "ensemble",
                "--method",
                "tdpm-dip",
                "--t-trunc",
                3,
                "--samples",
                1,
                *common,
                "--out",
                root / "den",
            ],
            [*bench, "--methods", "tweedie"],
            [*bench, "--methods", "tweedie,ddim"],
        ]  # a re-run: tweedie comes from the cache
        return [[str(a) for a in c] for c in cmds]

    for argv in commands(tmp_path / "one"):
        code, _, err = run(argv, capsys)
        assert code == 0, err

    two, logs = tmp_path / "two", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).with_name("shard_worker.py")),
            str(two),
            json.dumps(commands(two)),
            str(logs),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Each image ran exactly once, on one process; both processes worked.
    calls: dict[tuple[int, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for rank in (0, 1):
        for line in (logs / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            calls[(rec["command"], rec["method"])][rank] += rec["seeds"]
    assert sorted(calls) == [
        (0, "generate/paper/tdpm-dip"),
        (1, "denoise/blind/ensemble"),
        (1, "denoise/blind/tdpm-dip"),
        (2, "denoise/blind/tweedie"),
        (3, "denoise/blind/ddim"),
    ], sorted(calls)  # the re-run skipped the cached row
    for key, by_rank in calls.items():
        assert sorted(by_rank) == [0, 1], key
        # every command runs in parts of one batch per process, each kept as it finishes: [0, 4), [4, 5)
        assert by_rank[0] == [0, 1, 4] and by_rank[1] == [2, 3], (key, dict(by_rank))

    # The same files: images bit for bit, figures and metrics equal up to timings.
    one = tmp_path / "one"
    a, b = _files(one), _files(two)
    cache = [k for k in a if k.startswith("bench/cache/")]
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".json"):
            assert _without_timings(json.loads(a[name])) == _without_timings(json.loads(b[name])), name
        elif name.endswith(".md") or name.endswith(".csv"):
            continue  # tables of the JSON above, with timings
        elif not name.startswith("bench/cache/") and name != "bench/table2_cost.png":  # cost plots s/img
            assert a[name] == b[name], name
    for name in cache:  # the bench cache holds the float images: equal bit for bit
        if name.endswith(".safetensors"):
            ta, tb = (load_file(r / name) for r in (one, two))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert len([k for k in cache if k.endswith(".safetensors") and "/images/" not in k]) == 2

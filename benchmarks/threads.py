"""The thread policy side by side: `tdpm-dip denoise` with one thread, with every core, and with --threads 0
(auto: every core when the 1-minute load average is under half the cores, else one), on an idle machine and
on a machine whose cores a busy process keeps loaded.

Each run is a fresh `tdpm-dip denoise --input` process on the same noisy files (the shipped denoiser, the
default method). The sides are interleaved and repeated; the table gives each side's minimum and median
seconds per image (the command's own compute time, metrics.json) and its wall time, with the load average
seen at its start.

    python benchmarks/threads.py --n 16 --repeats 3 --out runs/threads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tdpm_dip.outputs import markdown_table, write_text


def noisy_files(folder: Path, n: int) -> Path:
    """n procedural sprites at 64 px with 8-bit noise of sigma 25 (made once)."""
    if not (folder / "noisy").is_dir():
        sprites = folder / "sprites"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tdpm_dip.cli",
                "sprites",
                "--n",
                str(n),
                "--size",
                "64",
                "--seed",
                "1",
                "--out",
                str(sprites),
                "--overwrite",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tdpm_dip.cli",
                "add-noise",
                "--input",
                str(sprites),
                "--sigma",
                "25",
                "--out",
                str(folder),
                "--overwrite",
            ],
            check=True,
            capture_output=True,
        )
    return folder / "noisy"


def burner(cores: int) -> list[subprocess.Popen]:
    """`cores` processes that each keep one core busy (the load another user's job puts on the machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]


def one_run(noisy: Path, out: Path, threads: int) -> dict:
    """One denoise process; returns its s/img (compute), wall seconds and the load average at its start."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the command's own policy decides
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tdpm_dip.cli",
            "denoise",
            "--input",
            str(noisy),
            "--sigma",
            "25",
            "--threads",
            str(threads),
            "--out",
            str(out),
            "--overwrite",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    return {"s_img": rows[0]["s/img"], "wall": wall, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="noisy 64 px files denoised per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and condition (interleaved)")
    ap.add_argument("--busy", type=int, default=2, help="busy processes in the loaded condition")
    ap.add_argument("--out", default="runs/threads", help="working folder; threads.md and threads.json go here")
    args = ap.parse_args()
    out = Path(args.out)
    noisy = noisy_files(out / "data", args.n)
    cores = os.cpu_count() or 1
    sides = {"1 thread": 1, f"{cores} threads": cores, "auto (--threads 0)": 0}
    results: dict[tuple[str, str], list[dict]] = {}
    for condition in ("idle", "loaded"):
        procs = burner(args.busy) if condition == "loaded" else []
        try:
            if procs:
                time.sleep(20)  # let the 1-minute load average see the busy processes
            for _ in range(args.repeats):
                for side, threads in sides.items():
                    results.setdefault((condition, side), []).append(one_run(noisy, out / "den", threads))
        finally:
            for p in procs:
                p.kill()
        if condition == "idle":
            time.sleep(5)
    rows = []
    for (condition, side), runs in results.items():
        s = [r["s_img"] for r in runs]
        rows.append(
            {
                "machine": f"{condition} ({args.busy} busy processes)" if condition == "loaded" else condition,
                "threads": side,
                "min s/img": round(min(s), 4),
                "median s/img": round(statistics.median(s), 4),
                "min wall s": round(min(r["wall"] for r in runs), 2),
                "load average": ", ".join(f"{r['load']:.1f}" for r in runs),
            }
        )
    table = markdown_table(rows)
    write_text(out / "threads.md", f"# Thread policy: denoise, {args.n} files of 64 px, {cores} cores\n\n{table}\n")
    write_text(out / "threads.json", json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()

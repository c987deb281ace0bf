"""Interruptions lose nothing: real SIGINT, SIGTERM and SIGKILL sent to running commands.

Every command (train, generate, denoise, demo, bench) first completes a run; then a second run into the
same folder (--overwrite, or a bench re-run) is interrupted during its work (training, DIP fitting) or
while it writes its results. Afterwards the first run's files are byte-identical, nothing partial is
left beside or inside them, and the exit code is 130 (SIGINT) or 143 (SIGTERM). After a SIGKILL, `train
--resume` continues from the last complete checkpoint and a bench re-run recomputes only the unfinished
row.

The commands run in child processes forked from this one, through `tdpm_dip.cli.main` as `tdpm-dip`
would run them, and get their signals from os.kill: a fresh interpreter spends ~8 s on 2 cores importing
torch and diffusers, which a fork skips. `test_sigterm_to_python_m_cli` runs one case as `python -m
tdpm_dip.cli`. Signals are sent when the child has shown it is working (a file, a progress bar on
stderr), is paused right after one of its writes (`_pause_on_write`) or inside one of its calls
(`_pause_in_call`), never after a fixed sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import DEMO_SHRUNK
from safetensors.torch import load_file

from tdpm_dip.cli import main
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler
from tdpm_dip.outputs import recover_swap, signals_deferred, staged_dir
from tdpm_dip.training.ddpm import train
from tdpm_dip.training.loop import list_checkpoints
from tdpm_dip.training.options import TrainConfig

SIZE = 16
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
FOREVER = "100000"  # steps / DIP iterations of a run that is interrupted long before it ends
TINY_TRAIN = [
    "--preset",
    "tiny",
    "--size",
    str(SIZE),
    "--batch-size",
    "2",
    "--warmup-steps",
    "0",
    "--sample-every",
    "0",
    "--n-samples",
    "0",
    "--log-every",
    "1",
]
TINY_DIP = ["--dip-preset", "dip-tiny", "--dip-iters", "2", "--n", "2"]
# `demo` shrunk to seconds, on a tiny model of its own
TINY_DEMO = ["--no-embedded", "--size", str(SIZE), *DEMO_SHRUNK]


# ------------------------------------------------------------------------------------------ helpers


def tree(path: Path) -> dict[str, str]:
    """Every file and folder under `path` (hidden ones included): folders map to '/', files to a hash."""
    return {
        p.relative_to(path).as_posix(): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of staged writes anywhere under `root`."""
    return [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if ".partial." in p.name or p.name.endswith(".tmp") or p.name == ".tdpm-dip-write-test"
    ]


def run_inline(args: list[object]) -> None:
    """A command that must succeed, run in this process."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), f"exit {e.code}: {args}"


def _pause_on_write(name: str, nth: int) -> None:
    """(In the child) after the `nth` atomic write of a file called `name`, say so and sleep: a signal then
    arrives while the command is writing its results."""
    import tdpm_dip.images
    import tdpm_dip.outputs as outputs
    import tdpm_dip.reporting

    real, seen = outputs.atomic_path, [0]

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] == nth:
                print(f"PAUSED after writing {path}", file=sys.stderr, flush=True)
                time.sleep(600)

    for module in (outputs, tdpm_dip.images, tdpm_dip.reporting):  # every module that writes result files
        module.atomic_path = atomic_path


def _pause_in_call(module: str, name: str, when: Callable[..., bool]) -> None:
    """(In the child) replace `module.name` (a function, where its callers look it up) so that a call whose
    arguments satisfy `when` says so and sleeps before doing its work: a signal then arrives in the middle of
    the work that call belongs to, whatever the machine's speed."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def paused(*args, **kwargs):
        if when(*args, **kwargs):
            print(f"PAUSED in {module}.{name}", file=sys.stderr, flush=True)
            time.sleep(600)
        return real(*args, **kwargs)

    setattr(mod, name, paused)


class Child:
    """`tdpm-dip ARGS` in a forked process (`fresh`: in `python -m tdpm_dip.cli`): stdout and stderr go to
    `log`. `pause_on_write` (`_pause_on_write`) and `pause_in` (`_pause_in_call`) pause the child at a known
    point of its work."""

    def __init__(
        self,
        args: list[object],
        log: Path,
        pause_on_write: tuple[str, int] | None = None,
        fresh: bool = False,
        pause_in: tuple[str, str, Callable[..., bool]] | None = None,
    ) -> None:
        self.log, self.code, self.proc = log, None, None
        if fresh:
            assert pause_on_write is None and pause_in is None
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            with open(log, "w") as f:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tdpm_dip.cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=env
                )
            self.pid = self.proc.pid
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if pause_on_write:
                    _pause_on_write(*pause_on_write)
                if pause_in:
                    _pause_in_call(*pause_in)
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> int | None:
        if self.proc is not None:
            self.code = self.proc.poll()
        elif self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.poll() is None, f"exited ({self.code}) before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.02)

    def wait_for_text(self, text: str) -> None:
        self.wait_for(lambda: text in self.text(), repr(text))

    def wait(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"did not exit within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)
        assert self.code is not None
        return self.code

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
            else:
                os.waitpid(self.pid, 0)
            self.code = -9


@contextlib.contextmanager
def child(
    args: list[object],
    log: Path,
    pause_on_write: tuple[str, int] | None = None,
    fresh: bool = False,
    pause_in: tuple[str, str, Callable[..., bool]] | None = None,
):
    c = Child(args, log, pause_on_write, fresh, pause_in)
    try:
        yield c
    finally:
        c.kill()


def staged(parent: Path, name: str) -> Callable[[str], bool]:
    """`ready(rel)`: whether the staging folder of parent/name holds `rel` yet."""
    return lambda rel: any((p / rel).exists() for p in parent.glob(f".{name}.partial.*"))


# ------------------------------------------------------------------------------------------ complete runs


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), path)
    return path


def _args(cmd: str, sprite_dir: Path, model: Path) -> list[object]:
    """The arguments of a tiny, complete run of `cmd` (without --out)."""
    return {
        "train": ["train", "--data", sprite_dir, *TINY_TRAIN, "--steps", "2", "--checkpoint-every", "1"],
        "generate": [
            "generate",
            "--model",
            model,
            "--method",
            "tdpm-dip",
            "--reference-data",
            sprite_dir,
            "--t-trunc",
            "2",
            *TINY_DIP,
        ],
        "denoise": ["denoise", "--model", model, "--clean", sprite_dir, "--method", "dip", "--sigma", "25", *TINY_DIP],
        "demo": ["demo", *TINY_DEMO],
        "bench": [
            "bench",
            "table2",
            "--model",
            model,
            "--data",
            sprite_dir,
            "--t-noisy",
            "5",
            "--t-trunc",
            "2",
            "--fig-images",
            "2",
            *TINY_DIP,
        ],
    }[cmd]


@pytest.fixture(scope="module")
def complete(sprite_dir: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`complete(cmd)`: the folder of a finished tiny run of `cmd` (made once; tests copy it)."""
    done: dict[str, Path] = {}

    def make(cmd: str) -> Path:
        if cmd not in done:
            out = tmp_path_factory.mktemp(f"complete_{cmd}") / "out"
            run_inline([*_args(cmd, sprite_dir, model), "--out", out])
            done[cmd] = out
        return done[cmd]

    return make


# ------------------------------------------------------------------------------------------ SIGINT / SIGTERM

# (command, where the signal lands, extra arguments of the interrupted run, how to know it got there)
# how: ("staged", rel) a file in the new run's staging folder; ("text", s) a line on stderr;
#      ("write", name) paused right after writing the file `name` into the staging folder.
POINTS = {
    ("train", "training"): (["--steps", FOREVER, "--checkpoint-every", "2"], ("staged", "checkpoints/step_000002")),
    ("train", "writing"): (["--steps", "4", "--checkpoint-every", "2"], ("write", "training_state.json")),
    ("generate", "fitting"): (["--dip-iters", FOREVER], ("text", "DIP fit")),
    ("generate", "writing"): (["--seed", "3"], ("write", "grid.png")),
    ("denoise", "fitting"): (["--dip-iters", FOREVER], ("text", "DIP fit")),
    ("denoise", "writing"): (["--seed", "3"], ("write", "comparison.png")),
    ("demo", "training"): (["--steps", FOREVER], ("staged", "train/metrics.jsonl")),
    ("demo", "fitting"): (["--dip-iters", FOREVER], ("text", "DIP fit")),
    ("demo", "writing"): (["--seed", "3"], ("write", "metrics.json")),
    ("bench", "fitting"): (["--dip-iters", FOREVER], ("text", "DIP fit")),
    ("bench", "writing"): ([], ("write", "table2.csv")),
}
# Both signals at every point would take ~2 minutes on 2 cores: each point gets one signal here, each
# command both; TDPM_SLOW=1 adds the other signal at every point.
FAST = {
    ("train", "training"): signal.SIGINT,
    ("train", "writing"): signal.SIGTERM,
    ("generate", "fitting"): signal.SIGTERM,
    ("generate", "writing"): signal.SIGINT,
    ("denoise", "fitting"): signal.SIGINT,
    ("denoise", "writing"): signal.SIGTERM,
    ("demo", "training"): signal.SIGTERM,
    ("demo", "fitting"): signal.SIGINT,
    ("demo", "writing"): signal.SIGTERM,
    ("bench", "fitting"): signal.SIGTERM,
    ("bench", "writing"): signal.SIGINT,
}
SLOW = pytest.mark.skipif(not os.environ.get("TDPM_SLOW"), reason="the other signal at this point; set TDPM_SLOW=1")
CASES = [
    pytest.param(
        cmd,
        where,
        sig,
        id=f"{cmd}-{where}-{sig.name}",
        marks=() if FAST[cmd, where] == sig else (pytest.mark.slow, SLOW),
    )
    for (cmd, where) in POINTS
    for sig in (signal.SIGINT, signal.SIGTERM)
]


@pytest.mark.parametrize("cmd,where,sig", CASES)
def test_interrupted_rerun_keeps_the_complete_run(
    cmd: str,
    where: str,
    sig: signal.Signals,
    sprite_dir: Path,
    model: Path,
    complete: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    interrupt_rerun(cmd, where, sig, _args(cmd, sprite_dir, model), complete(cmd), tmp_path)


def test_sigterm_to_python_m_cli(
    sprite_dir: Path, model: Path, complete: Callable[[str], Path], tmp_path: Path
) -> None:
    """One case again through a fresh `python -m tdpm_dip.cli`, as a service manager would stop it."""
    interrupt_rerun(
        "train", "training", signal.SIGTERM, _args("train", sprite_dir, model), complete("train"), tmp_path, fresh=True
    )


def interrupt_rerun(
    cmd: str, where: str, sig: signal.Signals, args: list[object], previous: Path, tmp_path: Path, fresh: bool = False
) -> None:
    """Copy the complete run `previous`, interrupt a re-run of `args` into the copy at `where` with `sig`
    and check that the copy is unchanged, byte for byte, with nothing partial beside or inside it."""
    out = tmp_path / "out"
    shutil.copytree(previous, out, symlinks=True)
    before = tree(out)
    extra, (how, what) = POINTS[cmd, where]
    overwrite = [] if cmd == "bench" else ["--overwrite"]  # a bench re-run resumes into its folder
    args = [*args, *extra, "--out", out, *overwrite]
    with child(args, tmp_path / "log.txt", (what, 1) if how == "write" else None, fresh) as c:
        if how == "staged":
            c.wait_for(lambda: staged(tmp_path, "out")(what), f"{what} in the staging folder")
        else:
            c.wait_for_text("PAUSED" if how == "write" else what)
        os.kill(c.pid, sig)
        code = c.wait()
    log = c.text()
    assert code == EXIT[sig], log[-3000:]
    assert "interrupted" in log and "Traceback" not in log, log[-3000:]
    assert tree(out) == before  # the complete run, byte for byte, and nothing added to it
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_staged_demo_names_its_final_folder(complete: Callable[[str], Path]) -> None:
    """The demo trains inside its staging folder; what it writes names the run folder instead."""
    out = complete("demo")
    for f in ("report.md", "metrics.json", "train/config.json"):
        assert ".partial." not in (out / f).read_text(), f
    assert json.loads((out / "train" / "config.json").read_text())["config"]["data"] == str(out / "data" / "train")


# ------------------------------------------------------------------------------------------ SIGKILL


def test_kill_9_mid_checkpoint_then_resume(sprite_dir: Path, tmp_path: Path) -> None:
    """kill -9 while the step-4 checkpoint is being written: --resume restarts from step 2 and ends where an
    uninterrupted run ends."""
    out = tmp_path / "run"
    base = [
        "train",
        "--data",
        sprite_dir,
        *TINY_TRAIN,
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "5",
        "--out",
        out,
    ]
    with child(base, tmp_path / "log.txt", ("training_state.json", 2)) as c:
        c.wait_for_text("PAUSED")
        c.kill()
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    run_inline([*base, "--resume"])
    conf = json.loads((out / "config.json").read_text())
    assert Path(conf["resumed_from"]).name == "step_000002"
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004", "step_000006"]
    assert not leftovers(tmp_path), leftovers(tmp_path)  # the cut checkpoint's staging folder is gone too
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    full = tmp_path / "full"
    train(
        TrainConfig(
            data=str(sprite_dir),
            out=str(full),
            preset="tiny",
            size=SIZE,
            steps=6,
            batch_size=2,
            warmup_steps=0,
            checkpoint_every=2,
            sample_every=0,
            n_samples=0,
            log_every=1,
        ),
        progress=False,
    )
    a = load_file(full / "checkpoints" / "step_000006" / "ema.safetensors")
    b = load_file(out / "checkpoints" / "step_000006" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_row_then_bench_rerun(sprite_dir: Path, model: Path, tmp_path: Path) -> None:
    """kill -9 while bench computes its third row: the re-run reads the two finished rows from RUN/cache
    (untouched) and computes only the third.

    The third row (paper TDPM-DIP) is paused in the middle of its work, after its DIP fit and before its
    reverse chain (the first `chain` call with the TDPM description; the DDPM row's chain has its own, the DIP
    row runs none): the kill cannot come after the row has finished, however fast it runs."""
    out = tmp_path / "bench"
    args = [*_args("bench", sprite_dir, model), "--out", out]
    rows = lambda: sorted((out / "cache").glob("*.json")) if (out / "cache").is_dir() else []
    third_row = (
        "tdpm_dip.methods.paper",
        "chain",
        lambda *a, **k: k.get("desc", a[4] if len(a) > 4 else None) == "TDPM reverse",
    )
    with child(args, tmp_path / "log.txt", pause_in=third_row) as c:
        c.wait_for_text("PAUSED in tdpm_dip.methods.paper.chain")
        assert len(rows()) == 2 and "running TDPM-DIP" in c.text(), c.text()[-3000:]
        c.kill()
    finished = {
        p.relative_to(out / "cache"): p.read_bytes()
        for p in (out / "cache").rglob("*")
        if p.is_file() and not p.name.endswith(".tmp")
    }
    assert len(rows()) == 2 and not (out / "table2.md").exists()
    with child(args, tmp_path / "log2.txt") as c:
        assert c.wait() == 0, c.text()[-3000:]
    log = c.text()
    assert "2 row(s) found" in log and log.count("running ") == 1 and "running TDPM-DIP" in log, log[-3000:]
    assert all((out / "cache" / name).read_bytes() == data for name, data in finished.items())
    assert len(rows()) == 3 and (out / "table2.md").is_file()


# ------------------------------------------------------------------------------------------ the mechanism


def test_signals_are_held_during_the_swap() -> None:
    reached = []
    # Python's own SIGINT handler, whatever an earlier test or library left installed in this process.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a handler would have run by now
                reached.append("end of block")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == ["end of block"]


def test_swap_replaces_own_outputs_and_keeps_other_files(tmp_path: Path) -> None:
    final = tmp_path / "out"
    (final / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (final / "images" / name).write_text("old")
    (final / "stale.png").write_text("old")
    (final / "mine.txt").write_text("user")
    with staged_dir(final, owned=("images", "stale.png")) as tmp:
        (tmp / "images").mkdir()
        (tmp / "images" / "a.png").write_text("new")
    assert tree(final).keys() == {"images", "images/a.png", "mine.txt"}
    assert (final / "images" / "a.png").read_text() == "new" and (final / "mine.txt").read_text() == "user"
    assert not leftovers(tmp_path)

    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "mine.txt").write_text("half")
        raise RuntimeError
    assert (final / "mine.txt").read_text() == "user" and not leftovers(tmp_path)


def test_swap_cut_by_kill_9_is_recovered(tmp_path: Path) -> None:
    """A kill -9 between the two renames of a swap leaves the old folder beside an absent (or since
    recreated, empty) one: the next command puts it back."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "report.md").write_text("old")
    aside = tmp_path / ".out.old.partial.123"
    final.rename(aside)
    final.mkdir()
    recover_swap(final)
    assert (final / "report.md").read_text() == "old" and not aside.exists()

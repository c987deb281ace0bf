"""`tdpm-dip app` over real HTTP (gradio_client against a server in its own process, a tiny DDPM): one upload
cannot block the page, each request keeps to its stated budget, and the server leaves no temporary files."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdpm_dip import defaults
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gradio_client") is None or importlib.util.find_spec("gradio") is None,
    reason="needs the app extra (gradio)",
)
WAIT = 120  # seconds for the server to start (a busy 2-core machine)
MAX_SECONDS = 20  # the server's time budget per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(url, the server's TMPDIR): `tdpm-dip app` with a tiny DDPM and a 20 s budget, on a free localhost port."""
    root = tmp_path_factory.mktemp("app")
    model = root / "ddpm"
    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    tmp = root / "tmp"
    tmp.mkdir()
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}
    env["GRADIO_TEMP_DIR"] = str(root / "gradio")  # Gradio's own upload cache: not ours to clean
    log = open(root / "server.log", "wb")
    args = ["app", "--model", model, "--device", "cpu", "--port", port, "--max-seconds", MAX_SECONDS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdpm_dip.cli", *map(str, args)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in {WAIT} s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert list(tmp.iterdir()) == [], "the server left temporary files behind"


def _png(path: Path, w: int, h: int, seed: int = 0, flat: bool = False) -> Path:
    if flat:
        Image.new("RGB", (w, h), (120, 130, 140)).save(path)
    else:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _denoise(url: str, path: Path, seed: float = 0, method: str = "tweedie") -> tuple:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return client.predict(handle_file(str(path)), None, method, "25", seed, api_name="/run_denoise")


def test_the_page_states_the_budget(server: tuple[str, Path]) -> None:
    with urllib.request.urlopen(server[0], timeout=30) as r:
        page = r.read().decode()
    assert f"stops after {MAX_SECONDS:g} s" in page and f"at most {defaults.APP_QUEUE_SIZE} wait" in page


def test_a_huge_upload_is_refused_and_blocks_no_one(server: tuple[str, Path], tmp_path: Path) -> None:
    """A flat PNG of 4100x4100 px (a few KB, over the 16 Mpx upload limit) is refused from its header; a small
    request sent at the same time is answered within 30 s."""
    from gradio_client.exceptions import AppError

    url = server[0]
    big = _png(tmp_path / "flat.png", 4100, 4100, flat=True)
    small = _png(tmp_path / "small.png", 24, 24)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        huge = pool.submit(_denoise, url, big)
        time.sleep(0.5)
        quick = pool.submit(_denoise, url, small)
        with pytest.raises(AppError, match=r"4100x4100 px \(16.8 Mpx\), over the limit of 16 Mpx") as e:
            huge.result(timeout=60)
        refused = time.monotonic()
        assert "--max-megapixels" not in str(e.value) and "/tmp" not in str(e.value)
        out = quick.result(timeout=60)
        assert time.monotonic() - refused < 30 and refused - t0 < 60
    assert np.asarray(Image.open(out[1])).shape[:2] == (24, 24)


def test_a_request_over_its_time_budget_stops_with_one_line(server: tuple[str, Path], tmp_path: Path) -> None:
    """Posterior chains over an image of the pixel budget, in the tiny model's 48 px tiles, take minutes: the request
    stops between tiles once its 20 s are spent."""
    from gradio_client.exceptions import AppError

    big = _png(tmp_path / "big.png", 512, 512)
    t0 = time.monotonic()
    with pytest.raises(AppError, match=f"more than the {MAX_SECONDS:g} s a request may take"):
        _denoise(server[0], big, method="ddpm")
    assert MAX_SECONDS <= time.monotonic() - t0 < MAX_SECONDS + 30


def test_a_cancelled_request_frees_the_server(server: tuple[str, Path], tmp_path: Path) -> None:
    """A visitor who leaves (the client cancels) stops their request between tiles: the next one is answered long
    before the first's 20 s budget would have run out."""
    from gradio_client import Client, handle_file

    big = _png(tmp_path / "big.png", 512, 512)
    small = _png(tmp_path / "small.png", 24, 24)
    client = Client(server[0], verbose=False)
    job = client.submit(handle_file(str(big)), None, "ddpm", "25", 0, api_name="/run_denoise")
    deadline = time.monotonic() + 30
    while job.status().code.name in ("STARTING", "JOINING_QUEUE", "IN_QUEUE", "SENDING_DATA"):
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.2)
    time.sleep(1)
    t0 = time.monotonic()
    job.cancel()  # (gradio_client may wait here for the server's answer)
    out = _denoise(server[0], small)
    assert time.monotonic() - t0 < MAX_SECONDS / 2 and np.asarray(Image.open(out[1])).shape[:2] == (24, 24)
    # the cancelled request's work stopped (not only its place in the queue): the server's console says so
    log = server[1].parent / "server.log"
    deadline = time.monotonic() + 10
    while "its work stopped" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)


def test_bad_seeds_are_one_line(server: tuple[str, Path], tmp_path: Path) -> None:
    from gradio_client.exceptions import AppError

    small = _png(tmp_path / "small.png", 24, 24)
    with pytest.raises(AppError, match=r"seed must be in 0\.\.") as e:
        _denoise(server[0], small, seed=2.0**70)
    assert "internal error" not in str(e.value) and "Error" not in str(e.value).split(":")[0]

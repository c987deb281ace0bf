"""`tdpm-dip app` in a real browser: headless Chromium drives the page served on localhost.

Opt-in: it runs where the `app-test` extra (gradio, selenium) and Debian's `chromium` and
`chromium-driver` are installed (`apt-get install -y chromium chromium-driver`), and is skipped elsewhere.
    pip install -e '.[test,app-test]' && pytest -m app tests/test_app_browser.py
TDPM_APP_SCREENSHOT=docs/app_screenshot.png also writes the README's screenshot (TDPM_APP_MODEL=M serves
the DDPM M instead of a tiny untrained one; the README's screenshot used a 64 px Pokémon DDPM).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tdpm_dip.data import make_sprites
from tdpm_dip.models import build_unet, save_ddpm
from tdpm_dip.noise import make_scheduler

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MISSING = [
    what
    for what, ok in [
        ("gradio", importlib.util.find_spec("gradio")),
        ("selenium", importlib.util.find_spec("selenium")),
        (str(CHROMIUM), CHROMIUM.is_file()),
        (str(CHROMEDRIVER), CHROMEDRIVER.is_file()),
    ]
    if not ok
]
pytestmark = [pytest.mark.app, pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)}")]

WAIT = 120  # seconds for the server to start and for one request (a busy 2-core machine)
UI_WAIT = 20  # seconds for the page to react to a click


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tdpm-dip app` with a tiny DDPM, in its own process, on a free localhost port."""
    root = tmp_path_factory.mktemp("app")
    model = os.environ.get("TDPM_APP_MODEL")  # a real DDPM for the README's screenshot; default: a tiny one
    if model is None:
        model = str(root / "ddpm")
        save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), model)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdpm_dip.cli", "app", "--model", model, "--device", "cpu", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    # An explicit driver: Selenium Manager (which would look for and download one) never runs.
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _noisy_png(path: Path, h: int = 64, w: int = 96) -> Path:
    """A sprite with 8-bit noise (sigma 25) at `path`, its original beside it (clean_<name>)."""
    top, left = (max(h, w) - h) // 2, (max(h, w) - w) // 2  # the centre of a square sprite
    sprite = make_sprites(1, max(h, w), seed=3).images[0, :, top : top + h, left : left + w]
    x = (sprite.permute(1, 2, 0).numpy() + 1) * 127.5
    y = np.clip(np.round(x + np.random.default_rng(0).normal(0, 25, x.shape)), 0, 255).astype(np.uint8)
    Image.fromarray(y).save(path)
    Image.fromarray(np.round(x).astype(np.uint8)).save(path.with_name(f"clean_{path.name}"))
    return path


def _wait(driver: object, cond: object, what: str, timeout: float = WAIT) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(cond, message=f"timed out waiting for {what}")


def _upload(driver: object, elem_id: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    for clear in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} button[aria-label=Clear]"):
        clear.click()  # a file is there already: remove it, as a user does, to get the upload button back
    field = _wait(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input[type=file]"), "an empty upload", UI_WAIT
    )
    field[0].send_keys(str(path))
    _wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#{elem_id} td.filename[aria-label="{path.name}"]'),
        f"{path.name} in the upload box",
        UI_WAIT,
    )


def _choose(driver: object, elem_id: str, value: str) -> None:
    """Pick an option of a Gradio dropdown as a user does: open it, type, take the match."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)

    def match(d: object) -> object:
        options = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} li[role=option]")
        return next((o for o in options if o.get_attribute("aria-label").startswith(value)), False)

    option = _wait(driver, match, f"option {value}", UI_WAIT)
    option.click()
    _wait(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").get_attribute("value").startswith(value),
        f"{value} chosen",
        UI_WAIT,
    )


def _result_src(driver: object) -> str | None:
    from selenium.webdriver.common.by import By

    imgs = driver.find_elements(By.CSS_SELECTOR, "#denoise-result img")
    return imgs[0].get_attribute("src") if imgs else None


def _denoise_and_read(driver: object, previous: str | None) -> Image.Image:
    """Click Denoise, wait for a new result image, and fetch it the way the page does."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "denoise-button").click()
    src = _wait(driver, lambda d: (s := _result_src(d)) and s != previous and s, "the result image")
    with urllib.request.urlopen(src, timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def test_denoise_in_the_browser(server: str, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()
    noisy = _noisy_png(tmp_path / "noisy.png")
    browser.get(server)
    _wait(browser, lambda d: d.find_elements(By.ID, "denoise-button"), "the page", UI_WAIT)
    browser.save_screenshot(str(shots / "0_page.png"))

    # 1. a noisy PNG, the fastest method (tweedie, one network call), sigma estimated
    _upload(browser, "noisy-upload", noisy)
    _choose(browser, "denoise-method", "tweedie")
    out = _denoise_and_read(browser, None)
    assert out.size == Image.open(noisy).size  # the upload's size, not the model's 16 px
    a = np.asarray(out, dtype=float)
    assert np.isfinite(a).all() and not np.array_equal(a, np.asarray(Image.open(noisy).convert("RGB"), float))
    summary = _wait(
        browser, lambda d: (t := d.find_element(By.ID, "denoise-summary").text) and "tweedie" in t and t, "the summary"
    )
    assert "NFE 1" in summary and "(estimated)" in summary and "96x64 px" in summary
    download = browser.find_element(By.CSS_SELECTOR, "#denoise-download a").get_attribute("href")
    with urllib.request.urlopen(download, timeout=30) as r:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB")), np.asarray(out))
    browser.save_screenshot(str(shots / "1_denoised.png"))
    if os.environ.get("TDPM_APP_SCREENSHOT"):  # the README's screenshot, palette PNG to stay small
        browser.execute_script("window.scrollTo(0, 0)")
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        shot.quantize(64).save(os.environ["TDPM_APP_SCREENSHOT"], optimize=True)

    # 2. a corrupt file: one clear line in the page, no traceback
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _upload(browser, "noisy-upload", bad)
    browser.find_element(By.ID, "denoise-button").click()
    _wait(
        browser,
        lambda d: "noisy image corrupt.png: not an image" in d.find_element(By.TAG_NAME, "body").text,
        "the error message",
    )
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and str(tmp_path) not in body
    browser.save_screenshot(str(shots / "2_bad_upload.png"))

    # 3. the server keeps serving: another good request, with a clean image for PSNR/SSIM and a given sigma
    noisy2 = _noisy_png(tmp_path / "noisy2.png", 40, 28)
    _upload(browser, "noisy-upload", noisy2)
    _upload(browser, "clean-upload", noisy2.with_name("clean_noisy2.png"))
    sigma = browser.find_element(By.CSS_SELECTOR, "#sigma textarea, #sigma input")
    sigma.send_keys("25")
    out2 = _denoise_and_read(browser, _result_src(browser))
    assert out2.size == (28, 40)
    summary = _wait(
        browser,
        lambda d: (t := d.find_element(By.ID, "denoise-summary").text) and "28x40 px" in t and t,
        "the second summary",
    )
    assert "sigma 25.0" in summary and "PSNR" in summary and "SSIM" in summary
    browser.save_screenshot(str(shots / "3_second_request.png"))
    assert len(list(shots.glob("*.png"))) == 4

    # 4. the page talked only to its own server
    hosts = set()
    for entry in browser.get_log("performance"):
        msg = entry["message"]
        if '"Network.requestWillBeSent"' in msg:
            url = json.loads(msg)["message"]["params"]["request"]["url"]
            if urlparse(url).scheme in ("http", "https", "ws", "wss"):
                hosts.add(urlparse(url).netloc)
    assert hosts == {urlparse(server).netloc}, hosts


def test_generate_in_the_browser(server: str, browser: object) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(browser, lambda d: d.find_elements(By.ID, "denoise-button"), "the page", UI_WAIT)
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Generate").click()
    _choose(browser, "generate-method", "ddim")
    steps = browser.find_element(By.XPATH, "//span[contains(., 'steps (ddim)')]/ancestor::label//input")
    steps.send_keys("\b\b\b3")
    browser.find_element(By.ID, "generate-button").click()
    src = _wait(
        browser,
        lambda d: (i := d.find_elements(By.CSS_SELECTOR, "#generate-grid img")) and i[0].get_attribute("src"),
        "the grid",
    )
    with urllib.request.urlopen(src, timeout=30) as r:
        grid = Image.open(io.BytesIO(r.read()))
    if "TDPM_APP_MODEL" not in os.environ:
        assert grid.size == (2 + 2 * (96 + 2), 2 + 2 * (96 + 2))  # n = 4 of 16 px, shown 6x: a 2x2 grid
    summary = browser.find_element(By.ID, "generate-summary").text
    assert "NFE 3" in summary and "4 images (seeds 0..3)" in summary


def test_inpaint_in_the_browser(server: str, browser: object, tmp_path: Path) -> None:
    """Paint a stroke over an upload in the Inpaint tab, run it: the painted pixels change, the others come back
    exactly as they were."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    original = np.random.default_rng(0).integers(0, 256, (32, 48, 3)).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(original).save(path)
    browser.get(server)
    _wait(browser, lambda d: d.find_elements(By.ID, "denoise-button"), "the page", UI_WAIT)
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Inpaint").click()
    upload = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#inpaint-editor input[type=file]"), "editor")
    upload[0].send_keys(str(path))
    canvas = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#inpaint-editor canvas"), "the canvas")[-1]
    _choose(browser, "inpaint-method", "ccdf")

    def image(elem_id: str) -> np.ndarray | None:
        imgs = browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        src = imgs[0].get_attribute("src") if imgs else None
        if not src:
            return None
        with urllib.request.urlopen(src, timeout=30) as r:
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))

    # On a busy machine the editor may take the upload after the first stroke and click: the page then says to
    # paint first, and the stroke is drawn again.
    for attempt in range(3):
        time.sleep(1 + 2 * attempt)
        ActionChains(browser).move_to_element_with_offset(canvas, -60, 0).click_and_hold().move_by_offset(
            120, 0
        ).release().perform()
        browser.find_element(By.ID, "inpaint-button").click()
        _wait(
            browser,
            lambda d: (
                image("inpaint-result") is not None or "to fill first" in d.find_element(By.TAG_NAME, "body").text
            ),
            "the inpainted image",
        )
        if image("inpaint-result") is not None:
            break
        for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close"):  # the message, before the next try
            close.click()
    result = image("inpaint-result")
    shown = image("inpaint-input")  # the observation: painted pixels are 0
    assert result is not None and shown is not None and result.shape == original.shape
    painted = (shown == 0).all(-1) & ~(original == 0).all(-1)
    assert 10 < painted.sum() < painted.size / 2  # the stroke, not the whole image
    assert np.array_equal(result[~painted], original[~painted])  # known pixels come back unchanged
    assert not np.array_equal(result[painted], original[painted])
    summary = browser.find_element(By.ID, "inpaint-summary").text
    assert "ccdf" in summary and "48x32 px" in summary

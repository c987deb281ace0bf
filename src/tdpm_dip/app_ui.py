"""The Gradio page of `tdpm-dip app`: two tabs around the handlers of `app.py` (Gradio: the `app` extra).

Gradio is imported here only, and lazily by the CLI, so the package and the handlers work without it.
The page talks only to its own server: analytics off, no share link, localhost unless told otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from . import defaults, registry
from .app import (
    MAX_N,
    MAX_PIXELS,
    MAX_SECONDS,
    MAX_SIDE,
    MAX_UPLOAD_PIXELS,
    QUEUE_SIZE,
    AppModels,
    Cancelled,
    denoise_handler,
    denoise_methods,
    denoise_summary,
    generate_handler,
    generate_methods,
    generate_summary,
    mask_from_editor,
    method_label,
    parse_sigma,
    restore_handler,
    restore_methods,
    restore_summary,
    write_examples,
)
from .errors import UserError
from .images import save_png
from .outputs import atomic_path

# Before gradio is imported: its usage analytics and version check stay off.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr

IMAGE_HEIGHT = 360  # px on the page (images are shown whole, scaled to fit)
POLL_SECONDS = 0.25  # a handler yields this often while its work runs, so that Gradio can close it
RESULT_OUTPUTS = 4  # what `_result_column` shows: input, result, summary, PNG
FILE_HEIGHT = 140
BUTTONS: list = ["download", "fullscreen"]  # no "share": it would upload the image to a third party
# Small images (a 32 px model's samples, a thumbnail) fill their box, pixels kept sharp to show the noise.
CSS = (
    "#denoise-input img, #denoise-result img, #generate-grid img "
    "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
)


@contextlib.contextmanager
def _page_errors() -> Iterator[None]:
    """A problem the user can fix is shown in the page as its one line; anything else as one line too
    (its traceback goes to the server's console, never to the page), and the server keeps serving."""
    try:
        yield
    except UserError as e:
        raise gr.Error(str(e), title="Cannot do that", duration=None, print_exception=False) from None
    except Cancelled:  # nobody is waiting for the answer
        raise gr.Error("cancelled: the page was closed", print_exception=False) from None
    except gr.Error:
        raise
    except Exception:
        traceback.print_exc()
        raise gr.Error(
            "internal error: the server could not finish this request (its console has the details)",
            duration=None,
            print_exception=False,
        ) from None


class Results:
    """The folder of one server's result PNGs (downloads): at most KEEP files, removed with the server."""

    KEEP = 16

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tdpm-dip-results-"))
        self.count = 0

    def path(self, name: str) -> Path:
        """A new file's path (its own sub-folder, so the download keeps `name`); the oldest beyond KEEP go."""
        self.count += 1
        old = sorted(self.folder.iterdir(), key=lambda p: int(p.name))[: max(0, self.count - self.KEEP)]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        sub = self.folder / str(self.count)
        sub.mkdir()
        return sub / name


def budget_text(max_side: int, max_seconds: float) -> str:
    """What one request may cost, as the page states it."""
    pixels = min(MAX_PIXELS, max_side * max_side)
    return (
        f"Each request: uploads up to {MAX_UPLOAD_PIXELS / 1e6:g} Mpx, denoised at up to {pixels / 1e6:.2g} Mpx "
        f"and {max_side} px a side (larger ones are downscaled, with a notice); it stops after {max_seconds:g} s. "
        f"One request computes at a time and at most {QUEUE_SIZE} wait; closing the page cancels yours. "
        f"Upscaled and inpainted results are at most {defaults.APP_RESTORE_MAX_PIXELS / 1e6:.2g} Mpx."
    )


def _in_worker(work: Callable[[Callable[[], bool]], Any], outputs: int = RESULT_OUTPUTS) -> Iterator[Any]:
    """A handler as a generator: `work(alive)` runs in a thread (with the request's context, for its progress
    bar) while this yields "no change" every POLL_SECONDS, then yields its result. Gradio closes a generator
    handler when its visitor's page disconnects or the request is cancelled (/cancel); the close lands here, and
    `alive()` turns False, so the work stops at its next check (between tiles, DIP iterations or chain steps)."""
    stop = threading.Event()
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = work(lambda: not stop.is_set())
        except BaseException as e:  # raised again below, in the handler, where the page's errors are made
            box["error"] = e
        if stop.is_set():  # the server's console says that the work of a request nobody waits for stopped
            print("a request was cancelled or its page closed: its work stopped", file=sys.stderr, flush=True)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            if thread.is_alive():
                yield tuple(gr.skip() for _ in range(outputs))
    finally:
        stop.set()
    if "error" in box:
        raise box["error"]
    yield box["value"]


def _gr_progress(progress: gr.Progress):
    return lambda frac, desc: progress(frac, desc=desc)


def build_ui(
    models: AppModels,
    max_side: int = MAX_SIDE,
    examples_dir: str | None = None,
    results: Results | None = None,
    max_seconds: float = MAX_SECONDS,
) -> gr.Blocks:
    """The page: Denoise, Upscale, Inpaint and Generate tabs, their method lists read from the registry."""
    den, gen = (Path(m.name).name or m.name for m in (models.denoiser, models.generator))
    results = results or Results()
    with gr.Blocks(title="tdpm-dip", analytics_enabled=False) as page:
        gr.Markdown(
            f"# tdpm-dip\nDenoise with DDPM **{den}**, generate with **{gen}**, on {models.ctx.device}. "
            "Blind denoising uses the noisy image only. Everything runs on this machine; nothing is sent "
            "elsewhere.\n\n" + budget_text(max_side, max_seconds),
            elem_id="budget",
        )
        with gr.Tab("Denoise"):
            _denoise_tab(
                models,
                max_side,
                examples_dir or tempfile.mkdtemp(prefix="tdpm-dip-examples-"),
                results,
                max_seconds,
            )
        with gr.Tab("Upscale"):
            _restore_tab(models, "sr", results, max_seconds)
        with gr.Tab("Inpaint"):
            _restore_tab(models, "inpaint", results, max_seconds)
        with gr.Tab("Generate"):
            _generate_tab(models, max_seconds)
    return page


def _image(label: str, elem_id: str, height: int = IMAGE_HEIGHT) -> gr.Image:
    """A read-only image on the page, shown whole, with download and fullscreen buttons."""
    return gr.Image(
        label=label,
        type="numpy",
        format="png",
        interactive=False,
        height=height,
        buttons=BUTTONS,
        elem_id=elem_id,
    )


def _method_dropdown(choices: list[tuple[str, str]], value: str, label: str, elem_id: str, info: str) -> gr.Dropdown:
    """The registry's methods of a tab, as (label with its NFE, name) pairs."""
    return gr.Dropdown(choices, value=value, label=label, elem_id=elem_id, info=info)


def _seed(elem_id: str | None, label: str = "seed") -> gr.Number:
    """A non-negative integer seed, 0 at first."""
    return gr.Number(value=0, precision=0, minimum=0, label=label, elem_id=elem_id)


def _result_column(prefix: str, download: str) -> list[Any]:
    """The right-hand column of the Denoise, Upscale and Inpaint tabs: the input as the method saw it beside the
    result, a summary and the result's PNG. Returns them in that order, the outputs of the tab's button."""
    with gr.Column(scale=2):
        with gr.Row():
            shown = _image("input", f"{prefix}-input")
            result = _image("result", f"{prefix}-result")
        summary = gr.Markdown(elem_id=f"{prefix}-summary")
        png = gr.File(label=download, interactive=False, elem_id=f"{prefix}-download")
    return [shown, result, summary, png]


def _deliver(
    results: Results, name: str, shown: Any, image: Any, summary: str, file: Image.Image | None = None
) -> tuple[Any, Any, str, str]:
    """What `_result_column` shows of one result: the input, the result, its summary and its PNG, saved under
    `name` for the download (`file` when given: the result in its upload's kind, grey, alpha or 16 bits)."""
    png = results.path(name)
    if file is None:
        save_png(image, png)
    else:
        with atomic_path(png) as tmp:
            file.save(tmp, format="PNG")
    return shown, image, summary, str(png)


def _tab_layout(
    controls: Callable[[], tuple[list[Any], gr.Button]], prefix: str, download: str, run: Callable[..., Any]
) -> None:
    """The layout the Denoise, Upscale and Inpaint tabs share: on the left the controls that `controls` makes (the
    inputs of `run`, in the order of its arguments, and its button), on the right `_result_column`, `run`'s
    outputs."""
    with gr.Row():
        with gr.Column(scale=1):
            inputs, button = controls()
        outputs = _result_column(prefix, download)
    button.click(run, inputs, outputs)


def _restore_tab(models: AppModels, task: str, results: Results, max_seconds: float) -> None:
    """Upscale: upload a low-resolution image and pick the scale. Inpaint: upload an image and paint the pixels to
    fill in the editor. The methods are the registry's restorers that the loaded DDPM can run."""

    def run(
        image: Any,
        scale: str,
        method: str,
        sigma: float | None,
        seed: float | None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way to pass a progress bar)
    ) -> Iterator[Any]:
        def work(alive: Callable[[], bool]) -> Any:
            with _page_errors():
                source, mask = mask_from_editor(image) if task == "inpaint" else (image, None)
                r = restore_handler(
                    models,
                    task,
                    source,
                    mask,
                    int(scale),
                    method,
                    float(sigma or 0),
                    int(seed) if seed is not None else 0,
                    defaults.APP_RESTORE_MAX_PIXELS,
                    progress=_gr_progress(progress),
                    max_seconds=max_seconds,
                    alive=alive,
                )
                return _deliver(results, f"{task}_{r.info['method']}.png", r.input, r.image, restore_summary(r))

        yield from _in_worker(work)

    _tab_layout(lambda: _restore_controls(models, task), task, "download the result (PNG)", run)


def _restore_controls(models: AppModels, task: str) -> tuple[list[Any], gr.Button]:
    """The image, the scale (sr), the method, the observation's noise and the seed, and the button."""
    names = restore_methods(models, task)
    labels = {m.name: method_label(m) for m in registry.methods("restore", "blind", operator=task)}
    source = _restore_source(task)
    scales = [str(s) for s in defaults.SR_SCALES]
    scale = gr.Dropdown(
        scales, value=str(defaults.SR_SCALE), label="scale", visible=task == "sr", elem_id=f"{task}-scale"
    )
    method = _method_dropdown(
        [(labels[n], n) for n in names],
        names[0],
        "method (best first)",
        f"{task}-method",
        "NFE: network calls per image (a DIP iteration counts as one)",
    )
    sigma = gr.Number(value=0, minimum=0, maximum=255, label="noise std of the image (0..255)")
    seed = _seed(f"{task}-seed")
    button = gr.Button("Upscale" if task == "sr" else "Inpaint", variant="primary", elem_id=f"{task}-button")
    return [source, scale, method, sigma, seed], button


def _restore_source(task: str) -> gr.File | gr.ImageEditor:
    """sr: a file upload of the low-resolution image; inpaint: an editor in which the pixels to fill are painted."""
    if task == "sr":
        return gr.File(label="low-resolution image", file_types=["image"], height=FILE_HEIGHT, elem_id="sr-upload")
    return gr.ImageEditor(
        label="image: paint the pixels to fill",
        type="numpy",
        image_mode="RGB",
        brush=gr.Brush(colors=["#ff00ff"], default_size=6),
        eraser=False,
        layers=False,
        height=IMAGE_HEIGHT,
        elem_id="inpaint-editor",
    )


def _denoise_tab(models: AppModels, max_side: int, examples_dir: str, results: Results, max_seconds: float) -> None:
    """Upload (or pick an example), choose a blind method and sigma; the result at the upload's size."""

    def run_denoise(
        noisy: str | None,
        clean: str | None,
        method: str,
        sigma: str | None,
        seed: float | None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way to pass a progress bar)
    ) -> Iterator[Any]:
        def work(alive: Callable[[], bool]) -> Any:
            with _page_errors():
                d = denoise_handler(
                    models,
                    noisy,
                    method,
                    parse_sigma(sigma),
                    clean,
                    seed if seed is not None else 0,
                    max_side,
                    _gr_progress(progress),
                    max_seconds=max_seconds,
                    alive=alive,
                )
                stem = Path(noisy).stem if noisy else "image"
                return _deliver(results, f"{stem}_{d.info['method']}.png", d.input, d.image, denoise_summary(d), d.file)

        yield from _in_worker(work)

    download = "download the result (PNG, the input's size)"
    _tab_layout(lambda: _denoise_controls(examples_dir), "denoise", download, run_denoise)


def _denoise_controls(examples_dir: str) -> tuple[list[Any], gr.Button]:
    """The noisy image, an optional clean one, the method (the registry's blind denoisers, the recommended one
    first), sigma and the seed, the button, and the examples written into `examples_dir`."""
    den = denoise_methods()
    noisy_file = gr.File(label="noisy image", file_types=["image"], height=FILE_HEIGHT, elem_id="noisy-upload")
    clean_file = gr.File(
        label="clean image (optional: PSNR/SSIM)", file_types=["image"], height=FILE_HEIGHT, elem_id="clean-upload"
    )
    method = _method_dropdown(
        [(method_label(m), m.name) for m in den],
        den[0].name,
        "method (best first)",
        "denoise-method",
        "NFE: network calls per image; the first is the recommended default",
    )
    # A text field: a blank gr.Number reaches the server as 0, and blank must mean "estimate it".
    sigma = gr.Textbox(
        value="",
        label="sigma (noise std on 0..255; blank = estimated)",
        placeholder="estimated",
        max_lines=1,
        elem_id="sigma",
    )
    seed = _seed("denoise-seed")
    button = gr.Button("Denoise", variant="primary", elem_id="denoise-button")
    gr.Examples(
        write_examples(examples_dir),
        inputs=[noisy_file, clean_file],
        label="examples: procedural sprites with 8-bit noise, sigma 25, and their originals",
    )
    return [noisy_file, clean_file, method, sigma, seed], button


def _generate_tab(models: AppModels, max_seconds: float) -> None:
    """A seeded grid from a registry generator: those the loaded DDPM can run (a truncated one: amortized TDPM
    only); within the request's budget, and stopped when its page closes, as the other tabs are."""
    gen = [m for m in generate_methods() if m.name in models.generator.methods]
    loaded = models.generator.ctx.generator

    def run_generate(
        method: str,
        n: float,
        seed: float | None,
        steps: float | None,
        t_trunc: float | None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way to pass a progress bar)
    ) -> Iterator[Any]:
        def work(alive: Callable[[], bool]) -> Any:
            with _page_errors():
                g = generate_handler(
                    models,
                    method,
                    int(n),
                    seed if seed is not None else 0,
                    steps,
                    t_trunc,
                    _gr_progress(progress),
                    max_seconds=max_seconds,
                    alive=alive,
                )
                return g.grid, generate_summary(g)

        yield from _in_worker(work, outputs=2)  # the grid and its summary

    with gr.Row():
        with gr.Column(scale=1):
            # The best method that what is loaded can run: amortized TDPM with a generator (the shipped one by
            # default); without one it would only fail.
            gmethod = _method_dropdown(
                [(method_label(m), m.name) for m in gen],
                models.generator.methods[0],
                "method",
                "generate-method",
                "NFE: network calls per image",
            )
            n = gr.Slider(1, MAX_N, value=4, step=1, label="n (images)", elem_id="generate-n")
            gseed = _seed(None, "seed (image i uses seed + i)")
            steps = gr.Number(value=defaults.QUICK_DDIM_STEPS, precision=0, minimum=1, label="steps (ddim)")
            t_trunc = gr.Number(
                value=defaults.T_TRUNC if loaded is None else loaded.t_trunc,
                precision=0,
                minimum=0,
                label="T_trunc (truncated methods; tdpm: its generator's)",
            )
            gbutton = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            grid = _image("samples", "generate-grid", height=2 * IMAGE_HEIGHT)
            gsummary = gr.Markdown(elem_id="generate-summary")
    gbutton.click(run_generate, [gmethod, n, gseed, steps, t_trunc], [grid, gsummary])


def launch(
    models: AppModels,
    host: str = defaults.APP_HOST,
    port: int = defaults.APP_PORT,
    max_side: int = MAX_SIDE,
    max_seconds: float = MAX_SECONDS,
) -> None:
    """Serve the page until Ctrl-C: one request computes at a time, at most QUEUE_SIZE wait, each within its budget
    (`budget_text`); no share link, no analytics; the server's temporary folders go with it."""
    examples_dir = tempfile.mkdtemp(prefix="tdpm-dip-examples-")
    results = Results()
    try:
        page = build_ui(models, max_side, examples_dir, results, max_seconds)
        page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            show_error=False,
            allowed_paths=[examples_dir],
            max_file_size="50mb",
            css=CSS,
            ssr_mode=False,
            mcp_server=False,
        )
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {str(e).splitlines()[0]}") from None
    finally:
        for folder in (examples_dir, results.folder):
            shutil.rmtree(folder, ignore_errors=True)

"""The report of `tdpm-dip demo`: RUN/metrics.json, RUN/report.md and its figures, from what the phases
recorded in a `DemoRun` (the rows and figures rendered by `reporting`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .. import defaults, registry
from ..embedded import default_ddpm
from ..images import save_grid
from ..metrics import copy_rate
from ..outputs import write_json, write_text
from ..reporting import curves_figure, labelled_comparison, result_row, save_figure, table
from ..runtime import dip_config
from .demo_setup import DemoRun, loadavg


def loss_figure(path: Path, metrics_jsonl: Path) -> bool:
    """The training loss per logged window (False when there is nothing to plot)."""
    recs = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not recs:
        return False
    fig = Figure(figsize=(4.5, 3))
    ax = fig.subplots()
    ax.semilogy([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="step", ylabel="eps-MSE (mean over log interval)", title="DDPM training loss")
    save_figure(fig, path)
    return True


def _generation_rows(d: DemoRun) -> list[dict]:
    """One row per generation result, with its copy-rate against the training (or reference) images."""
    assert d.data is not None
    copy_ref = d.data.train if d.data.train is not None else d.data.reference
    rows = []
    for _, r in d.gen:
        row = result_row(r, None, task="generation")
        cr = copy_rate(r.images, copy_ref)
        row["copy-rate"] = cr["rate"]
        row["NN PSNR"] = sum(cr["nearest_psnr"]) / len(cr["nearest_psnr"])
        rows.append(row)
    return rows


def _figures(d: DemoRun) -> dict[str, str]:
    """Every figure of the report, written into the staged run folder; returns {what: file}."""
    cfg, data, stage = d.cfg, d.data, d.stage
    assert data is not None
    upscale = max(1, round(128 / d.size))
    figs = {"test": "test_images.png"}
    save_grid(data.test[:16], stage / "test_images.png", nrow=8, upscale=upscale)
    if cfg.model is None and loss_figure(stage / "train_loss.png", stage / "train" / "metrics.jsonl"):
        figs["loss"] = "train_loss.png"
    # The reconstructions (paper protocol) beside what they reconstruct and their DIP outputs, then the new samples
    # beside held-out real images, so that a person can judge whether they pass for real.
    fitted = [(label, r) for label, r in d.gen if "dip_output" in r.info]
    labelled_comparison(
        stage / "generation.png",
        [
            ("held-out images (real, never trained on)", data.test),
            ("training images" if data.train is not None else "reference images", data.reference),
            *[("G_psi(z): DIP output", r.info["dip_output"]) for _, r in fitted],
            *[(label, r.images) for label, r in fitted],
            *[(label, r.images) for label, r in d.gen if "dip_output" not in r.info and label not in d.off_figure],
        ],
        upscale=upscale,
    )
    paper_noisy = d.paper[0].inputs
    assert paper_noisy is not None and d.noisy is not None  # the denoising phases ran before the figures
    labelled_comparison(
        stage / "denoise_paper.png",
        [
            ("clean", data.test),
            (f"x_{d.t_noisy} (noisy)", paper_noisy),
            *[
                (f"{r.method} (oracle)" if r.dip is not None else f"{r.method} ({r.reverse_steps} steps)", r.images)
                for r in d.paper
            ],
        ],
        upscale=upscale,
    )
    labelled_comparison(
        stage / "denoise_blind.png",
        [
            ("clean", data.test),
            (f"noisy (sigma {cfg.sigma:g})", d.noisy),
            *[(r.method, r.images) for r in d.blind],
        ],
        upscale=upscale,
    )
    curves = {f"generation {label}": r.dip.mean_curves() for label, r in d.gen if r.dip is not None}
    curves.update({f"{r.protocol} {r.method}": r.dip.mean_curves() for r in d.paper + d.blind if r.dip is not None})
    curves_figure(stage / "dip_curves.png", curves)
    figs["curves"] = "dip_curves.png"
    return figs


def write_report(d: DemoRun) -> None:
    """metrics.json and report.md, with the figures (into the staged run folder)."""
    cfg = d.cfg
    with d.phases("report"):
        figs = _figures(d)
        gen_rows = _generation_rows(d)
        den_rows = [result_row(r, d.data.test, task="denoising") for r in d.paper + d.blind]  # type: ignore[union-attr]
        paper_dip = dataclasses.asdict(d.ctx.dip)  # type: ignore[union-attr]
        blind_dip = dataclasses.asdict(dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters))
        env = {
            "device": str(d.ctx.device),  # type: ignore[union-attr]
            "threads": d.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_start": d.load_start,
            "load_average_end": loadavg(),
        }
        config = dataclasses.asdict(cfg) | {
            "model_used": d.model_label,
            "size_used": d.size,
            "dip_paper": paper_dip,
            "dip_blind": blind_dip,
        }
        write_json(
            d.stage / "metrics.json",
            {
                "generation": gen_rows,
                "denoising": den_rows,
                "train": d.train_info,
                "phases": [{"phase": p, "seconds": s, "note": nt} for p, s, nt in d.phases.times],
                "config": config,
                "environment": env,
            },
        )
        write_text(d.stage / "report.md", report_md(d, figs, env, gen_rows, den_rows))


def report_md(d: DemoRun, figs: dict[str, str], env: dict, gen_rows: list[dict], den_rows: list[dict]) -> str:
    """report.md: the run's header and phases, training, protocols, generation, denoising, how to read it."""
    return "\n".join(
        _md_header(d, figs, env)
        + _md_training(d, figs)
        + PROTOCOLS_MD
        + _md_generation(d, gen_rows)
        + _md_denoising(d, figs, den_rows)
        + READING_MD
        + _md_reproduce(d)
    )


def _md_header(d: DemoRun, figs: dict[str, str], env: dict) -> list[str]:
    cfg = d.cfg
    if cfg.uses_embedded:
        model = (
            "every figure and row below except the training section and the "
            f"`ddim-{defaults.QUICK_DDIM_STEPS}, {cfg.steps}-step model` row comes from the **embedded default "
            "DDPM** shipped in the package (`tdpm_dip/weights/ddpm-sprites32`, trained by "
            "`recipes/embedded_default.sh` on 16384 sprites, on noise levels 1..500 only: a truncated DDPM, so no "
            "row starts from pure noise with it); "
            f"the `{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`) shows Algorithm 1."
        )
    elif cfg.model is None:
        model = f"a `{cfg.preset}` DDPM trained here for {cfg.steps} steps (`train/model`)."
    else:
        model = f"`{d.model_label}`."
    assert d.data is not None
    return [
        "# TDPM-DIP demo",
        "",
        f"Data: {d.data.source}, {d.size}x{d.size} px. Model: {model}",
        f"Device: {env['device']}, {env['threads']} CPU thread(s), torch {env['torch']}; "
        f"load average at start {env['load_average_start']} on {env['cpu_count']} cores (other work on the "
        "machine slows every phase).",
        "",
        "## Phases",
        "",
        "| phase | seconds | what |",
        "|---|---|---|",
        *[f"| {p} | {s:.1f} | {nt} |" for p, s, nt in d.phases.times],
        f"| total (without this page) | {d.phases.total:.1f} | |",
        "",
        f"![test images]({figs['test']})",
        "",
        f"*The {cfg.n} test images (held out: never trained on).*",
        "",
    ]


def _md_training(d: DemoRun, figs: dict[str, str]) -> list[str]:
    cfg, info = d.cfg, d.train_info
    if cfg.model is not None:
        return []
    lines = [
        "## Training (Algorithm 1)",
        "",
        f"`{cfg.preset}` UNet, {cfg.steps} AdamW steps at batch {cfg.train_batch}, lr {cfg.train_lr:g}, "
        f"EMA weights exported; median throughput {info.get('img_s')} images/s, final loss "
        f"{info.get('final_loss', float('nan')):.4f}. A few hundred steps give a usable denoiser "
        "at small noise levels; its samples from pure noise stay rough"
        + (
            f" (its DDIM-{defaults.QUICK_DDIM_STEPS} row below, beside the embedded default's samples)."
            if cfg.uses_embedded
            else " (see below)."
        ),
        "",
    ]
    if "loss" in figs:
        lines += [f"![training loss]({figs['loss']})", ""]
    return lines


PROTOCOLS_MD = [
    "## Protocols",
    "",
    "Every row of the tables says which protocol produced it.",
    "",
    "- **paper** (the report's, an *oracle*): the DIP target is built from the **clean** image, "
    'x_T = sqrt(abar_T) x0 + sqrt(1 - abar_T) z, with the DIP\'s own input z. Its "denoising" never '
    "looks at the noisy image, so DIP / TDPM-DIP PSNR measures how well a small network reproduces a "
    'known image in a fixed number of iterations; its "generation" reconstructs the reference images '
    "(the copy-rate shows it).",
    "- **blind** (an honest denoiser): only the noisy image y = x0 + n and its noise level are used; "
    "the clean image is used only to score the result.",
    "- **unconditional**: generation from pure noise N(0, I); no reference image is involved.",
    "",
]


def _md_generation(d: DemoRun, gen_rows: list[dict]) -> list[str]:
    cfg = d.cfg
    ref = "training" if d.cfg.model is None else "reference"
    return [
        "## Generation",
        "",
        "![generation](generation.png)",
        "",
        f"Rows: the {ref} images the DIPs were fitted to (paper protocol), the fitted DIP outputs G_psi(z) (the "
        f"truncated chain's start x_{cfg.t_trunc}), then each method: "
        + "; ".join(label for label, _ in d.gen if label not in d.off_figure)
        + ". "
        + "".join(f"Not in the figure, only in the table: {lab}, because {why}. " for lab, why in d.off_figure.items())
        + "Amortized TDPM makes new images (the shipped generator's "
        "G_psi(z), z ~ N(0, I), then the DDPM's reverse steps from its T_trunc). copy-rate: share of images within "
        f"25 dB PSNR of a {ref} image (NN PSNR: mean PSNR to the nearest one). "
        'TDPM-DIP "generates" copies by construction.',
        "",
        table(gen_rows),
    ]


def _md_denoising(d: DemoRun, figs: dict[str, str], den_rows: list[dict]) -> list[str]:
    cfg = d.cfg
    paper_dip = d.ctx.dip  # type: ignore[union-attr]
    blind_dip = dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters)
    # The chain length of blind TDPM-DIP (the method whose DIP fits the plug-in target): one, or one per image.
    chained = [r.info["t_trunc"] for r in d.blind if registry.get("denoise", "blind", r.method).dip == "plugin"]
    t_used = next((f"{min(t)}-{max(t)} (per image)" if isinstance(t, list) else t for t in chained), "automatic")
    lines = [
        "## Denoising",
        "",
        f"Paper protocol (x0 noised to level t={d.t_noisy}, then each method):",
        "",
        "![denoising, paper protocol](denoise_paper.png)",
        "",
        f"Blind protocol (Gaussian noise of sigma {cfg.sigma:g} on 0..255, rounded and clipped to 8 bits as in a "
        "saved noisy file; rows: the registry's blind methods, best first):",
        "",
        "![denoising, blind protocol](denoise_blind.png)",
        "",
        table(den_rows),
        f"Settings: DIP `{paper_dip.preset}`; paper protocol {paper_dip.iters} iterations at lr {paper_dip.lr:g}; "
        f"blind {blind_dip.iters} iterations at lr {blind_dip.lr:g} with input noise {blind_dip.input_noise:g} and "
        f"an output average ({blind_dip.average}). Every blind diffusion method first gives clipped pixels back the "
        "noise that clipping removed (declip), then scales y to the level t* whose noise-to-signal ratio matches "
        "sigma. ensemble: one Tweedie call at t* per flip/transpose, averaged (8 calls); tweedie: one call; ddpm: "
        f"the mean of {cfg.samples} chains of t* steps. Blind TDPM-DIP: Algorithm 2 with the ensemble estimate in "
        f"place of the clean image, then T reverse steps (here T = {t_used}), {cfg.samples} chains averaged. "
        f"PSNR/SSIM on [0, 1] images; s/img is wall time per image for {cfg.n} images processed together.",
        "",
    ]
    if "curves" in figs:
        lines += [
            "![DIP curves](dip_curves.png)",
            "",
            "*DIP fitting: MSE to its target and, where the clean image is known, PSNR of the raw DIP "
            "output to it, per iteration (mean over images).*",
            "",
        ]
    return lines


READING_MD = [
    "## Reading these numbers",
    "",
    "- Paper-protocol DIP / TDPM-DIP numbers are not a denoiser's: the target they fit is the clean image "
    "(lightly noised at T_trunc). DDPM from t_noisy must invent most of the image and scores far lower.",
    "- Blind numbers are what a user with only a noisy photo gets; compare them with the noisy input's "
    "PSNR (`input PSNR`).",
    "- These are tiny networks trained for seconds on tiny images: the orders of magnitude, not the "
    "report's values, are the point. `tdpm-dip bench` runs the report's tables on real data.",
    "",
]


def _md_reproduce(d: DemoRun) -> list[str]:
    cfg = d.cfg
    paper_dip = d.ctx.dip  # type: ignore[union-attr]
    blind_dip = dip_config("blind", cfg.dip_preset, cfg.blind_dip_iters)
    # Always named: denoise's own default is another model (the 64 px Pokémon denoiser), not the demo's.
    model = f" --model {default_ddpm('generate') if cfg.uses_embedded else d.model_label}"
    test = Path(cfg.out) / "data" / "test"
    return [
        "## Reproduce single steps with the CLI",
        "",
        "```",
        f"tdpm-dip denoise{model} --clean {test} --protocol paper --t-noisy {d.t_noisy} "
        f"--dip-preset {paper_dip.preset} --dip-iters {paper_dip.iters} --dip-lr {paper_dip.lr:g} --seed {cfg.seed} "
        "--out den_paper",
        f"tdpm-dip denoise{model} --clean {test} --sigma {cfg.sigma:g} --method ensemble --method tdpm-dip "
        f"--dip-preset {blind_dip.preset} --dip-iters {blind_dip.iters} --seed {cfg.seed} --out den_blind",
        "```",
        "",
    ]

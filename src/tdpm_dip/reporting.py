"""Turn task results into what a person reads: labelled metric rows, figures, image folders."""

from __future__ import annotations

from pathlib import Path

import torch

from .metrics import psnr, ssim
from .outputs import markdown_table, save_grid, save_png
from .tasks import Result


def result_row(res: Result, clean: torch.Tensor | None, **labels: object) -> dict:
    """One table row: labels, protocol, method, quality (when the clean images are known) and cost."""
    row: dict = dict(labels)
    row.update({"protocol": res.protocol, "method": res.method, "n": int(res.images.shape[0])})
    if clean is not None:
        row["PSNR"] = float(psnr(res.images, clean).mean())
        row["SSIM"] = float(ssim(res.images, clean).mean())
        if res.inputs is not None and res.protocol == "blind":
            row["input PSNR"] = float(psnr(res.inputs, clean).mean())
    for k in ("sigma", "t_star", "t_noisy", "t_trunc", "samples"):
        if k in res.info:
            row[k] = res.info[k] if not isinstance(res.info[k], list) else "per-image"
    row.update({"reverse steps": res.steps, "NFE": res.nfe, "s/img": res.seconds_per_image})
    return row


def save_images(images: torch.Tensor, names: list[str], folder: Path) -> None:
    for img, name in zip(images, names):
        save_png(img, folder / f"{name}.png")


def comparison_figure(path: Path, rows: list[torch.Tensor], max_images: int = 8, upscale: int = 2) -> None:
    """Rows of images side by side (e.g. clean / noisy / DDPM / DIP / TDPM-DIP), one column per image."""
    k = min(max_images, rows[0].shape[0])
    stacked = torch.cat([r[:k].float().clamp(-1, 1) for r in rows])
    save_grid(stacked, path, nrow=k, upscale=upscale)


def curves_figure(path: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    """DIP loss and PSNR per iteration (matplotlib if installed, else skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    has_psnr = any("psnr" in c for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_psnr else 1, figsize=(9 if has_psnr else 4.5, 3.2))
    axes = list(axes) if has_psnr else [axes]
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i % 10}"  # one colour per label in both panels (the legend is on the first only)
        axes[0].semilogy(c["loss"], label=label, color=color)
        if has_psnr and "psnr" in c:
            axes[1].plot(c["psnr"], label=label, color=color)
    axes[0].set(xlabel="DIP iteration", ylabel="MSE to target", title="DIP loss")
    if has_psnr:
        axes[1].set(xlabel="DIP iteration", ylabel="PSNR to clean (dB)", title="DIP output quality")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return markdown_table(rows, cols)

"""Turn task results into what a person reads: labelled metric rows, figures, image folders."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .images import save_grid, save_png
from .methods.types import Result
from .metrics import psnr, ssim
from .outputs import atomic_path, markdown_table


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
    row.update({"reverse steps": res.reverse_steps, "NFE": res.nfe, "s/img": res.seconds_per_image})
    return row


def save_images(images: torch.Tensor, names: list[str], folder: Path) -> None:
    for img, name in zip(images, names):
        save_png(img, folder / f"{name}.png")


def comparison_figure(path: Path, rows: list[torch.Tensor], max_images: int = 8, upscale: int = 2) -> None:
    """Rows of images side by side (e.g. clean / noisy / DDPM / DIP / TDPM-DIP), one column per image."""
    k = min(max_images, rows[0].shape[0])
    stacked = torch.cat([r[:k].float().clamp(-1, 1) for r in rows])
    save_grid(stacked, path, nrow=k, upscale=upscale)


def thumbnails(images: list[torch.Tensor], size: int = 96) -> torch.Tensor:
    """Images of any sizes -> [N, 3, size, size] for a figure: padded to a square with white, resized."""
    out = []
    for x in images:
        h, w = x.shape[-2:]
        side = max(h, w)
        sq = torch.ones(3, side, side)
        sq[:, (side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = x.float().cpu()
        out.append(
            torch.nn.functional.interpolate(
                sq[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        )
    return torch.stack(out)


def labelled_comparison(
    path: Path, rows: list[tuple[str, torch.Tensor]], max_images: int = 8, upscale: int | None = None
) -> None:
    """`comparison_figure` with a column of row labels on the left ("clean", "noisy", each method)."""
    size = int(rows[0][1].shape[-1])
    upscale = upscale or max(1, round(128 / size))
    comparison_figure(path, [x for _, x in rows], max_images=max_images, upscale=upscale)
    cell, pad = size * upscale, 2
    labels = [s for s, _ in rows]
    try:
        font = ImageFont.load_default(size=max(11, min(16, cell // 6)))
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    with Image.open(path) as im:
        grid = im.convert("RGB")
    width = max(int(ImageDraw.Draw(grid).textlength(s, font=font)) for s in labels) + 10
    canvas = Image.new("RGB", (grid.width + width, grid.height), "white")
    canvas.paste(grid, (width, 0))
    d = ImageDraw.Draw(canvas)
    for r, s in enumerate(labels):
        d.text((4, pad + r * (cell + pad) + cell // 2), s, fill=(0, 0, 0), font=font, anchor="lm")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def curves_figure(path: Path, curves: dict[str, dict[str, list[float]]]) -> None:
    """DIP loss and PSNR per iteration."""
    has_psnr = any("psnr" in c for c in curves.values())
    fig = Figure(figsize=(9 if has_psnr else 4.5, 3.2))
    axes: list[Axes] = list(fig.subplots(1, 2)) if has_psnr else [fig.subplots(1, 1)]
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i % 10}"  # one colour per label in both panels (the legend is on the first only)
        axes[0].semilogy(c["loss"], label=label, color=color)
        if has_psnr and "psnr" in c:
            axes[1].plot(c["psnr"], label=label, color=color)
    axes[0].set(xlabel="DIP iteration", ylabel="MSE to target", title="DIP loss")
    if has_psnr:
        axes[1].set(xlabel="DIP iteration", ylabel="PSNR to clean (dB)", title="DIP output quality")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def cost_figure(path: Path, points: list[dict], title: str = "") -> bool:
    """Quality against cost: PSNR and SSIM against NFE and s/img, one marker per method (and setting).

    points: dicts with "label", "PSNR", "SSIM", "NFE", "s/img" (a "group" key, if present, picks the colour).
    """
    groups = list(dict.fromkeys(p.get("group", "") for p in points))
    fig = Figure(figsize=(9, 6.5))
    axes = fig.subplots(2, 2, sharey="row")
    for (r, metric), (c, cost) in [
        ((r, m), (c, x)) for r, m in enumerate(("PSNR", "SSIM")) for c, x in enumerate(("NFE", "s/img"))
    ]:
        ax = axes[r][c]
        for p in points:
            x = max(float(p[cost]), 0.5 if cost == "NFE" else 1e-3)  # a log axis: classical methods at the floor
            ax.scatter(x, p[metric], color=f"C{groups.index(p.get('group', '')) % 10}", s=18)
            ax.annotate(p["label"], (x, p[metric]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel=cost + (" (log)" if cost else ""), ylabel=metric + (" (dB)" if metric == "PSNR" else ""))
    if len(groups) > 1:
        for i, g in enumerate(groups):
            axes[0][0].scatter([], [], color=f"C{i % 10}", label=g)
        axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return True


def save_figure(fig: Figure, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (the object API: no pyplot state, no GUI backend)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return markdown_table(rows, cols)

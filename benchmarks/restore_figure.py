"""The README's restoration figure from a `tdpm-dip bench restore` run: for 4x super-resolution and a centred box
hole, the observation, the classical start, CCDF from it, the default (CCDF from the restoration network's
estimate: the mean of its chains), one of those chains alone (a posterior sample, recomputed here from the same
seed), TDPM-DIP and the clean image, each row labelled.

    python benchmarks/restore_figure.py RUN --data TEST_IMAGES --out docs/restore_hero.png
RUN is the bench's --out folder (its restore/cache holds every method's PNGs, DIP seed 0)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tdpm_dip import Restorer
from tdpm_dip.data import load_image, load_images
from tdpm_dip.reporting import labelled_comparison
from tdpm_dip.workflows.bench_restore import TASKS, _degrade

ROWS = [
    ("classical", {"sr": "bicubic", "inpaint": "biharmonic"}),
    ("ccdf", None),
    ("ccdf-net", None),
    ("tdpm-dip", None),
]
SAMPLED = "ccdf-net"  # the default, followed by its first chain alone (image i's seed draws it first)


def _folder(cache: Path, task: str, method: str) -> Path:
    found = sorted(cache.glob(f"{task}/{method}-s0-*"))
    if not found:
        raise SystemExit(f"{cache}/{task}: no {method} results (run bench restore with that method first)")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tasks", default="sr4,box")
    ap.add_argument("--k", type=int, default=3, help="images per task")
    ap.add_argument("--model", default=None, help="the DDPM of the bench run (default: the shipped one)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    restorer = Restorer.from_pretrained(a.model, device="cpu")
    images = load_images(a.data, 64, limit=a.k)
    cache = a.run / "restore" / "cache"
    rows: dict[str, list[torch.Tensor]] = {}
    for task in a.tasks.split(","):
        kind = TASKS[task][0]
        y, ops = _degrade(task, images.images, list(range(a.k)))
        observed = [torch.nn.functional.interpolate(v[None], size=(64, 64), mode="nearest")[0] for v in y]
        rows.setdefault(f"observed ({a.tasks.replace(',', ' / ')})", []).extend(observed)
        for label, by_kind in ROWS:
            method = by_kind[kind] if by_kind else label
            folder = _folder(cache, task, method)
            rows.setdefault(label, []).extend(load_image(folder / f"{n}.png", None) for n in images.names)
            if label == SAMPLED:  # bench restore's seeds: image i uses seed i (DIP seed 0)
                one, _, _ = restorer.restore_tensors(y, ops, SAMPLED, list(range(a.k)), TASKS[task][2], samples=1)
                rows.setdefault(f"{SAMPLED}: one chain", []).extend(one)
        rows.setdefault("clean", []).extend(images.images)
    labelled_comparison(a.out, [(k, torch.stack(v)) for k, v in rows.items()], max_images=2 * a.k, upscale=2)
    print(a.out)


if __name__ == "__main__":
    main()

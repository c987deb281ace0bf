"""What `tdpm-dip bench restore` does: every restoration method of the registry on clean images degraded here
(4x and 2x super-resolution, 80 % random pixels, a centred box, the right half, noisy 4x super-resolution),
scored on 8-bit outputs, with NFE and seconds, into one Markdown table and one labelled figure per task.

Each image's result is cached as it finishes (RUN/restore/cache), so a stopped run resumes where it was; methods
with a DIP run over several seeds (the DIP varies from run to run) and report their mean and spread."""

from __future__ import annotations

import hashlib
import json
import statistics
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import defaults, registry
from ..api import Restorer
from ..data import load_image, load_images
from ..errors import UserError
from ..images import save_png
from ..metrics import device_name, extract_features, inception_extractor, kid_from_features, score_uint8
from ..models import ddpm_fingerprint, weights_fingerprint
from ..noise import add_noise
from ..operators import Downsample, Inpaint, Operator, make_mask
from ..outputs import write_json, write_text
from ..reporting import labelled_comparison, table

Echo = Callable[[str], None]
# name -> (operator kind, scale or mask kind, sigma of the observation on 0..255)
TASKS: dict[str, tuple[str, str, float]] = {
    "sr4": ("sr", "4", 0.0),
    "sr2": ("sr", "2", 0.0),
    "rand80": ("inpaint", "random:0.8", 0.0),
    "box": ("inpaint", "box", 0.0),
    "half": ("inpaint", "half", 0.0),
    "sr4-noisy": ("sr", "4", 10.0),
}


@dataclass(frozen=True)
class RestoreBench:
    """What one `bench restore` run measures (every field is in the cache key of its rows)."""

    model: str | None
    data: str
    n: int
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    samples: int
    dip_seeds: int
    seed: int
    device: str = "cpu"
    fid: bool = False  # KID of every row against `reference_data` (InceptionV3 features, the `fid` extra)
    fid_weights: str | None = None
    reference_data: str | None = None  # KID's real images (default: --data); the restored images are left out


def _degrade(task: str, clean: torch.Tensor, seeds: list[int]) -> tuple[list[torch.Tensor], list[Operator]]:
    kind, arg, sigma = TASKS[task]
    size = clean.shape[-2:]
    if kind == "sr":
        ops: list[Operator] = [Downsample(int(arg), *size)] * clean.shape[0]
    else:
        ops = [Inpaint(make_mask(arg, int(size[0]), int(size[1]), s)[None]) for s in seeds]
    y = [add_noise(op.A(x[None]), sigma, [s])[0] for op, x, s in zip(ops, clean, seeds)]
    return y, ops


# The defaults of defaults.py that change a restorer's images without being an option of bench restore.
KEY_DEFAULTS = (
    "RESTORE_T_TRUNC",
    "RESTORE_NET_T_TRUNC",
    "RESTORE_STEPS",
    "RESTORE_ZETA",
    "RESTORE_LAMBDA",
    "RESTORE_FULL_STEPS",
    "DDNM_ETA",
    "DIFFPIR_ZETA",
    "RESTORE_DIP_SEED",
)

# a restorer's UNet -> its weights' fingerprint, hashed once per run (weak: a freed UNet's entry goes with it)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _key(b: RestoreBench, task: str, method: str, dip_seed: int, restorer: Restorer) -> str:
    """What decides a row's images: the model's weights (not its path: a model retrained in place is another
    model), the data, the settings, the device and dtype (not the thread count)."""
    unet, net = restorer.ctx.unet, restorer.ctx.restorer
    if unet not in _FINGERPRINTS:
        _FINGERPRINTS[unet] = ddpm_fingerprint(unet, restorer.ctx.scheduler)
    cfg = {"task": TASKS[task], "method": method, "samples": b.samples, "dip_seed": dip_seed, "seed": b.seed}
    cfg |= {"model": _FINGERPRINTS[unet], "dip": asdict(restorer.ctx.dip), "dtype": str(restorer.ctx.amp_dtype)}
    if net is not None and "restorer" in registry.get("restore", "blind", method).needs:
        if net not in _FINGERPRINTS:
            _FINGERPRINTS[net] = weights_fingerprint(net)
        cfg["restorer"] = _FINGERPRINTS[net]
    cfg |= {"data": b.data, "device": device_name(restorer.ctx.device, threads=False)}
    cfg["settings"] = {k: getattr(defaults, k) for k in KEY_DEFAULTS}  # a changed default is another row
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def _run_method(
    b: RestoreBench, restorer: Restorer, task: str, method: str, dip_seed: int, data: tuple, cache: Path
) -> list[dict]:
    """Per-image records of one method (one DIP seed), computed in batches; finished images are read back."""
    names, clean, y, ops = data
    folder = cache / task / f"{method}-s{dip_seed}-{_key(b, task, method, dip_seed, restorer)}"
    records: list[dict | None] = [None] * len(names)
    for i, nm in enumerate(names):
        f = folder / f"{nm}.json"
        if f.is_file():
            records[i] = json.loads(f.read_text())
    todo = [i for i, r in enumerate(records) if r is None]
    bs = restorer.ctx.batch_size
    for lo in range(0, len(todo), bs):
        idx = todo[lo : lo + bs]
        seeds = [b.seed + i + 1000 * dip_seed for i in idx]
        out, seconds, nfe = restorer.restore_tensors(
            [y[i] for i in idx], [ops[i] for i in idx], method, seeds, TASKS[task][2], samples=b.samples
        )
        for k, i in enumerate(idx):
            p, s = score_uint8(out[k], clean[i])
            save_png(out[k], folder / f"{names[i]}.png")
            records[i] = {"PSNR": p, "SSIM": s, "seconds": seconds / len(idx), "nfe": nfe}
            write_json(folder / f"{names[i]}.json", records[i])
    return records  # type: ignore[return-value]


def _row(method: str, runs: list[list[dict]], n: int) -> dict:
    """Mean over the images (and, over DIP seeds, the mean and spread of the per-seed means)."""
    per_seed = [statistics.mean(r["PSNR"] for r in recs) for recs in runs]
    ssim = statistics.mean(statistics.mean(r["SSIM"] for r in recs) for recs in runs)
    row: dict = {"method": method, "n": n, "PSNR": round(statistics.mean(per_seed), 2)}
    if len(runs) > 1:
        row["PSNR spread (seeds)"] = f"{min(per_seed):.2f}..{max(per_seed):.2f} ({len(runs)} seeds)"
    psnrs = [r["PSNR"] for r in runs[0]]  # the sample standard deviation, as the tables give it
    row["PSNR std (images)"] = round(statistics.stdev(psnrs), 2) if len(psnrs) > 1 else 0.0
    row |= {"SSIM": round(ssim, 4), "NFE": round(runs[0][0]["nfe"], 1)}
    row["s/img"] = round(statistics.mean(r["seconds"] for recs in runs for r in recs), 3)
    return row


class _Kid:
    """KID (Binkowski et al. 2018) of a row's outputs against real images that were not restored: the
    reference set's InceptionV3 features are extracted once, the outputs' per row. It says whether what a
    method invents (a hole, a missing half) looks like the images, which PSNR against one answer does not."""

    def __init__(self, b: RestoreBench, names: list[str], size: int, echo: Echo) -> None:
        self.extractor = inception_extractor(b.fid_weights)
        source = b.reference_data or b.data
        ref = load_images(source, size)
        same = Path(source).resolve() == Path(b.data).resolve()
        restored = set(names) if same else set()
        keep = [i for i, nm in enumerate(ref.names) if nm not in restored]
        if len(keep) < 2:
            raise UserError(f"--reference-data {source}: KID needs real images other than the restored ones")
        self.ref = extract_features(ref.images[keep], self.extractor)
        echo(f"KID against {len(keep)} real images of {source}" + (" (the restored ones left out)" if same else ""))

    def __call__(self, images: torch.Tensor, seed: int) -> tuple[float, float]:
        k = kid_from_features(extract_features(images, self.extractor), self.ref, seed=seed)
        return k["kid"], k["kid_std"]


def bench_restore(b: RestoreBench, out: Path, restorer: Restorer, echo: Echo) -> dict[str, list[dict]]:
    """Every task's table (RUN/restore/TASK.md) and figure (RUN/restore/TASK.png); returns the rows."""
    images = load_images(b.data, int(restorer.ctx.unet.config.sample_size), limit=b.n)
    clean = images.images
    kid = _Kid(b, images.names, int(clean.shape[-1]), echo) if b.fid else None
    real = kid(clean, b.seed) if kid is not None else None  # the floor at this n: the same row in every task
    seeds = list(range(b.seed, b.seed + clean.shape[0]))
    root = out / "restore"
    tables: dict[str, list[dict]] = {}
    for task in b.tasks:
        y, ops = _degrade(task, clean, seeds)
        kind = TASKS[task][0]
        runnable = restorer.methods(kind)
        methods = [m for m in (b.methods or tuple(runnable)) if m in runnable]
        rows, shown = [], {}
        for m in methods:
            uses_dip = registry.get("restore", "blind", m).uses_dip
            runs = []
            for s in range(b.dip_seeds if uses_dip else 1):
                echo(f"{task}: {m}" + (f" (DIP seed {s})" if uses_dip else ""))
                runs.append(_run_method(b, restorer, task, m, s, (images.names, clean, y, ops), root / "cache"))
            rows.append(_row(m, runs, len(images.names)))
            shown[m] = root / "cache" / task / f"{m}-s0-{_key(b, task, m, 0, restorer)}"
            if kid is not None:  # the first seed's outputs, as written (8-bit PNGs)
                outs = torch.stack([load_image(shown[m] / f"{nm}.png", None) for nm in images.names])
                rows[-1]["KID"], rows[-1]["KID std"] = (round(v, 4) for v in kid(outs, b.seed))
        if real is not None:
            rows.append({"method": "the clean images themselves", "n": len(images.names)})
            rows[-1]["KID"], rows[-1]["KID std"] = round(real[0], 4), round(real[1], 4)
        tables[task] = rows
        _write_task(root, task, rows, images.names, clean, y, shown, b, _settings(b, restorer))
    return tables


def _write_task(
    root: Path,
    task: str,
    rows: list[dict],
    names: list[str],
    clean: torch.Tensor,
    y: list[torch.Tensor],
    shown: dict[str, Path],
    b: RestoreBench,
    settings: str,
) -> None:
    k = min(6, len(names))
    size = clean.shape[-1]
    observed = torch.stack(
        [torch.nn.functional.interpolate(v[None], size=(size, size), mode="nearest")[0] for v in y[:k]]
    )
    fig = [("observed", observed)]
    fig += [
        (m, torch.stack([load_image(folder / f"{nm}.png", None) for nm in names[:k]])) for m, folder in shown.items()
    ]
    fig.append(("clean", clean[:k]))
    labelled_comparison(root / f"{task}.png", fig)
    kind, arg, sigma = TASKS[task]
    what = f"{arg}x super-resolution" if kind == "sr" else f"inpainting ({arg})"
    head = (
        f"# Restoration: {task} ({what}{f', noise sigma {sigma:g}' if sigma else ''}; blind protocol)\n\n"
        f"{len(names)} images of {b.data}; PSNR / SSIM on 8-bit outputs (scikit-image); DIP methods over "
        f"{b.dip_seeds} seeds; {b.samples} chains averaged per diffusion method; {device_name(b.device)}.\n\n"
        f"Settings: {settings}.\n\n"
        + (
            "KID: InceptionV3 features of the first seed's 8-bit outputs against the real images of "
            f"{b.reference_data or b.data} that were not restored (100 subsets; about 0 when the outputs look like "
            "them; the last row is the floor at this n).\n\n"
            if b.fid
            else ""
        )
        + f"Rows of {task}.png: "
        + ", ".join(label for label, _ in fig)
        + "\n\n"
    )
    write_text(root / f"{task}.md", head + table(rows))
    record = {"task": task, "data": b.data, "n": len(names), "settings": settings, "rows": rows}
    write_json(root / f"{task}.json", record)
    print(head + table(rows))


def _settings(b: RestoreBench, restorer: Restorer) -> str:
    """What the table's numbers depend on beyond the task, so that a shrunk run says so."""
    dip, ctx = restorer.ctx.dip, restorer.ctx
    return (
        f"model {b.model or 'the shipped ddpm-pokemon64'}; DIP (dip, tdpm-dip) {dip.preset}, {dip.iters} iterations, "
        f"lr {dip.lr:g}; seed {b.seed} (image i: seed + i); dtype {ctx.amp_dtype or torch.float32}"
    )


def check_methods_apply(b: RestoreBench) -> None:
    """Every task gets a row from --methods (bicubic restores no inpainting task): one line, before any work."""
    for task in b.tasks:
        kind = TASKS[task][0]
        if b.methods and not any(kind in registry.get("restore", "blind", m).operators for m in b.methods):
            fits = [m.name for m in registry.methods("restore", "blind", operator=kind)]
            chosen = ",".join(b.methods)
            raise UserError(f"--methods {chosen}: none restores {task} ({kind}); add one of {', '.join(fits)}")


def check_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t for t in text.split(",") if t) or tuple(TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown restoration task {bad[0]!r}; choose {', '.join(TASKS)}")
    return tasks

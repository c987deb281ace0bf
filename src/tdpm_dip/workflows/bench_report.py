"""Writing a table's files from its cached rows: Markdown, CSV and JSON, and its figures (Figs. 3 and 4 layouts,
DIP curves, quality against cost).

Every table states its protocol and which of the report's settings were shrunk (`header`, `notes`), and shows
the report's own number next to each row ("report ..." columns, `bench_tables`).
"""

from __future__ import annotations

import copy
import csv
import io
import time

import torch

from .. import defaults, registry
from ..errors import UserError
from ..metrics import (
    copy_rate,
    extract_features,
    fid,
    inception_extractor,
    kid,
    precision_recall,
    reference_features,
    swd,
)
from ..models import count_params
from ..outputs import markdown_table, staged_dir, write_json, write_text
from ..reporting import cost_figure, curves_figure, labelled_comparison
from .bench_cache import Bench, loadavg, schedule_name
from .bench_tables import REPORT_DIP, BenchSettings, RowSpec, table_specs


def _denoise_row(spec: RowSpec, record: dict, sched_name: str) -> dict:
    m = dict(record["metrics"])
    n = m.pop("n")
    row = {"row": spec.label, "schedule": sched_name, "protocol": m.pop("protocol"), "method": m.pop("method"), "n": n}
    if "PSNR" in m:
        row[f"PSNR@{n}"] = m.pop("PSNR")
        row["PSNR sd"] = m.pop("PSNR sd", None)  # over the images (rows cached before it was kept: None)
    rep = dict(spec.report)
    row["report PSNR"] = rep.get("report PSNR")
    if "SSIM" in m:
        row[f"SSIM@{n}"] = m.pop("SSIM")
        row["SSIM sd"] = m.pop("SSIM sd", None)
    row["report SSIM"] = rep.get("report SSIM")
    for k in ("input PSNR", "t_noisy", "sigma", "t_star", "t_trunc", "samples"):
        if k in m:
            row[k] = m.pop(k)
    row["reverse steps"] = m.pop("reverse steps")
    row["report steps"] = rep.get("report steps")
    row["NFE"] = m.pop("NFE")
    row["s/img"] = m.pop("s/img")
    row["report time (T4)"] = rep.get("report time (T4)")
    return row


class _GenMetrics:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.fid_note: str | None = None
        self.extractor = bench.extractor
        if bench.s.fid and self.extractor is None:
            try:
                self.extractor = inception_extractor(bench.s.fid_weights, bench.context("linear").device)
            except UserError as e:
                self.fid_note = f"FID not computed: {e}"
                bench.echo(self.fid_note)

    def __call__(self, images: torch.Tensor, copies: bool = True) -> dict:
        """FID, KID, precision / recall and SWD against the reference set (--reference-data, else --data);
        copy-rate and nearest PSNR against the --data images (those TDPM-DIP reconstructs), unless not `copies`."""
        ref = self.b.reference if self.b.reference is not None else self.b.images
        out: dict = {}
        if self.extractor is not None:
            n = images.shape[0]
            feats = extract_features(images, self.extractor)  # once, for FID and KID
            try:
                out[f"FID@{n}"] = fid(images, ref, self.extractor, self.b.cache, features=feats)
            except ValueError as e:
                out[f"FID@{n}"] = None
                self.fid_note = f"FID not computed for some rows ({e}); more images are needed"
            try:
                out[f"KID@{n}"] = kid(images, ref, self.extractor, self.b.cache, seed=self.b.s.seed, features=feats)[
                    "kid"
                ]
            except ValueError:
                out[f"KID@{n}"] = None
            try:
                pr = precision_recall(feats, reference_features(ref, self.extractor, self.b.cache))
                out["precision"], out["recall"] = pr["precision"], pr["recall"]
            except ValueError:
                out["precision"] = out["recall"] = None
        s = swd(images, ref, seed=0)
        out["SWD x1e3"] = 1e3 * s["swd_avg"]
        if copies:
            cr = copy_rate(images, self.b.images)
            out["copy-rate"] = cr["rate"]
            out["nearest PSNR"] = sum(cr["nearest_psnr"]) / len(cr["nearest_psnr"])
        return out


def _generation_rows(bench: Bench, specs: list[RowSpec], gm: _GenMetrics) -> list[dict]:
    rows = []
    base: dict | None = None
    for spec in specs:
        record, tensors = bench.load(bench.key(spec)[0])
        m = record["metrics"]
        row = {"row": spec.label, "protocol": m["protocol"], "method": m["method"], "n": m["n"]}
        row.update(gm(tensors["images"]))
        rep = dict(spec.report)
        if "report FID@1k" in rep or bench.s.fid:
            row["report FID@1k"] = rep.get("report FID@1k")
        if "t_trunc" in _entry(spec).reads:
            row["t_trunc"] = m.get("t_trunc")
        row.update(
            {
                "reverse steps": m["reverse steps"],
                "report steps": rep.get("report steps"),
                "NFE": m["NFE"],
                "s/img": m["s/img"],
                "report time (T4)": rep.get("report time (T4)"),
            }
        )
        if base is None:
            base = row
        row["speed-up (steps)"] = f"x{base['reverse steps'] / row['reverse steps']:.2f}"
        row["speed-up (time)"] = f"x{base['s/img'] / max(row['s/img'], 1e-12):.2f}"
        if bench.s.ddpm_steps < defaults.DDPM_STEPS:
            full = base["s/img"] * defaults.DDPM_STEPS / bench.s.ddpm_steps
            row["speed-up (time) vs 1000-step DDPM, extrapolated"] = f"x{full / max(row['s/img'], 1e-12):.2f}"
        row["report speed-up (steps)"] = rep.get("report speed-up (steps)")
        row["report speed-up (time)"] = rep.get("report speed-up (time)")
        rows.append(row)
    if bench.reference is not None:
        # What copies of the --data images score against the reference set: the floor a method that
        # reconstructs them (TDPM-DIP under the paper protocol) approaches.
        real: dict = {"row": f"real: the {bench.s.n} --data images themselves", "protocol": "-", "method": "real"}
        real["n"] = bench.s.n
        real.update(gm(bench.images, copies=False))
        rows.append(real)
    return rows


COLUMN_ORDER = (
    "row",
    "schedule",
    "protocol",
    "method",
    "n",
    "PSNR@",
    "PSNR sd",
    "report PSNR",
    "SSIM@",
    "SSIM sd",
    "report SSIM",
    "FID@",
    "report FID@1k",
    "KID@",
    "precision",
    "recall",
    "SWD x1e3",
    "copy-rate",
    "nearest PSNR",
    "input PSNR",
    "t_noisy",
    "sigma",
    "t_star",
    "t_trunc",
    "samples",
    "reverse steps",
    "report steps",
    "NFE",
    "s/img",
    "report time (T4)",
    "speed-up (steps)",
    "report speed-up (steps)",
    "speed-up (time)",
    "report speed-up (time)",
)


def _columns(rows: list[dict]) -> list[str]:
    """Every column present in some row, in a fixed reading order (report numbers beside ours)."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def rank(c: str) -> int:
        for i, o in enumerate(COLUMN_ORDER):
            if c == o or (o.endswith("@") and c.startswith(o)):
                return i
        return len(COLUMN_ORDER)

    return sorted(cols, key=lambda c: (rank(c), cols.index(c)))


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def header(bench: Bench, name: str, specs: list[RowSpec]) -> tuple[dict, list[str]]:
    """What a reader needs to judge a table: protocol, data, models, device, and what was shrunk (`notes`)."""
    s = bench.s
    models = {
        slot: {
            "path": bench.models[slot],
            "schedule": schedule_name(bench.context(slot)),
            "params_M": round(count_params(bench.context(slot).unet) / 1e6, 2),
            "fingerprint": bench._fp[slot],
        }
        for slot in sorted({sp.model for sp in specs})
    }
    ctx = bench.context("linear")
    proto = ", ".join(sorted({sp.protocol for sp in specs}))
    if name == "table1":
        proto = (
            "paper for TDPM-DIP (its DIP fits noised --data images); DDPM, DDIM and amortized TDPM (G_psi(z) "
            "+ T_trunc steps) sample from pure noise"
        )
    h: dict = {
        "table": name,
        "protocol": proto,
        "data": bench.data,
        "n": s.n,
        "image size": bench.size,
        "seeds": f"{s.seed}..{s.seed + s.n - 1} (image i uses seed i)",
        "models": models,
        "device": bench.device_name,
        "dtype": str(ctx.amp_dtype).replace("torch.", "") if ctx.amp_dtype else "float32",
        # s/img depends on what else the machine ran: the load when the table was written (each image's own is in
        # progress_images.csv)
        "load average when written": loadavg(),
    }
    for use in sorted({bench.dip_use(sp) for sp in specs if _entry(sp).uses_dip}):
        cfg = s.dip[use]
        h[f"DIP ({use})"] = {"preset": cfg.preset, "iters": cfg.iters, "lr": cfg.lr}
        if use == "blind":
            h[f"DIP ({use})"].update(input_noise=round(cfg.input_noise, 4), average=cfg.average)
    if any(sp.task == "denoise" and sp.protocol == "paper" for sp in specs):
        h["t_noisy"] = s.t_noisy
    if any(sp.protocol == "blind" for sp in specs):
        h["sigma (0..255)"] = s.sigma
        h["noise"] = (
            "clipped: rounded and clipped to 8 bits, as a saved noisy file"
            if s.noise == "clipped"
            else "float: unclipped x + n, as in denoising papers"
        )
        h["clipping-aware observation (declip)"] = "on" if s.declip else "off"
        h["blind tdpm-dip chains averaged"] = s.samples
    return h, _notes(bench, name, specs, models)


def _entry(spec: RowSpec) -> registry.Method:
    return registry.get(spec.task, spec.protocol, spec.method)


def _notes(bench: Bench, name: str, specs: list[RowSpec], models: dict) -> list[str]:
    """Every setting shrunk or changed from the report's, and the caveats of the table."""
    s = bench.s
    notes: list[str] = []
    if s.n < defaults.N_IMAGES:
        notes.append(f"n = {s.n} images (report: {defaults.N_IMAGES})")
    paper = s.dip.get("paper")
    if paper is not None and any(_entry(sp).uses_dip and sp.protocol != "blind" for sp in specs):
        if paper.preset != REPORT_DIP.preset:
            notes.append(f"DIP network {paper.preset} (report: paper-dip, 61.5M parameters)")
        if paper.iters != REPORT_DIP.iters:
            notes.append(f"DIP iterations {paper.iters} (report: {REPORT_DIP.iters})")
        if paper.lr != REPORT_DIP.lr:
            notes.append(f"DIP learning rate {paper.lr:g} (report: {REPORT_DIP.lr:g})")
    if any(sp.protocol == "blind" for sp in specs):
        cfg = s.dip["blind"]
        notes.append(
            f"blind protocol: not the report's; DIP {cfg.preset}, {cfg.iters} it, lr {cfg.lr:g}, input noise "
            f"{cfg.input_noise:.3g}, output averaging {cfg.average}; blind TDPM-DIP: its DIP fits x_T built "
            "from the ensemble estimate (DIP (plugin) above). The report's numbers are the paper "
            "protocol's (oracle): blind rows have none beside them"
        )
    if any(sp.task == "denoise" and sp.protocol == "paper" for sp in specs) and s.t_noisy != defaults.T_NOISY:
        notes.append(f"t_noisy = {s.t_noisy} (report: {defaults.T_NOISY})")
    if (
        any(sp.protocol == "paper" and "t_trunc" in _entry(sp).reads for sp in specs)
        and s.paper_t_trunc != defaults.T_TRUNC
    ):
        notes.append(f"T_trunc = {s.paper_t_trunc} (report: {defaults.T_TRUNC})")
    if name == "table3" and tuple(s.t_truncs) != defaults.T_TRUNCS:
        notes.append(f"T_trunc values {list(s.t_truncs)} (report: {list(defaults.T_TRUNCS)})")
    if name == "table4":
        notes.append(
            "the DIP rows never use the DDPM, so the schedule cannot change them (same images and "
            "seeds give the same numbers; the report's 32.12 vs 34.35 dB differ nonetheless)"
        )
    if name == "table1" and s.ddpm_steps < defaults.DDPM_STEPS:
        notes.append(
            f"DDPM shrunk to {s.ddpm_steps} strided ancestral steps (DDIM eta = 1) instead of "
            f"{defaults.DDPM_STEPS}; speed-ups are against that row as run, plus a column extrapolated to "
            f"{defaults.DDPM_STEPS} steps"
        )
    if any(m["params_M"] < 100 for m in models.values()):
        notes.append(
            "DDPM"
            + ("s" if len(models) > 1 else "")
            + ": "
            + ", ".join(f"{m['params_M']}M parameters ({slot})" for slot, m in models.items())
            + " (report: the 113.7M-parameter paper-ddpm)"
        )
    if "NVIDIA T4" not in bench.device_name:
        notes.append(f"timings on {bench.device_name} (report: one NVIDIA T4); s/img excludes model loading")
    return notes


# (spec, its cached row record, its cached tensors) of each row of a table
Loaded = list[tuple[RowSpec, dict, dict[str, torch.Tensor]]]
Figures = list[tuple[str, str]]  # (file, caption)


def _figures(bench: Bench, name: str, specs: list[RowSpec], extra: dict[str, RowSpec]) -> Figures:
    """Write the table's figures; return (file, caption) pairs."""
    k = min(bench.s.fig_images, bench.s.n)
    loaded: Loaded = [(sp, *bench.load(bench.key(sp)[0])) for sp in specs]
    figs = _generation_figures(bench, loaded, extra, k) if name == "table1" else [_fig4(bench, name, loaded, k)]
    if bench.s.protocol == "blind" and name == "table2":
        figs += _cost_figure(bench, loaded)
    return figs + _curves_figure(bench, name, loaded)


def _generation_figures(bench: Bench, loaded: Loaded, extra: dict[str, RowSpec], k: int) -> Figures:
    """Table 1's samples beside the --data images, and Fig. 3: TDPM-DIP's images beside its DIP outputs."""
    rows = [("--data images", bench.images[:k])] + [(sp.label, t["images"][:k]) for sp, _, t in loaded]
    labelled_comparison(bench.out / "table1_samples.png", rows, max_images=k)  # each row named in the image
    figs = [("table1_samples.png", "rows: --data images, " + ", ".join(sp.label for sp, _, _ in loaded))]
    grid: list[tuple[str, torch.Tensor]] = []
    caps = []
    for sp in extra.values():
        _, t = bench.load(bench.key(sp)[0])
        grid += [(f"TDPM-DIP T_trunc={sp.t_trunc}", t["images"][:k]), ("its DIP output", t["dip_output"][:k])]
        caps.append(f"TDPM-DIP T_trunc={sp.t_trunc}, its DIP output G_psi(z)")
    if grid:
        labelled_comparison(bench.out / "fig3.png", grid, max_images=k)
        figs.append(
            ("fig3.png", "Fig. 3 (paper protocol, reconstructs the first --data images); row pairs: " + "; ".join(caps))
        )
    return figs


def _fig4(bench: Bench, name: str, loaded: Loaded, k: int) -> tuple[str, str]:
    """Fig. 4's layout: the clean images, then each row's output, each new noisy input before the first row that
    denoises it (table4: one per schedule)."""
    rows, caps = [bench.images[:k]], ["clean"]
    last_inputs = None
    for sp, _, t in loaded:
        if "inputs" in t and (last_inputs is None or not torch.equal(t["inputs"][:k], last_inputs)):
            last_inputs = t["inputs"][:k]
            rows.append(last_inputs)
            caps.append(f"noisy ({sp.model})" if name == "table4" else "noisy")
        rows.append(t["images"][:k])
        caps.append(sp.label + (f" ({sp.model})" if name == "table4" else ""))
    labelled_comparison(bench.out / f"{name}_fig4.png", list(zip(caps, rows)), max_images=k)
    return (f"{name}_fig4.png", "Fig. 4 layout; rows: " + ", ".join(caps))


def _cost_figure(bench: Bench, loaded: Loaded) -> Figures:
    """Blind table2: PSNR and SSIM against NFE and s/img (none when the plot cannot be drawn)."""
    pts = [
        {
            "label": sp.label,
            "PSNR": rec["metrics"]["PSNR"],
            "SSIM": rec["metrics"]["SSIM"],
            "NFE": rec["metrics"]["NFE"],
            "s/img": rec["metrics"]["s/img"],
        }
        for sp, rec, _ in loaded
    ]
    title = f"blind denoising, sigma {bench.s.sigma:g}, {bench.s.noise} noise, n = {bench.s.n}"
    if cost_figure(bench.out / "table2_cost.png", pts, title):
        return [("table2_cost.png", "quality against cost: PSNR and SSIM against NFE and s/img")]
    return []


def _curves_figure(bench: Bench, name: str, loaded: Loaded) -> Figures:
    """The mean DIP curves of the rows that fit a DIP (none without such a row)."""
    curves = {
        sp.label + (f" ({sp.model})" if name == "table4" else ""): rec["curves"]
        for sp, rec, _ in loaded
        if rec.get("curves")
    }
    if not curves:
        return []
    curves_figure(bench.out / f"{name}_dip_curves.png", curves)
    return [
        (
            f"{name}_dip_curves.png",
            "DIP loss (MSE to its target) per iteration"
            + (", and PSNR of its output to the clean image" if name != "table1" else ""),
        )
    ]


TITLES = {
    "table1": "Table 1: generation from pure noise",
    "table2": "Table 2: denoising",
    "table3": "Table 3: T_trunc ablation (denoising)",
    "table4": "Table 4: linear vs cosine schedule (denoising)",
}


def _generation_notes(bench: Bench, gm: _GenMetrics) -> list[str]:
    """Table 1's caveats: what its distribution metrics compare with, and which rows are missing."""
    notes = [gm.fid_note] if gm.fid_note else []
    ref = (
        f"the {bench.reference.shape[0]} --reference-data images ({bench.s.reference_data})"
        if bench.reference is not None
        else "the --data images"
    )
    if bench.s.fid and gm.extractor is not None:
        notes.append(
            f"FID@{bench.s.n} against {ref} (report: FID@1k); with few images it is "
            "strongly biased upwards. KID: unbiased polynomial-kernel MMD^2 (100 subsets), the same "
            "features; about 0 for samples of the reference distribution. precision / recall: improved "
            "precision and recall (Kynkaanniemi et al. 2019, k = 3) on the same features: the share "
            "of samples that look real / of real images the samples cover"
        )
    missing = [t for t in defaults.T_TRUNCS if t not in bench.s.generators]
    if missing:
        notes.append(
            "TDPM (amortized) at T_trunc " + ", ".join(map(str, missing)) + ": no --generator for "
            "that T_trunc given, rows skipped (train one with `tdpm-dip train-generator`)"
        )
    notes.append(
        "SWD: ProGAN's sliced Wasserstein distance x1e3 on 7x7 Laplacian-pyramid patches (levels "
        f"down to 16 px), against {ref}; copy-rate: share of images whose nearest --data "
        "image (L2) is at PSNR >= 25 dB; nearest PSNR: its mean"
    )
    notes.append(
        "TDPM-DIP generation under the paper protocol fits G_psi to noised --data images: it "
        "reconstructs them (see copy-rate), it does not sample new images"
    )
    if bench.s.protocol == "blind":
        notes.append("generation has no blind protocol: TDPM-DIP here is the paper protocol's")
    return notes


def _denoise_subtitle(s: BenchSettings) -> str:
    """The observation a denoising table's rows are given, appended to its title."""
    if s.protocol == "paper":
        return f" at t={s.t_noisy} (paper protocol)"
    return f" of Gaussian noise, sigma={s.sigma:g}, {s.noise} (blind protocol)"


def _header_lines(h: dict) -> list[str]:
    """The Markdown bullets of a table's header (`header`), one per entry."""
    lines = []
    for k, v in h.items():
        if k == "table":
            continue
        if k == "models":
            v = "; ".join(
                f"{slot}: {m['path']} ({m['schedule']} schedule, {m['params_M']}M parameters, "
                f"weights {m['fingerprint']})"
                for slot, m in v.items()
            )
        elif isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        lines.append(f"- {k}: {v}")
    return lines


def _markdown(title: str, h: dict, notes: list[str], rows: list[dict], figs: Figures) -> str:
    """RUN/<table>.md: title, header, notes, the table, then its figures with their captions."""
    lines = [f"# {title}", "", *_header_lines(h)]
    lines.append("- notes (settings shrunk or changed from the report's, caveats): " + ("none" if not notes else ""))
    lines += [f"  - {x}" for x in notes]
    lines += ["", markdown_table(rows, _columns(rows)), ""]
    lines += [f"![{f}]({f}) {c}  " for f, c in figs]
    return "\n".join(lines) + "\n"


def write_table(
    bench: Bench, name: str, specs: list[RowSpec], extra: dict[str, RowSpec], gm: _GenMetrics | None
) -> list[dict]:
    """RUN/<name>.md, .csv and .json and the table's figures, from its cached rows; returns the rows."""
    h, notes = header(bench, name, specs)
    if name == "table1":
        assert gm is not None
        rows = _generation_rows(bench, specs, gm)
        notes += _generation_notes(bench, gm)  # after the rows: computing their FID may add a note
        title = TITLES[name]
    else:
        rows = []
        for sp in specs:
            rec, _ = bench.load(bench.key(sp)[0])
            rows.append(_denoise_row(sp, rec, schedule_name(bench.context(sp.model))))
        title = TITLES[name] + _denoise_subtitle(bench.s)
    figs = _figures(bench, name, specs, extra)
    write_text(bench.out / f"{name}.md", _markdown(title, h, notes, rows, figs))
    write_text(bench.out / f"{name}.csv", _csv(rows))
    write_json(
        bench.out / f"{name}.json",
        {"table": name, "title": title, "header": h, "notes": notes, "rows": rows, "figures": dict(figs)},
    )
    return rows


def write_tables(
    tables: list[str], bench: Bench, specs: dict[str, list[RowSpec]], extra: dict[str, RowSpec]
) -> dict[str, list[dict]]:
    """Every table's files (`write_table`) from rows already cached; returns each table's rows."""
    gm = _GenMetrics(bench) if "table1" in tables else None
    # The tables' files are written beside RUN and moved in together (RUN/cache stays where it is).
    with staged_dir(bench.out, in_place=True) as tmp:
        staged = copy.copy(bench)
        staged.out = tmp
        return {name: write_table(staged, name, specs[name], extra, gm) for name in tables}


def write_progress(tables: list[str], bench: Bench) -> list[dict]:
    """RUN/progress.md and .json: per row of `tables`, the images finished so far (n done of N), the mean and
    standard deviation of their PSNR / SSIM, s/img and when they finished. Computes nothing."""
    specs = [sp for name in tables for sp in table_specs(name, bench.s)]
    rows = bench.progress(specs)
    complete = all(r["n done"] == r["of n"] for r in rows)
    title = "Bench progress: " + ", ".join(tables) + ("" if complete else " (PARTIAL: some rows are not finished)")
    h, _ = header(bench, tables[0], specs)
    lines = [f"# {title}", "", f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    lines += [f"- {k}: {v}" for k, v in h.items() if k in ("protocol", "data", "n", "device", "dtype", "t_noisy")]
    lines += [f"- {k}: {v}" for k, v in h.items() if k.startswith("DIP (")]
    lines += ["- mean and sd (sample standard deviation) over the images done; s/img: their compute time", ""]
    lines += [markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r))), ""]
    write_text(bench.out / "progress.md", "\n".join(lines))
    write_json(bench.out / "progress.json", {"title": title, "header": h, "rows": rows})
    write_text(bench.out / "progress_images.csv", _csv(bench.image_records(specs)))
    return rows


__all__ = ["COLUMN_ORDER", "TITLES", "header", "write_progress", "write_table", "write_tables"]

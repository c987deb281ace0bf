"""Amortized TDPM against DDIM and DDPM-1000 on procedural sprites.

Trains G_psi at one T_trunc with each objective (`tdpm-dip train-generator`, gan and distill), then
generates n images with DDPM-1000, DDIM-(1 + T_trunc), DDIM-50 and amortized TDPM for each generator,
and, for each generator, the same reverse chain started from training sprites noised to its T_trunc
(what a perfect G_psi would give: the truncated DDPM's own sampler). A truncated DDPM (trained below level
T only) has no chain from pure noise: its DDPM and DDIM rows are skipped.
and scores them against n held-out sprites (a seed the DDPM never saw): FID, KID and improved precision /
recall (k = 3; Kynkaanniemi et al. 2019) on one extraction of InceptionV3 features (the `fid` extra), SWD,
copy-rate and NN-PSNR to the training sprites, NFE and s/img. A second real set (another seed) scores what
real data reaches. Writes OUT/results.json and
OUT/results.md, and prints the table.

    OMP_NUM_THREADS=1 python benchmarks/tdpm_generator.py --model src/tdpm_dip/weights/ddpm-sprites32 \\
        --train-seed 0 --train-images 4096 --t-trunc 10 --steps 2000 --n 256 --out runs/tdpm-gen

Generators trained elsewhere (`tdpm-dip train-generator`) join with --generator RUN/generator (repeatable):
one row each at its own T_trunc, with its training seconds read from RUN/metrics.jsonl (plus those of its
--init generator, when it was fine-tuned from one).

The sprites are made in code (data.make_sprites): training set seed --train-seed (what the DDPM was
trained on), held-out seed --heldout-seed. Generators and generated rows are reused when OUT already
holds them (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from tdpm_dip import metrics as M
from tdpm_dip import registry
from tdpm_dip.data import make_sprites
from tdpm_dip.generator import TDPMGenerator, load_generator, read_generator_info
from tdpm_dip.images import save_grid, save_png
from tdpm_dip.methods import Context, Job, run
from tdpm_dip.noise import image_generators, q_sample, randn
from tdpm_dip.outputs import markdown_table, write_json, write_text
from tdpm_dip.reporting import labelled_comparison
from tdpm_dip.runtime import load_context
from tdpm_dip.sampling import reverse_chain
from tdpm_dip.training.generator import train_generator
from tdpm_dip.training.options import GeneratorConfig


def _run_cost(export: Path) -> dict:
    """Training cost of a generator trained by `tdpm-dip train-generator`: the last elapsed_s and step of
    RUN/metrics.jsonl, plus its --init generator's cost (fine-tuning starts from that one's work). A generator
    folder without its run (the shipped one) has its steps from generator.json and no seconds."""
    log = export.parent / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    meta = json.loads((export / "generator.json").read_text())
    if not lines:
        return {"seconds": None, "steps": meta.get("steps"), "batch_size": meta.get("batch_size")}
    last = json.loads(lines[-1])
    cost = {"seconds": float(last["elapsed_s"]), "steps": int(last["step"]), "batch_size": meta["batch_size"]}
    if meta.get("init"):
        parent = _run_cost(Path(meta["init"]))
        unknown = parent["seconds"] is None
        cost = {
            **cost,
            "seconds": None if unknown else cost["seconds"] + parent["seconds"],
            "steps": cost["steps"] + parent["steps"],
            "fine_tuned_from": meta["init"],
        }
    return cost


def _train(args: argparse.Namespace, objective: str, data_dir: Path) -> tuple[Path, dict]:
    out = args.out / f"gen-{objective}-t{args.t_trunc}"
    export = out / "generator"
    if (export / "generator.json").is_file():
        return export, json.loads((out / "cost.json").read_text())
    t0 = time.perf_counter()
    cfg = GeneratorConfig(
        model=str(args.model),
        data=str(data_dir),
        t_trunc=args.t_trunc,
        out=str(out),
        objective=objective,
        steps=args.steps,
        batch_size=args.batch_size,
        pairs=args.pairs,
        disc_channels=args.disc_channels,
        ddim_steps=50,
        checkpoint_every=max(1, args.steps // 4),
        sample_every=0,
        n_samples=16,
        seed=args.seed,
        resume=out.exists(),
    )
    train_generator(cfg)
    cost = {
        "seconds": time.perf_counter() - t0,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "pairs": args.pairs if objective == "distill" else None,
    }
    write_json(out / "cost.json", cost)
    return export, cost


def _from_real(ctx: Context, gen: TDPMGenerator, x0: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The generator's reverse chain from x0 noised to its T_trunc (Eq. 3) instead of from G_psi(z): image i's
    noise and step noise from seed i, 64 images at a time."""
    out = []
    for lo in range(0, len(seeds), 64):
        g = image_generators(seeds[lo : lo + 64])
        x_t = q_sample(ctx.scheduler, x0[lo : lo + 64], gen.t_trunc, randn(tuple(x0.shape[1:]), g))
        out.append(reverse_chain(ctx.model, x_t, gen.t_trunc, g, steps=gen.reverse_steps).clamp(-1, 1))
    return torch.cat(out)


def _context(model: Path | str) -> Context:
    """A DDPM's Context as this benchmark times it: the CPU, fp32, 64 images at once, with progress bars."""
    ctx, _ = load_context(str(model), device="cpu", dtype="fp32", batch_size=64, progress=True)
    return ctx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the sprite DDPM (diffusers folder)")
    p.add_argument("--train-seed", type=int, default=0, help="seed of the DDPM's training sprites")
    p.add_argument("--train-images", type=int, default=4096, help="training sprites (copy-rate reference)")
    p.add_argument(
        "--heldout-seed", type=int, default=1, help="seed of the held-out sprites (`tdpm-dip sprites --seed 1`)"
    )
    p.add_argument("--t-trunc", type=int, default=10)
    p.add_argument("--objectives", default="gan,distill", help="objectives to train here ('' for none)")
    p.add_argument(
        "--generator",
        action="append",
        default=[],
        type=Path,
        metavar="RUN/generator",
        help="a generator trained elsewhere: one TDPM row at its T_trunc (repeatable)",
    )
    p.add_argument("--steps", type=int, default=2000, help="generator training steps per objective")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--disc-channels", type=int, default=16, help="gan: discriminator width")
    p.add_argument("--pairs", type=int, default=1024, help="distill: DDIM pairs")
    p.add_argument("--n", type=int, default=256, help="generated and held-out images per row")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="0: skip the DDPM-1000 row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--extra-model",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another DDPM of the same size (e.g. the demo's 300-step model): DDPM-1000 and DDIM-50 rows",
    )
    p.add_argument("--objectives-only", action="store_true", help="skip the DDPM/DDIM baseline rows")
    p.add_argument("--out", type=Path, default=Path("runs/tdpm-gen"))
    return p


class RowSpec(NamedTuple):
    """One row: `method` is a registry generation method, or "real" (`_from_real`); `gen_path` a generator
    folder (tdpm and real rows), `model_path` another DDPM than --model (--extra-model rows)."""

    label: str
    method: str
    kw: dict
    gen_path: Path | None
    model_path: str | None


# label -> (generator folder, training cost, T_trunc)
Generators = dict[str, tuple[Path, dict, int]]


def _generators(args: argparse.Namespace, data_dir: Path) -> Generators:
    """One generator per --objectives entry (trained here, or reused from OUT) and per --generator folder."""
    gens = {}
    for obj in (o for o in args.objectives.split(",") if o):
        path, cost = _train(args, obj, data_dir)
        gens[f"TDPM amortized ({obj}, T_trunc {args.t_trunc})"] = (path, cost, args.t_trunc)
    for path in args.generator:
        meta = json.loads((path / "generator.json").read_text())
        how = meta["objective"] + (", fine-tuned" if meta.get("init") else "")
        gens[f"TDPM amortized ({how}, T_trunc {meta['t_trunc']})"] = (path, _run_cost(path), int(meta["t_trunc"]))
    return gens


def _row_specs(args: argparse.Namespace, base: Context, gens: Generators) -> list[RowSpec]:
    """The DDPM and DDIM baselines (none for a truncated DDPM), each generator's tdpm row and its chain from
    real sprites, then the --extra-model rows."""
    extra = dict(e.split("=", 1) for e in args.extra_model)
    from_noise = "all-levels" in base.provides
    if not from_noise:
        print(f"{args.model} is a truncated DDPM (levels {base.levels}): no DDPM or DDIM rows", file=sys.stderr)
    specs = []
    if not args.objectives_only and from_noise:
        if args.ddpm_steps:
            specs.append(RowSpec("DDPM-1000", "ddpm", {}, None, None))
        specs += [
            RowSpec(f"DDIM-{1 + args.t_trunc}", "ddim", {"ddim_steps": 1 + args.t_trunc}, None, None),
            RowSpec("DDIM-50", "ddim", {"ddim_steps": 50}, None, None),
        ]
    for label, (path, _, _) in gens.items():
        specs += [
            RowSpec(label, "tdpm", {}, path, None),
            RowSpec(f"{label}: from noised training sprites", "real", {}, path, None),
        ]
    for name, path in extra.items():
        specs += [
            RowSpec(f"DDPM-1000 ({name})", "ddpm", {}, None, path),
            RowSpec(f"DDIM-50 ({name})", "ddim", {"ddim_steps": 50}, None, path),
        ]
    return specs


def _row_cache(out: Path, label: str) -> Path:
    """Where a row's images and seconds are kept: OUT/rows/<its label, spaces as _, no commas or parentheses>."""
    return out / "rows" / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".safetensors")


def _row_images(
    args: argparse.Namespace, base: Context, spec: RowSpec, train: torch.Tensor, seeds: list[int]
) -> tuple[torch.Tensor, float]:
    """A row's images and seconds: read from OUT/rows, or generated (image i from seed i) and saved there."""
    cache = _row_cache(args.out, spec.label)
    if cache.is_file():
        rec = load_file(cache)
        return rec["images"], float(rec["seconds"])
    ctx = _context(spec.model_path) if spec.model_path else base
    gen = load_generator(spec.gen_path, ctx.unet, ctx.scheduler) if spec.gen_path else None
    if spec.method == "real":
        assert gen is not None
        t0 = time.perf_counter()
        images = _from_real(ctx, gen, train[: args.n], seeds)
        seconds = time.perf_counter() - t0
    else:
        ctx = dataclasses.replace(ctx, generator=gen)
        protocol = registry.find("generate", spec.method).protocol
        res = run(ctx, "generate", protocol, spec.method, Job(tuple(seeds), **spec.kw))
        images, seconds = res.images, res.seconds
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "seconds": torch.tensor(seconds)}, str(cache))
    return images, seconds


def _distribution(
    images: torch.Tensor, held: torch.Tensor, extractor: M.TorchExtractor | None, args: argparse.Namespace
) -> dict:
    """FID, KID and improved precision / recall (with an extractor; one extraction serves all three) and SWD
    x1e3 of `images` against the held-out sprites."""
    out: dict = {}
    if extractor is not None:
        feats = M.extract_features(images, extractor)  # once, for FID and KID
        out["FID"] = M.fid(images, held, extractor, args.out, features=feats)
        out["KID"] = M.kid(images, held, extractor, args.out, subset_size=min(100, args.n), seed=0, features=feats)[
            "kid"
        ]
        pr = M.precision_recall(feats, M.reference_features(held, extractor, args.out))
        out["precision"], out["recall"] = pr["precision"], pr["recall"]
    out["SWD x1e3"] = 1e3 * M.swd(images, held)["swd_avg"]
    return out


def _score_row(
    args: argparse.Namespace,
    spec: RowSpec,
    images: torch.Tensor,
    seconds: float,
    ref: tuple[torch.Tensor, torch.Tensor, M.TorchExtractor | None],
    gens: Generators,
) -> dict:
    """A row of the table: NFE and s/img, `_distribution` against the held-out sprites, copy-rate and NN-PSNR to
    the training sprites, and a generator's training cost. `ref`: (held-out sprites, training sprites, extractor)."""
    held, train, extractor = ref
    steps = read_generator_info(spec.gen_path)["reverse_steps"] if spec.gen_path else None
    nfe = {"ddpm": 1000, "ddim": spec.kw.get("ddim_steps"), "tdpm": 1 + (steps or 0), "real": steps}[spec.method]
    row = {"row": spec.label, "n": args.n, "NFE": nfe, "s/img": seconds / args.n}
    row.update(_distribution(images, held, extractor, args))
    cr = M.copy_rate(images, train)
    row["copy-rate"], row["NN-PSNR"] = cr["rate"], sum(cr["nearest_psnr"]) / args.n
    if spec.method == "tdpm":
        train_s = gens[spec.label][1]["seconds"]
        row["train s"] = None if train_s is None else round(train_s, 1)
        row["train steps"] = gens[spec.label][1]["steps"]
    return row


def _real_row(
    args: argparse.Namespace, held: torch.Tensor, train: torch.Tensor, extractor: M.TorchExtractor | None
) -> dict:
    """What real data reaches: a second set of sprites (seed --heldout-seed + 1) against the held-out ones."""
    row: dict = {"row": f"a second real set (sprites, seed {args.heldout_seed + 1})", "n": args.n}
    second = make_sprites(args.n, held.shape[-1], seed=args.heldout_seed + 1).images
    row.update(_distribution(second, held, extractor, args))
    # What a new real sprite scores: the NN-PSNR of never-trained-on sprites to the training set.
    row["NN-PSNR"] = sum(M.copy_rate(held, train)["nearest_psnr"]) / args.n
    return row


def _write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    """OUT/results.json (rows, arguments, load average, device) and OUT/results.md; prints the table."""
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    write_json(
        args.out / "results.json",
        {
            "rows": rows,
            "args": {k: str(v) for k, v in vars(args).items()},
            "loadavg": load,
            "device": M.device_name("cpu"),
        },
    )
    columns = list(dict.fromkeys(c for r in rows for c in r))
    table = markdown_table(rows, columns)
    write_text(args.out / "results.md", table + "\n")
    print(table)


def _extractor() -> M.TorchExtractor | None:
    """InceptionV3 features for FID / KID / precision / recall (the `fid` extra), or None without it."""
    try:
        return M.inception_extractor(batch_size=32)
    except Exception as e:
        print(f"FID/KID not computed: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    base = _context(args.model)
    size = int(base.unet.config.sample_size)
    train = make_sprites(args.train_images, size, seed=args.train_seed).images
    held = make_sprites(args.n, size, seed=args.heldout_seed).images
    data_dir = args.out / "train-sprites"
    if not data_dir.is_dir():
        for i, x in enumerate(train):
            save_png(x, data_dir / f"sprite{i:05d}.png")
    extractor = _extractor()
    gens = _generators(args, data_dir)
    seeds = list(range(args.seed, args.seed + args.n))
    rows = []
    shown: list[tuple[str, torch.Tensor]] = [("held-out sprites", held)]
    for spec in _row_specs(args, base, gens):
        images, seconds = _row_images(args, base, spec, train, seeds)
        shown.append((spec.label, images))
        row = _score_row(args, spec, images, seconds, (held, train, extractor), gens)
        rows.append(row)
        save_grid(images[:64], args.out / "grids" / f"{_row_cache(args.out, spec.label).stem}.png", upscale=2)
        print(json.dumps(row), flush=True)
    labelled_comparison(args.out / "comparison.png", shown, max_images=8, upscale=2)
    rows.append(_real_row(args, held, train, extractor))
    _write_results(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report's Tables 1-4 as data -> run -> Markdown / CSV / JSON and figures.

A table is a list of `RowSpec`s (method, protocol, model, parameters). Each row runs through the
registry's dispatch (`methods.run`: nothing here fits a DIP or runs a chain itself), and its result --
metrics, timings and images -- is cached in RUN/cache/<key>.json + .safetensors, where the key hashes
everything that determines the row: the spec, the options its method reads (`registry.Method.reads`), the
model's weights, the images, n, the seeds, the DIP settings, the device and dtype. Re-running into the same RUN skips
finished rows, and tables that share a row (Table 2's rows are Table 4's linear rows) compute it once.

A row runs in parts of one batch, and each image is cached as its part finishes, in RUN/cache/images/<key>.json +
.safetensors, keyed on the row's key with the data set and n replaced by that image and its seed (image i depends
only on them). A killed run, run again, computes only the images it had not finished; a larger n adds only the new
images. `--progress` reports the images done per row (mean and sd so far) without computing; `--interleave` advances
the rows together, so that a run stopped early has the same images done in every row.

Every table states its protocol and which of the report's settings were shrunk, and shows the
report's own number next to each row ("report ..." columns, from anchors.md: paper protocol,
Pokemon 64x64, n = 200, the 113.7M-parameter DDPM, one NVIDIA T4).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import defaults, registry
from ..data import load_images
from ..dip import DIPConfig, DIPResult, dip_defaults
from ..errors import UserError, check_positive, check_sigma
from ..generator import TDPMGenerator, generator_fingerprint, load_generator, read_generator_info
from ..methods import Context, Job, Result, run
from ..methods.shard import Shard, is_main_process
from ..methods.types import concat_results
from ..metrics import (
    copy_rate,
    data_hash,
    device_name,
    extract_features,
    fid,
    inception_extractor,
    kid,
    precision_recall,
    psnr,
    reference_features,
    ssim,
    swd,
)
from ..models import count_params, ddpm_fingerprint, unet_size
from ..noise import add_noise, check_level, check_t_trunc, num_levels
from ..outputs import atomic_path, markdown_table, staged_dir, write_json, write_text
from ..reporting import comparison_figure, cost_figure, curves_figure, result_row
from ..runtime import dip_config, load_context, pick_device, pick_dip_preset
from .common import RunOptions

# 3: keys from the options each method reads (registry.Method.reads); images in safetensors
CACHE_VERSION = 3
TABLE_NAMES = ("table1", "table2", "table3", "table4")

# The report's settings: the defaults, and what "shrunk" is measured against.
REPORT_N = defaults.N_IMAGES
REPORT_T_NOISY = defaults.T_NOISY
REPORT_T_TRUNC = defaults.T_TRUNC
REPORT_T_TRUNCS = defaults.T_TRUNCS
REPORT_DDPM_STEPS = defaults.DDPM_STEPS
REPORT_DIP = dip_defaults("paper", "paper-dip")  # 100 iterations, Adam lr 1e-4
FIG3_T_TRUNCS = (10, 50, 100)

# The report's numbers (anchors.md). Denoising: PSNR@200, SSIM@200, reverse steps, time on a T4.
REPORT_DENOISE = {
    "linear": {
        "ddpm": (13.40, 0.369, 600, "32 s"),
        "dip": (32.12, 0.948, 100, "7 s"),
        "tdpm-dip": (32.63, 0.970, 110, "7 s"),
    },
    "cosine": {
        "ddpm": (18.68, 0.659, 600, "32 s"),
        "dip": (34.35, 0.962, 100, "7 s"),
        "tdpm-dip": (34.76, 0.979, 110, "7 s"),
    },
}
REPORT_T_TRUNC_ROWS = {
    0: (32.12, 0.948, 100, "7 s"),
    5: (32.77, 0.970, 105, "7 s"),
    10: (32.63, 0.970, 110, "7 s"),
    50: (28.70, 0.937, 150, "7 s"),
}
# Generation: FID@1k, reverse steps, time per image on a T4, speed-ups (steps, time).
REPORT_GENERATION = {"ddpm": (69.05, 1000, "38 s", "x1", "x1"), "tdpm-dip": (20.12, 110, "7 s", "x9.09", "x5")}


@dataclass(frozen=True)
class RowSpec:
    """One row of a table: what to run. `report` holds the report's numbers for that row."""

    label: str
    task: str  # "denoise" | "generate"
    method: str  # a registry name
    protocol: str  # paper | blind | unconditional (generation from pure noise)
    model: str = "linear"  # which model slot: "linear" (--model) or "cosine" (--model-cosine)
    generator: str | None = None  # tdpm: the generator folder (its T_trunc is t_trunc)
    t_trunc: int | None = None  # tdpm-dip: None = the default (paper: --t-trunc) / automatic (blind)
    steps: int | None = None  # generation: DDPM / DDIM steps
    eta: float = 0.0  # generation with ddim: 0 deterministic, 1 strided DDPM
    n: int | None = None  # None: --n
    report: tuple = ()  # ((column, value), ...)


@dataclass
class BenchSettings:
    """The command line's choices (defaults: the report's settings)."""

    protocol: str = "paper"
    n: int = REPORT_N
    seed: int = 0
    sigma: float = defaults.SIGMA
    t_noisy: int = REPORT_T_NOISY
    t_trunc: int | None = None  # None: 10 (paper) / automatic (blind)
    t_truncs: tuple[int, ...] = REPORT_T_TRUNCS
    samples: int = defaults.SAMPLES
    noise: str = defaults.NOISE_MODEL  # blind: observation model of observe.add_noise
    declip: bool = True  # blind: the clipping-aware observation (observe.declip)
    blind_ddim_steps: int = defaults.BLIND_DDIM_STEPS  # blind ddim: steps from t*
    methods: tuple[str, ...] = ()  # table1/2/4: the rows' methods to run (empty: every method of the protocol)
    ddpm_steps: int = REPORT_DDPM_STEPS
    ddim_steps: int | None = None  # None: DIP iterations + T_trunc (TDPM-DIP's NFE)
    fid: bool = False
    fid_weights: str | None = None
    generators: dict[int, str] = field(default_factory=dict)  # table1: T_trunc -> generator folder (tdpm rows)
    reference_data: str | None = None  # table1: the reference set of FID/KID/precision/recall/SWD (None: --data)
    fig_images: int = 4
    dip: dict[str, DIPConfig] = field(default_factory=lambda: {"paper": REPORT_DIP})

    @property
    def paper_t_trunc(self) -> int:
        return REPORT_T_TRUNC if self.t_trunc is None else self.t_trunc


def _report_denoise(v: tuple | None) -> tuple:
    if v is None:
        return ()
    return (("report PSNR", v[0]), ("report SSIM", v[1]), ("report steps", v[2]), ("report time (T4)", v[3]))


def _report_generation(v: tuple | None) -> tuple:
    if v is None:
        return ()
    return (
        ("report FID@1k", v[0]),
        ("report steps", v[1]),
        ("report time (T4)", v[2]),
        ("report speed-up (steps)", v[3]),
        ("report speed-up (time)", v[4]),
    )


LABELS = {"ddpm": "DDPM", "dip": "DIP", "tdpm-dip": "TDPM-DIP", "tdpm": "TDPM (amortized)"}
TABLE1_DDIM_STEPS = 50  # table1's second DDIM row (the first runs at TDPM's 1 + T_trunc NFE)


def _denoise_rows(s: BenchSettings, model: str) -> list[RowSpec]:
    """Every denoiser of the registry under the protocol (blind: those whose extra is installed, or --methods)."""
    rows = []
    for m in registry.methods("denoise", s.protocol, installed_only=True):
        if s.methods and m.name not in s.methods:
            continue
        t = (s.paper_t_trunc if s.protocol == "paper" else s.t_trunc) if "t_trunc" in m.reads else None
        # The report's numbers are the paper protocol's: beside a blind row they would mislead.
        report = _report_denoise(REPORT_DENOISE[model].get(m.name)) if s.protocol == "paper" else ()
        rows.append(RowSpec(LABELS.get(m.name, m.name), "denoise", m.name, s.protocol, model, t_trunc=t, report=report))
    return rows


def table_specs(name: str, s: BenchSettings) -> list[RowSpec]:
    """The rows of one of the report's tables under the given settings."""
    if name == "table1":
        shrunk = s.ddpm_steps < REPORT_DDPM_STEPS
        ddpm = (
            RowSpec(
                f"DDPM (strided, {s.ddpm_steps} steps)",
                "generate",
                "ddim",
                "unconditional",
                steps=s.ddpm_steps,
                eta=1.0,
                report=_report_generation(REPORT_GENERATION["ddpm"]),
            )
            if shrunk
            else RowSpec(
                "DDPM-1000",
                "generate",
                "ddpm",
                "unconditional",
                steps=REPORT_DDPM_STEPS,
                report=_report_generation(REPORT_GENERATION["ddpm"]),
            )
        )
        # DDIM at amortized TDPM's NFE (1 + T_trunc), at 50 steps, and at --ddim-steps when given.
        ddims = {1 + s.paper_t_trunc: "1 + T_trunc NFE", TABLE1_DDIM_STEPS: "50 NFE"}
        if s.ddim_steps:
            ddims.setdefault(s.ddim_steps, "--ddim-steps")
        rows = [ddpm] + [
            RowSpec(f"DDIM-{k} ({why})", "generate", "ddim", "unconditional", steps=k, eta=0.0)
            for k, why in ddims.items()
        ]
        rows += [
            RowSpec(
                f"TDPM (amortized, T_trunc {t})",
                "generate",
                "tdpm",
                "unconditional",
                t_trunc=t,
                generator=g,
            )
            for t, g in sorted(s.generators.items())
        ]
        rows += [
            RowSpec(
                "TDPM-DIP (paper; reconstructs --data)",
                "generate",
                "tdpm-dip",
                "paper",
                t_trunc=s.paper_t_trunc,
                report=_report_generation(REPORT_GENERATION["tdpm-dip"]),
            )
        ]
        return [r for r in rows if r.method in s.methods] if s.methods else rows
    if name == "table2":
        return _denoise_rows(s, "linear")
    if name == "table3":
        rows = []
        for t in s.t_truncs:
            if t == 0:
                rows.append(
                    RowSpec(
                        "T_trunc = 0 (DIP)",
                        "denoise",
                        "dip",
                        s.protocol,
                        report=_report_denoise(REPORT_T_TRUNC_ROWS[0]),
                    )
                )
            else:
                rows.append(
                    RowSpec(
                        f"T_trunc = {t}",
                        "denoise",
                        "tdpm-dip",
                        s.protocol,
                        t_trunc=t,
                        report=_report_denoise(REPORT_T_TRUNC_ROWS.get(t)),
                    )
                )
        if s.protocol == "blind":
            rows.append(RowSpec("T_trunc automatic", "denoise", "tdpm-dip", "blind", t_trunc=None))
        return rows
    if name == "table4":
        return _denoise_rows(s, "linear") + _denoise_rows(s, "cosine")
    raise UserError(f"unknown table {name!r}; choose {', '.join(TABLE_NAMES)} or all")


def fig3_specs(s: BenchSettings) -> list[RowSpec]:
    """Fig. 3: TDPM-DIP generation (paper protocol) at T_trunc 10 / 50 / 100, on the first images."""
    k = min(s.fig_images, s.n)
    return [RowSpec(f"Fig. 3 T_trunc = {t}", "generate", "tdpm-dip", "paper", t_trunc=t, n=k) for t in FIG3_T_TRUNCS]


# ------------------------------------------------------------------------------------------ running


def _json_safe(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            continue
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out


class Bench:
    """Runs row specs with caching. `load_context(slot)` returns the `Context` of a model slot; `shard`, under
    a launcher, this process's share of every row's images."""

    def __init__(
        self,
        settings: BenchSettings,
        load_context: Callable[[str], Context],
        data: str,
        load_data: Callable[[int, int], torch.Tensor],
        out: Path,
        models: dict[str, str | None],
        extractor: Callable | None = None,
        echo: Callable[[str], None] = print,
        shard: Shard | None = None,
    ) -> None:
        self.s, self._load_context, self.data, self.out = settings, load_context, data, Path(out)
        self.models, self.echo, self.extractor, self.shard = models, echo, extractor, shard
        self.cache = self.out / "cache"
        self._ctx: dict[str, Context] = {}
        self._dip_memo: dict = {}
        self._fp: dict[str, str] = {}
        ctx = self.context("linear")
        self.size = unet_size(ctx.unet.config)
        self.images = load_data(self.size, settings.n)
        if self.images.shape[0] < settings.n:
            self.echo(f"{data}: only {self.images.shape[0]} images; using n = {self.images.shape[0]}")
            settings.n = int(self.images.shape[0])
        self.device_name = device_name(ctx.device)
        self._data_hashes: dict[int, str] = {}
        self._generators: dict[str, tuple[TDPMGenerator, str]] = {}  # folder -> (generator, fingerprint)
        self.computed: list[str] = []  # keys of rows run (not read from the cache) by this object
        self.computed_images: list[tuple[str, int]] = []  # (row key, image index) computed by this object
        # table1's reference set for FID / KID / precision / recall / SWD (None: the --data images)
        self.reference: torch.Tensor | None = None
        self._image_hashes: dict[int, str] = {}

    @property
    def main(self) -> bool:
        """The process that reads and writes RUN (under a launcher, rank 0)."""
        return self.shard is None or self.shard.is_main

    def context(self, slot: str) -> Context:
        if slot not in self._ctx:
            if self.models.get(slot) is None:
                raise UserError(f"this table needs --model-{slot}" if slot != "linear" else "--model is required")
            self._ctx[slot] = self._load_context(slot)
            self._ctx[slot].dip_memo = self._dip_memo  # one blind DIP fit serves every model's rows
            self._fp[slot] = ddpm_fingerprint(self._ctx[slot].unet, self._ctx[slot].scheduler)
        return self._ctx[slot]

    def generator(self, path: str) -> tuple[TDPMGenerator, str]:
        """The generator of a tdpm row and its fingerprint, loaded once and checked against the DDPM."""
        if path not in self._generators:
            ctx = self.context("linear")
            self._generators[path] = (
                load_generator(path, ctx.unet, ctx.scheduler, ctx.device),
                generator_fingerprint(path),
            )
        return self._generators[path]

    def data_hash(self, n: int) -> str:
        if n not in self._data_hashes:
            self._data_hashes[n] = data_hash(self.images[:n])
        return self._data_hashes[n]

    @staticmethod
    def dip_use(spec: RowSpec) -> str:
        """Which DIP settings a row fits with (`registry.Method.dip`: paper, blind or plugin); rows without a
        DIP carry the paper settings, which they never read."""
        return registry.get(spec.task, spec.protocol, spec.method).dip or "paper"

    def dip_cfg(self, spec: RowSpec) -> DIPConfig:
        return self.s.dip[self.dip_use(spec)]

    def row_n(self, spec: RowSpec) -> int:
        return min(spec.n or self.s.n, self.s.n)

    def options(self, spec: RowSpec) -> dict:
        """The row's Job options (without its images and seeds)."""
        if spec.task == "generate":
            return {"t_trunc": spec.t_trunc, "ddim_steps": spec.steps, "eta": spec.eta}
        if spec.protocol == "paper":
            return {
                "t_noisy": self.s.t_noisy,
                "t_trunc": spec.t_trunc if spec.t_trunc is not None else self.s.paper_t_trunc,
            }
        return {
            "sigma": (self.s.sigma,),
            "t_trunc": spec.t_trunc,
            "samples": self.s.samples,
            "ddim_steps": self.s.blind_ddim_steps,
            "symmetries": None,  # ensemble: by image size (all 8 at the bench's sizes)
            "declip": self.s.declip,
        }

    def key(self, spec: RowSpec) -> tuple[str, dict]:
        """The cache key: a hash of everything that determines this row's numbers and images."""
        m = registry.get(spec.task, spec.protocol, spec.method)
        ctx = self.context(spec.model)
        n = self.row_n(spec)
        options = self.options(spec)
        d: dict = {
            "v": CACHE_VERSION,
            "task": spec.task,
            "method": spec.method,
            "protocol": spec.protocol,
            "model": self._fp[spec.model],
            "data": self.data_hash(n),
            "n": n,
            "seed": self.s.seed,
            "device": self.device_name,
            "amp": str(ctx.amp_dtype),
        }
        d.update({k: options[k] for k in m.reads})
        if spec.protocol == "blind":  # the observation every blind row is given
            d.update(sigma=self.s.sigma, noise=self.s.noise)
        if m.uses_dip:
            d["dip"] = dataclasses.asdict(self.dip_cfg(spec))
        if spec.generator is not None:
            d["generator"] = self.generator(spec.generator)[1]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20], d

    def cached(self, key: str) -> bool:
        return (self.cache / f"{key}.json").is_file() and (self.cache / f"{key}.safetensors").is_file()

    def job(self, spec: RowSpec) -> Job:
        """The row's whole Job: its n images, image i with seed SEED + i."""
        n = self.row_n(spec)
        clean = self.images[:n]
        seeds = tuple(range(self.s.seed, self.s.seed + n))
        if spec.task == "generate":
            images = {"reference": clean}  # TDPM-DIP (paper protocol) reconstructs them; the others ignore them
        elif spec.protocol == "paper":
            images = {"clean": clean}
        else:  # blind: the noisy observation of the clean images (which only score the DIP curves)
            images = {"noisy": add_noise(clean, self.s.sigma, list(seeds), self.s.noise), "clean": clean}
        return Job(
            seeds,
            noisy=images.get("noisy"),
            clean=images.get("clean"),
            reference=images.get("reference"),
            **self.options(spec),
        )

    def run_row(self, spec: RowSpec, part: slice | None = None) -> Result:
        """Run one row (or its images `part`) through the registry's dispatch."""
        gen = self.generator(spec.generator)[0] if spec.generator is not None else None
        ctx = dataclasses.replace(
            self.context(spec.model), dip=self.dip_cfg(spec), dip_plugin=self.s.dip.get("plugin"), generator=gen
        )
        job = self.job(spec)
        if part is not None:
            job = job.part(part)
        return run(ctx, spec.task, spec.protocol, spec.method, job, self.shard)

    # -------------------------------------------------------------------------- per-image cache

    def image_hash(self, i: int) -> str:
        if i not in self._image_hashes:
            self._image_hashes[i] = data_hash(self.images[i : i + 1])
        return self._image_hashes[i]

    def image_key(self, spec: RowSpec, i: int) -> str:
        """The cache key of image i of a row: the row's key with the whole data set and n replaced by image
        i itself and its seed (image i depends only on them: `Job`), so rows of another n, or an n that
        grows, share their finished images."""
        _, info = self.key(spec)
        d = {k: v for k, v in info.items() if k not in ("data", "n")}
        d.update(per_image=1, image=self.image_hash(i), seed=self.s.seed + i)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]

    def image_cached(self, key: str) -> bool:
        d = self.cache / "images"
        return (d / f"{key}.json").is_file() and (d / f"{key}.safetensors").is_file()

    def _save_images(self, spec: RowSpec, lo: int, res: Result) -> None:
        """One cache entry per image of a part (images lo, lo + 1, ... of the row)."""
        m = int(res.images.shape[0])
        for j in range(m):
            i = lo + j
            key = self.image_key(spec, i)
            tensors = {"image": res.images[j]}
            if res.inputs is not None:
                tensors["input"] = res.inputs[j]
            if res.dip is not None:
                tensors["dip_output"] = res.dip.output[j]
                tensors["dip_loss"] = res.dip.loss[:, j]
                if res.dip.psnr is not None:
                    tensors["dip_psnr"] = res.dip.psnr[:, j]
                if res.dip.ssim is not None:
                    tensors["dip_ssim"] = res.dip.ssim[:, j]
            info, tinfo = _image_info(res.info, m, j)
            tensors.update({f"info.{k}": v for k, v in tinfo.items()})
            tensors = {k: v.detach().float().cpu().clone().contiguous() for k, v in tensors.items()}
            record = {
                "key": key,
                "row": self.key(spec)[0],
                "label": spec.label,
                "index": i,
                "seed": self.s.seed + i,
                "method": res.method,
                "protocol": res.protocol,
                "reverse_steps": res.reverse_steps,
                "nfe": res.nfe,
                "seconds": res.seconds / m,  # the part's compute time, shared by its images
                "dip_seconds": res.dip.seconds / m if res.dip is not None else None,
                "ssim_iters": list(res.dip.ssim_iters) if res.dip is not None else None,
                "batch size": self.context(spec.model).batch_size,  # images computed together
                "info": _json_safe(info),
                "metrics": self._image_metrics(spec, i, res.images[j], None if res.inputs is None else res.inputs[j]),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "load average": _loadavg(),
            }
            with atomic_path(self.cache / "images" / f"{key}.safetensors") as tmp:
                save_file(tensors, str(tmp))
            write_json(self.cache / "images" / f"{key}.json", record)

    def _image_metrics(self, spec: RowSpec, i: int, image: torch.Tensor, inp: torch.Tensor | None) -> dict:
        if spec.task != "denoise":
            return {}
        clean = self.images[i : i + 1]
        out = {"PSNR": float(psnr(image[None], clean)[0]), "SSIM": float(ssim(image[None], clean)[0])}
        if inp is not None and spec.protocol == "blind":
            out["input PSNR"] = float(psnr(inp[None], clean)[0])
        return out

    def load_image(self, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
        d = self.cache / "images"
        return json.loads((d / f"{key}.json").read_text()), load_file(d / f"{key}.safetensors")

    def _image_result(self, key: str) -> Result:
        """The Result of one cached image (as a part of one image), for `concat_results`."""
        rec, t = self.load_image(key)
        dip = None
        if "dip_output" in t:
            dip = DIPResult(
                t["dip_output"][None],
                t["dip_loss"][:, None],
                t["dip_psnr"][:, None] if "dip_psnr" in t else None,
                t["dip_ssim"][:, None] if "dip_ssim" in t else None,
                list(rec["ssim_iters"] or []),
                rec["dip_seconds"] or 0.0,
            )
        info = dict(rec["info"])
        info.update({k[5:]: v[None] for k, v in t.items() if k.startswith("info.")})
        return Result(
            rec["method"],
            rec["protocol"],
            t["image"][None],
            rec["seconds"],
            rec["reverse_steps"],
            rec["nfe"],
            t["input"][None] if "input" in t else None,
            dip,
            info,
        )

    def missing_images(self, spec: RowSpec) -> list[int]:
        return [i for i in range(self.row_n(spec)) if not self.image_cached(self.image_key(spec, i))]

    def parts(self, missing: list[int]) -> list[slice]:
        """The missing images in parts of at most one batch (per process), aligned on the batches of a
        whole run ([0, B), [B, 2B), ...: the same batches, hence the same outputs, as an uninterrupted run)."""
        size = self.context("linear").batch_size * (self.shard.world if self.shard is not None else 1)
        out: list[slice] = []
        for i in missing:
            last = out[-1] if out else None
            if last is not None and last.stop == i and i % size != 0:
                out[-1] = slice(last.start, i + 1)
            else:
                out.append(slice(i, i + 1))
        return out

    def finish_row(self, key: str, info: dict, spec: RowSpec) -> None:
        """Assemble a row whose images are all cached into its row entry (what the tables read)."""
        n = self.row_n(spec)
        res = concat_results([self._image_result(self.image_key(spec, i)) for i in range(n)])
        self._save(key, info, spec, res)

    def _save(self, key: str, keyinfo: dict, spec: RowSpec, res: Result) -> None:
        n = res.images.shape[0]
        clean = self.images[:n] if spec.task == "denoise" else None
        tensors = {"images": res.images}
        if res.inputs is not None:
            tensors["inputs"] = res.inputs
        if res.dip is not None:
            tensors["dip_output"] = res.dip.output
        # Own copies: safetensors refuses tensors that share memory (the DIP row's images are its DIP output).
        tensors = {k: v.detach().float().cpu().clone().contiguous() for k, v in tensors.items()}
        metrics = _json_safe(result_row(res, clean))
        if clean is not None:  # the spread over the images
            metrics["PSNR sd"] = _sd(psnr(res.images, clean))
            metrics["SSIM sd"] = _sd(ssim(res.images, clean))
        record = {
            "key": key,
            "keyed_on": keyinfo,
            "device": self.device_name,
            "metrics": metrics,
            "info": _json_safe(res.info),
            "seconds": res.seconds,
            "curves": res.dip.mean_curves() if res.dip is not None else None,
        }
        # Images first, then the JSON: a row counts as finished only when both exist.
        with atomic_path(self.cache / f"{key}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(self.cache / f"{key}.json", record)

    def load(self, key: str) -> tuple[dict, dict[str, torch.Tensor]]:
        record = json.loads((self.cache / f"{key}.json").read_text())
        return record, load_file(self.cache / f"{key}.safetensors")

    def run(self, specs: list[RowSpec], interleave: bool = False) -> None:
        """Run every image of every spec not yet cached (each distinct row once), with a progress bar.

        A row runs in parts of one batch and caches each image as its part finishes (RUN/cache/images), so
        a killed run, run again, computes only the images it had not finished; a row whose images are all
        cached is assembled into its row entry (RUN/cache/<key>.json). `interleave`: the rows advance
        together, one batch of each in turn, so that a run stopped early has the same images done in every
        row; otherwise row after row.

        Under a launcher every process runs every part on its share of the images; the main process alone
        reads the cache, decides what is left, and saves it.
        """
        todo: dict[str, tuple[RowSpec, dict, list[slice]]] = {}
        for spec in sorted(specs, key=lambda sp: sp.model):  # one model slot at a time
            key, info = self.key(spec)
            if key not in todo and not (self.main and self.cached(key)):
                todo[key] = (spec, info, self.parts(self.missing_images(spec)) if self.main else [])
        if self.shard is not None:
            todo = self.shard.broadcast(todo)  # the cache is the main process's (other machines may not see it)
        done = len({self.key(sp)[0] for sp in specs}) - len(todo)
        if done:
            self.echo(f"{done} row(s) found in {self.cache}: not recomputed")
        for spec, _, parts in todo.values():
            n, left = self.row_n(spec), sum(p.stop - p.start for p in parts)
            if left < n:
                self.echo(f"{spec.label} ({spec.model}): {n - left} of {n} images found in {self.cache}/images")
        queue = [(key, j) for key, (_, _, parts) in todo.items() for j in range(len(parts))]
        if interleave:
            queue.sort(key=lambda kj: kj[1])  # stable: part 0 of every row, then part 1, ...
        remaining = {key: len(parts) for key, (_, _, parts) in todo.items()}
        for key, (spec, info, parts) in todo.items():
            if not parts and self.main:
                self.finish_row(key, info, spec)
        total = sum(p.stop - p.start for _, _, parts in todo.values() for p in parts)
        with tqdm(total=total, desc="bench images", unit="img", disable=not (total and self.main)) as bar:
            for key, j in queue:
                spec, info, parts = todo[key]
                part = parts[j]
                self.echo(
                    f"running {spec.label} ({spec.task}, {spec.protocol}, model {spec.model}): images "
                    f"{part.start}..{part.stop - 1} of {self.row_n(spec)}"
                )
                res = self.run_row(spec, part)
                if self.main:
                    self._save_images(spec, part.start, res)
                self.computed_images += [(key, i) for i in range(part.start, part.stop)]
                bar.update(part.stop - part.start)
                remaining[key] -= 1
                if remaining[key] == 0:
                    if self.main:
                        self.finish_row(key, info, spec)
                    self.computed.append(key)

    def image_records(self, specs: list[RowSpec]) -> list[dict]:
        """One line per cached image of each distinct row: its metrics, time and when it finished."""
        out, seen = [], set()
        for spec in specs:
            key = self.key(spec)[0]
            if key in seen:
                continue
            seen.add(key)
            for i in range(self.row_n(spec)):
                k = self.image_key(spec, i)
                if not self.image_cached(k):
                    continue
                r = self.load_image(k)[0]
                load = r.get("load average")
                out.append(
                    {
                        "row": spec.label,
                        "schedule": _schedule_name(self.context(spec.model)),
                        "method": spec.method,
                        "t_trunc": r["info"].get("t_trunc"),
                        "image": i,
                        "seed": r["seed"],
                        **r["metrics"],
                        "s": round(r["seconds"], 2),
                        "finished": r["finished"],
                        "load average": " ".join(map(str, load)) if load else None,
                    }
                )
        return out

    def progress(self, specs: list[RowSpec]) -> list[dict]:
        """Per distinct row: the images finished so far (n done of N) and their metrics' mean and standard
        deviation, from the per-image cache; nothing is computed."""
        rows, seen = [], set()
        for spec in specs:
            key = self.key(spec)[0]
            if key in seen:
                continue
            seen.add(key)
            recs = [
                self.load_image(k)[0]
                for i in range(self.row_n(spec))
                if self.image_cached(k := self.image_key(spec, i))
            ]
            row: dict = {
                "row": spec.label,
                "schedule": _schedule_name(self.context(spec.model)),
                "method": spec.method,
                "protocol": spec.protocol,
                "n done": len(recs),
                "of n": self.row_n(spec),
            }
            for m in ("PSNR", "SSIM", "input PSNR"):
                vals = [r["metrics"][m] for r in recs if m in r["metrics"]]
                if vals:
                    row[m] = sum(vals) / len(vals)
                    row[f"{m} sd"] = _sd(torch.tensor(vals))
            row.update(dict(spec.report))
            if recs:
                row["reverse steps"] = max(r["reverse_steps"] for r in recs)
                row["s/img"] = sum(r["seconds"] for r in recs) / len(recs)
                row["finished (first, last)"] = (
                    f"{min(r['finished'] for r in recs)}, {max(r['finished'] for r in recs)}"
                )
            rows.append(row)
        return rows


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sd(values: torch.Tensor) -> float | None:
    """Sample standard deviation over the images (None for one image)."""
    v = values.double().flatten()
    return float(v.std(unbiased=True)) if v.numel() > 1 else None


def _image_info(info: dict, m: int, j: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Image j's share of a part's info (m images): a per-image list or tensor gives its own entry, any
    other value is the part's (`types._merge_info` joins them back)."""
    plain: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            if v.ndim and v.shape[0] == m:
                tensors[k] = v[j]
            else:
                plain[k] = v
        elif isinstance(v, list) and len(v) == m:
            plain[k] = v[j]
        else:
            plain[k] = v
    return plain, tensors


# ------------------------------------------------------------------------------------------ assembling


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


def _schedule_name(ctx: Context) -> str:
    b = ctx.scheduler.config.beta_schedule
    return {"squaredcos_cap_v2": "cosine"}.get(b, b)


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
        if bench.s.ddpm_steps < REPORT_DDPM_STEPS:
            full = base["s/img"] * REPORT_DDPM_STEPS / bench.s.ddpm_steps
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
            "schedule": _schedule_name(bench.context(slot)),
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
    if s.n < REPORT_N:
        notes.append(f"n = {s.n} images (report: {REPORT_N})")
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
    if any(sp.task == "denoise" and sp.protocol == "paper" for sp in specs) and s.t_noisy != REPORT_T_NOISY:
        notes.append(f"t_noisy = {s.t_noisy} (report: {REPORT_T_NOISY})")
    if (
        any(sp.protocol == "paper" and "t_trunc" in _entry(sp).reads for sp in specs)
        and s.paper_t_trunc != REPORT_T_TRUNC
    ):
        notes.append(f"T_trunc = {s.paper_t_trunc} (report: {REPORT_T_TRUNC})")
    if name == "table3" and tuple(s.t_truncs) != REPORT_T_TRUNCS:
        notes.append(f"T_trunc values {list(s.t_truncs)} (report: {list(REPORT_T_TRUNCS)})")
    if name == "table4":
        notes.append(
            "the DIP rows never use the DDPM, so the schedule cannot change them (same images and "
            "seeds give the same numbers; the report's 32.12 vs 34.35 dB differ nonetheless)"
        )
    if name == "table1" and s.ddpm_steps < REPORT_DDPM_STEPS:
        notes.append(
            f"DDPM shrunk to {s.ddpm_steps} strided ancestral steps (DDIM eta = 1) instead of "
            f"{REPORT_DDPM_STEPS}; speed-ups are against that row as run, plus a column extrapolated to "
            f"{REPORT_DDPM_STEPS} steps"
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


def _figures(bench: Bench, name: str, specs: list[RowSpec], extra: dict[str, RowSpec]) -> list[tuple[str, str]]:
    """Write the table's figures; return (file, caption) pairs."""
    figs: list[tuple[str, str]] = []
    k = min(bench.s.fig_images, bench.s.n)
    loaded = [(sp, *bench.load(bench.key(sp)[0])) for sp in specs]
    if name == "table1":
        rows = [bench.images[:k]] + [t["images"][:k] for _, _, t in loaded]
        comparison_figure(bench.out / "table1_samples.png", rows, max_images=k)
        figs.append(("table1_samples.png", "rows: --data images, " + ", ".join(sp.label for sp in specs)))
        grid, caps = [], []
        for sp in extra.values():
            _, t = bench.load(bench.key(sp)[0])
            grid += [t["images"][:k], t["dip_output"][:k]]
            caps.append(f"TDPM-DIP T_trunc={sp.t_trunc}, its DIP output G_psi(z)")
        if grid:
            comparison_figure(bench.out / "fig3.png", grid, max_images=k)
            figs.append(
                (
                    "fig3.png",
                    "Fig. 3 (paper protocol, reconstructs the first --data images); row pairs: " + "; ".join(caps),
                )
            )
    else:
        rows, caps = [bench.images[:k]], ["clean"]
        last_inputs = None
        for sp, _, t in loaded:
            if "inputs" in t and (last_inputs is None or not torch.equal(t["inputs"][:k], last_inputs)):
                last_inputs = t["inputs"][:k]
                rows.append(last_inputs)
                caps.append(f"noisy ({sp.model})" if name == "table4" else "noisy")
            rows.append(t["images"][:k])
            caps.append(sp.label + (f" ({sp.model})" if name == "table4" else ""))
        comparison_figure(bench.out / f"{name}_fig4.png", rows, max_images=k)
        figs.append((f"{name}_fig4.png", "Fig. 4 layout; rows: " + ", ".join(caps)))
    if bench.s.protocol == "blind" and name == "table2":
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
            figs.append(("table2_cost.png", "quality against cost: PSNR and SSIM against NFE and s/img"))
    curves = {
        sp.label + (f" ({sp.model})" if name == "table4" else ""): rec["curves"]
        for sp, rec, _ in loaded
        if rec.get("curves")
    }
    if curves:
        curves_figure(bench.out / f"{name}_dip_curves.png", curves)
        figs.append(
            (
                f"{name}_dip_curves.png",
                "DIP loss (MSE to its target) per iteration"
                + (", and PSNR of its output to the clean image" if name != "table1" else ""),
            )
        )
    return figs


TITLES = {
    "table1": "Table 1: generation from pure noise",
    "table2": "Table 2: denoising",
    "table3": "Table 3: T_trunc ablation (denoising)",
    "table4": "Table 4: linear vs cosine schedule (denoising)",
}


def write_table(
    bench: Bench, name: str, specs: list[RowSpec], extra: dict[str, RowSpec], gm: _GenMetrics | None
) -> list[dict]:
    h, notes = header(bench, name, specs)
    if name == "table1":
        assert gm is not None
        rows = _generation_rows(bench, specs, gm)
        if gm.fid_note:
            notes.append(gm.fid_note)
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
        missing = [t for t in REPORT_T_TRUNCS if t not in bench.s.generators]
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
        title = TITLES[name]
    else:
        rows = []
        for sp in specs:
            rec, _ = bench.load(bench.key(sp)[0])
            rows.append(_denoise_row(sp, rec, _schedule_name(bench.context(sp.model))))
        sub = (
            f" at t={bench.s.t_noisy} (paper protocol)"
            if bench.s.protocol == "paper"
            else f" of Gaussian noise, sigma={bench.s.sigma:g}, {bench.s.noise} (blind protocol)"
        )
        title = TITLES[name] + sub
    figs = _figures(bench, name, specs, extra)
    lines = [f"# {title}", ""]
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
    lines.append("- notes (settings shrunk or changed from the report's, caveats): " + ("none" if not notes else ""))
    lines += [f"  - {x}" for x in notes]
    lines += ["", markdown_table(rows, _columns(rows)), ""]
    lines += [f"![{f}]({f}) {c}  " for f, c in figs]
    write_text(bench.out / f"{name}.md", "\n".join(lines) + "\n")
    write_text(bench.out / f"{name}.csv", _csv(rows))
    write_json(
        bench.out / f"{name}.json",
        {"table": name, "title": title, "header": h, "notes": notes, "rows": rows, "figures": dict(figs)},
    )
    return rows


def run_bench(tables: list[str], bench: Bench, interleave: bool = False) -> dict[str, list[dict]]:
    """Run the rows of `tables` (cached images and rows are skipped), then write each table's files into
    bench.out. `interleave`: see `Bench.run`."""
    specs = {name: table_specs(name, bench.s) for name in tables}
    fig3 = "table1" in tables and (not bench.s.methods or "tdpm-dip" in bench.s.methods)
    extra = {f"fig3-{sp.t_trunc}": sp for sp in fig3_specs(bench.s)} if fig3 else {}
    for name in tables:
        for sp in specs[name]:
            if sp.model != "linear":
                bench.context(sp.model)  # fail early when --model-cosine is missing
    bench.run([sp for name in tables for sp in specs[name]] + list(extra.values()), interleave=interleave)
    if not bench.main:
        return {}  # under a launcher the main process writes the tables
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


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """A new or empty folder, or an earlier bench run (it has cache/): bench resumes into it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / "cache").is_dir() and not overwrite:
        raise UserError(f"{out}: exists, is not empty and is not a bench run (use --overwrite to write into it)")
    try:
        (out / "cache").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror or e})") from None
    return out


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UserError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"{name}: expected non-negative integers, got {text!r}")
    return vals


__all__ = [
    "Bench",
    "BenchSettings",
    "RowSpec",
    "TABLE_NAMES",
    "check_out_dir",
    "fig3_specs",
    "parse_ints",
    "run_bench",
    "table_specs",
    "write_progress",
]


# ------------------------------------------------------------------------------------------ the command


@dataclass(frozen=True, kw_only=True)
class BenchOptions(RunOptions):
    """Every option of `tdpm-dip bench` (the CLI documents each one)."""

    tables: tuple[str, ...]
    model: str
    data: str
    out: str
    model_cosine: str | None = None
    n: int = REPORT_N
    protocol: str = "paper"
    sigma: float = defaults.SIGMA
    noise: str = defaults.NOISE_MODEL
    declip: bool = True
    methods: str = ""  # comma-separated table2/table4 methods of the protocol (empty: all installed)
    t_noisy: int = REPORT_T_NOISY
    t_trunc: int | None = None
    t_truncs: str = ",".join(map(str, REPORT_T_TRUNCS))
    samples: int = defaults.SAMPLES
    ddpm_steps: int = REPORT_DDPM_STEPS
    ddim_steps: int | None = None
    fid: bool = False
    fid_weights: str | None = None
    generators: tuple[str, ...] = ()
    fig_images: int = 4
    dip_preset: str = "paper-dip"  # the report's, on any device (shrink it for CPU runs)
    interleave: bool = False  # rows advance together, one batch each in turn (Bench.run)
    reference_data: str | None = None  # table1: reference set of the distribution metrics (None: --data)
    progress_only: bool = False  # compute nothing: write RUN/progress.{md,json} (write_progress)

    def settings(self, device: torch.device) -> BenchSettings:
        """The checked settings of the run (one-line UserErrors for every bad option that needs no model)."""
        for name in ("n", "samples", "fig_images", "ddpm_steps", "ddim_steps"):
            check_positive("--" + name.replace("_", "-"), getattr(self, name))
        check_sigma(self.sigma)
        chosen = tuple(m for m in self.methods.replace(" ", "").split(",") if m)
        valid = list(dict.fromkeys(registry.names("denoise", self.protocol) + registry.names("generate")))
        unknown = [m for m in chosen if m not in valid]
        if unknown:
            raise UserError(
                f"--methods: unknown method(s) {', '.join(unknown)} for --protocol {self.protocol}; choose from "
                + ", ".join(valid)
            )
        preset = pick_dip_preset(self.dip_preset, device)
        cfgs = {use: dip_config(use, preset, self.dip_iters, self.dip_lr) for use in ("paper", "blind", "plugin")}
        return BenchSettings(
            protocol=self.protocol,
            n=self.n,
            seed=self.seed,
            sigma=self.sigma,
            noise=self.noise,
            declip=self.declip,
            methods=chosen,
            t_noisy=self.t_noisy,
            t_trunc=self.t_trunc,
            t_truncs=parse_ints(self.t_truncs, "--t-truncs"),
            samples=self.samples,
            ddpm_steps=self.ddpm_steps,
            ddim_steps=self.ddim_steps,
            fid=self.fid,
            fid_weights=self.fid_weights,
            generators=_generators_by_t_trunc(self.generators),
            reference_data=self.reference_data,
            fig_images=self.fig_images,
            dip=cfgs,
        )


def _generators_by_t_trunc(folders: tuple[str, ...]) -> dict[int, str]:
    """{T_trunc: folder} of the --generator folders (one per T_trunc)."""
    by_t: dict[int, str] = {}
    for g in folders:
        t = read_generator_info(g)["t_trunc"]
        if t in by_t:
            raise UserError(f"--generator {g} and {by_t[t]} are both for T_trunc {t}: give one per T_trunc")
        by_t[t] = g
    return by_t


def bench(opts: BenchOptions, echo: Callable[[str], None]) -> Path:
    """Run the tables' rows (cached rows are skipped) and write their files; returns the run folder."""
    names = list(TABLE_NAMES) if "all" in opts.tables else list(dict.fromkeys(opts.tables))
    if "table4" in names and opts.model_cosine is None:
        raise UserError("table4 compares schedules: it needs --model-cosine")
    settings = opts.settings(pick_device(opts.device))
    main = is_main_process()  # under a launcher: the only process that reads and writes RUN
    out_dir = check_out_dir(opts.out, opts.overwrite) if main else Path(opts.out)
    models = {"linear": opts.model, "cosine": opts.model_cosine}
    paper = settings.dip["paper"]

    def load(slot: str) -> tuple[Context, Shard | None]:
        echo(f"loading {models[slot]}")
        return load_context(
            models[slot], opts.device, opts.dtype, opts.batch_size, "paper", paper.preset, paper.iters, paper.lr
        )

    linear, shard = load("linear")
    loaded = {"linear": linear}

    def context(slot: str) -> Context:
        return loaded.pop(slot) if slot in loaded else load(slot)[0]

    def load_data(size: int, limit: int) -> torch.Tensor:
        return load_images(opts.data, size, limit=limit, progress=main).images

    b = Bench(settings, context, opts.data, load_data, out_dir, models, echo=echo, shard=shard)
    _check_levels(b.context("linear").scheduler, opts, settings)
    if opts.reference_data is not None and "table1" in names and main:
        b.reference = load_images(opts.reference_data, b.size, progress=True).images
    if opts.progress_only:
        if main:
            write_progress(names, b)
            print((out_dir / "progress.md").read_text())
        return out_dir
    run_bench(names, b, interleave=opts.interleave)
    if main:
        for name in names:
            print((out_dir / f"{name}.md").read_text())
        echo(f"tables and figures in {out_dir}")
    return out_dir


def _check_levels(scheduler: DDPMScheduler, opts: BenchOptions, s: BenchSettings) -> None:
    """The noise levels and step counts of the options against the DDPM's T (one-line UserErrors)."""
    check_level(scheduler, opts.t_noisy, "--t-noisy")
    for t in ((opts.t_trunc,) if opts.t_trunc is not None else ()) + s.t_truncs:
        check_t_trunc(scheduler, t)
    T = num_levels(scheduler)
    if opts.ddpm_steps > T or (opts.ddim_steps or 0) > T:
        raise UserError(f"--ddpm-steps / --ddim-steps must be <= {T}")

"""Running a table's rows with caching: `Bench`.

Each row runs through the registry's dispatch (`methods.run`: nothing here fits a DIP or runs a chain itself),
and its result -- metrics, timings and images -- is cached in RUN/cache/<key>.json + .safetensors, where the key
hashes everything that determines the row: the spec, the options its method reads (`registry.Method.reads`), the
model's weights, the images, n, the seeds, the DIP settings, the device and dtype. Re-running into the same RUN
skips finished rows, and tables that share a row (Table 2's rows are Table 4's linear rows) compute it once.

A row runs in parts of one batch, and each image is cached as its part finishes, in RUN/cache/images/<key>.json +
.safetensors, keyed on the row's key with the data set and n replaced by that image and its seed (image i depends
only on them). A killed run, run again, computes only the images it had not finished; a larger n adds only the new
images. `Bench.progress` reports the images done per row (mean and sd so far) without computing; `Bench.run` with
`interleave` advances the rows together, so that a run stopped early has the same images done in every row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import registry
from ..dip import DIPConfig, DIPResult
from ..errors import UserError
from ..generator import TDPMGenerator, generator_fingerprint, load_generator
from ..methods import Context, Job, Result, run
from ..methods.shard import Shard, images_per_step
from ..methods.types import concat_results
from ..metrics import data_hash, device_name, psnr, scores, ssim
from ..models import ddpm_fingerprint, unet_size
from ..noise import add_noise
from ..outputs import atomic_path, write_json
from ..reporting import result_row
from .bench_tables import BenchSettings, RowSpec

# 3: keys from the options each method reads (registry.Method.reads); images in safetensors
CACHE_VERSION = 3


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
        # What keys the cache: the device, not the thread count, which --threads 0 picks by the load average (a
        # resumed run under another load must find the images it finished).
        self.device_key = device_name(ctx.device, threads=False)
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
            "device": self.device_key,
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
                "load average": loadavg(),
            }
            with atomic_path(self.cache / "images" / f"{key}.safetensors") as tmp:
                save_file(tensors, str(tmp))
            write_json(self.cache / "images" / f"{key}.json", record)

    def _image_metrics(self, spec: RowSpec, i: int, image: torch.Tensor, inp: torch.Tensor | None) -> dict:
        if spec.task != "denoise":
            return {}
        out = scores(image, self.images[i])
        if inp is not None and spec.protocol == "blind":
            out["input PSNR"] = float(psnr(inp[None], self.images[i : i + 1])[0])
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
        size = images_per_step(self.context("linear").batch_size, self.shard)
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
                        "schedule": schedule_name(self.context(spec.model)),
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
                "schedule": schedule_name(self.context(spec.model)),
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


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none): beside every timing."""
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


def schedule_name(ctx: Context) -> str:
    """The noise schedule of a model slot's DDPM as the tables name it (linear, cosine)."""
    b = ctx.scheduler.config.beta_schedule
    return {"squaredcos_cap_v2": "cosine"}.get(b, b)


__all__ = ["CACHE_VERSION", "Bench", "schedule_name"]

"""The one list of methods. The CLI's choices and help, `bench` rows, the demo and the app read it.

Every method is a function with one signature, in the spirit of k-diffusion's samplers:

    run(ctx: methods.Context, job: methods.Job) -> methods.Result

An entry names its function as "package.module:function" (the package's own live in `tdpm_dip.methods`)
and is resolved on its first run, so this table imports nothing it lists and no network library: `tdpm-dip --help`
reads it without loading torch. A new method is one function in `methods/` plus one entry here; its callers never
change.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import defaults
from .errors import UserError

TASKS = ("denoise", "generate", "restore")
# Restoration's operators (operators.py): super-resolution and inpainting.
OPERATORS = ("sr", "inpaint")
# paper: the report's oracle protocol; blind: only the noisy image; unconditional: generation from N(0, I).
PROTOCOLS = ("paper", "blind", "unconditional")
# Inputs a method needs beyond its images and seeds; "all-levels": a DDPM trained on every noise level (a chain
# from pure noise), which a truncated diffusion model is not; "restorer": a restoration network beside the DDPM
# (its folder's restorer/, restoration_net.py).
NEEDS = ("generator", "reference", "all-levels", "restorer")
NEED_TEXT = {  # what the one-line errors say is missing
    "generator": "a generator (--generator, made by `tdpm-dip train-generator`)",
    "reference": "reference images",
    "all-levels": "a DDPM trained on every noise level",
    "restorer": "a restoration network in the DDPM's folder (MODEL/restorer, made by `tdpm-dip train-restorer`)",
}
# The Job options an entry may read (`Method.reads`): methods.types.Job's fields beyond images and seeds (a test
# keeps the two lists equal; this module imports no torch).
JOB_OPTIONS = ("t_noisy", "t_trunc", "samples", "ddim_steps", "eta", "symmetries", "declip", "sigma")
# Installed packages add methods through this entry-point group: each entry is a module (or function) whose import
# (or call) registers them with `register`, before any command builds its choices (`load_plugins`).
PLUGIN_GROUP = "tdpm_dip.plugins"


@dataclass(frozen=True)
class Method:
    """One registry entry: where its function is, where it applies, what it costs and how to explain it."""

    name: str
    task: str  # denoise | generate
    protocol: str  # paper | blind | unconditional
    entry: str  # "package.module:function", imported on the method's first run
    help: str
    nfe: str  # network evaluations per image, as a formula for the help text
    rank: int = 100  # order in --help, the app and bench tables: best measured first
    dip: str | None = None  # the DIP settings it fits with (a key of defaults.DIP); None: no DIP
    needs: tuple[str, ...] = ()  # of NEEDS: "generator" (a trained G_psi), "reference" (images to fit), ...
    reads: tuple[str, ...] = ()  # the Job options that change its result (bench keys its cache on them)
    extra: str | None = None  # optional dependency group (pip install 'tdpm-dip[extra]')
    operators: tuple[str, ...] = OPERATORS  # restoration: the operators it restores (of OPERATORS)

    @property
    def uses_dip(self) -> bool:
        return self.dip is not None

    @property
    def installed(self) -> bool:
        """Whether its optional extra (if any) is importable here."""
        return self.extra is None or importlib.util.find_spec(self.extra) is not None

    def load(self) -> Callable[[Any, Any], Any]:
        """The method's function (imports its module on first use)."""
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


_M = "tdpm_dip.methods"
_BLIND = ("declip",)  # every blind method reads the clipping-aware observation switch
_RESTORE = ("sigma", "samples", "ddim_steps")  # what the diffusion restorers read

METHODS: list[Method] = [
    # ------------------------------------------------------------------ denoising, the report's protocol
    Method(
        "ddpm",
        "denoise",
        "paper",
        f"{_M}.paper:ddpm",
        nfe="t_noisy",
        reads=("t_noisy",),
        help="the full reverse chain from x_{t_noisy}",
    ),
    Method(
        "dip",
        "denoise",
        "paper",
        f"{_M}.paper:dip",
        nfe="DIP iterations",
        dip="paper",
        reads=("t_noisy",),
        help="G_psi(z) fitted to the clean image itself (oracle; T_trunc = 0)",
    ),
    Method(
        "tdpm-dip",
        "denoise",
        "paper",
        f"{_M}.paper:tdpm_dip",
        nfe="DIP iterations + T_trunc",
        dip="paper",
        reads=("t_noisy", "t_trunc"),
        help="the report's TDPM-DIP: G_psi(z) fitted to x_T built from the clean image (oracle), then T_trunc "
        "reverse steps",
    ),
    # ------------------------------------------------------------------ denoising, blind
    # ranks: the order of PSNR at sigma 25 on 8-bit Pokemon files (docs/results.md, every blind method at sigma 25)
    Method(
        "ensemble",
        "denoise",
        "blind",
        f"{_M}.blind:ensemble",
        nfe="8 (above 256x256 px fewer; --symmetries)",
        rank=10,
        reads=_BLIND + ("symmetries",),
        help="the recommended denoiser: Tweedie's posterior mean at t*, averaged over the 8 flips and "
        "transposes of the image (over fewer on images above 256x256 px, in proportion to their pixels)",
    ),
    Method(
        "tdpm-dip",
        "denoise",
        "blind",
        f"{_M}.blind:tdpm_dip",
        nfe="ensemble's symmetries + DIP iterations + K T",
        rank=60,
        dip="plugin",
        reads=_BLIND + ("samples", "t_trunc", "symmetries"),
        help="TDPM-DIP made blind: Algorithm 2's target x_T built from the ensemble estimate instead of the "
        "clean image, then K chains of T steps from G_psi(z), averaged",
    ),
    Method(
        "tweedie",
        "denoise",
        "blind",
        f"{_M}.blind:tweedie",
        nfe="1",
        rank=20,
        reads=_BLIND,
        help="one network call at t*: Tweedie's posterior mean E[x0 | x_t*]",
    ),
    Method(
        "ddpm",
        "denoise",
        "blind",
        f"{_M}.blind:ddpm",
        nfe="K t* (--samples K)",
        rank=50,
        reads=_BLIND + ("samples",),
        help="the mean of K ancestral DDPM chains from t* (K = 1: one posterior sample)",
    ),
    Method(
        "ddim",
        "denoise",
        "blind",
        f"{_M}.blind:ddim",
        nfe=f"n (--ddim-steps, default {defaults.BLIND_DDIM_STEPS})",
        rank=30,
        reads=_BLIND + ("ddim_steps",),
        help="a deterministic DDIM chain from t* in n steps",
    ),
    Method(
        "bm3d",
        "denoise",
        "blind",
        f"{_M}.blind:bm3d",
        nfe="0 (no network)",
        rank=65,
        extra="bm3d",
        reads=_BLIND,
        help="CBM3D, the classical baseline, on the declipped observation",
    ),
    Method(
        "ffdnet",
        "denoise",
        "blind",
        f"{_M}.blind:ffdnet",
        nfe="1 (FFDNet)",
        rank=40,
        extra="ffdnet",
        reads=_BLIND,
        help="FFDNet (Zhang et al. 2018), a pretrained natural-image CNN, on the declipped "
        "observation: the external baseline (extra ffdnet, GPL-3)",
    ),
    Method(
        "dip",
        "denoise",
        "blind",
        f"{_M}.blind:dip",
        nfe="DIP iterations",
        rank=70,
        dip="blind",
        reads=_BLIND,
        help="G_psi(z) fitted to y with input noise and output averaging (Ulyanov et al.)",
    ),
    # ------------------------------------------------------------------ generation
    Method(
        "tdpm",
        "generate",
        "unconditional",
        f"{_M}.generate:tdpm",
        nfe="1 + reverse steps",
        rank=10,
        needs=("generator",),
        reads=("t_trunc",),
        help="amortized TDPM: x_T = G_psi(z), z ~ N(0, I), from a trained generator (--generator), then the DDPM's "
        "posterior steps from T_trunc to 0 (T_trunc of them, or the generator's reverse_steps); new images, no "
        "reference data",
    ),
    Method(
        "ddim",
        "generate",
        "unconditional",
        f"{_M}.generate:ddim",
        nfe="--ddim-steps",
        rank=20,
        needs=("all-levels",),
        reads=("ddim_steps", "eta"),
        help="deterministic DDIM (eta 0) from pure noise in --ddim-steps steps",
    ),
    Method(
        "ddpm",
        "generate",
        "unconditional",
        f"{_M}.generate:ddpm",
        nfe="1000 (T)",
        rank=30,
        needs=("all-levels",),
        help="ancestral sampling from pure noise, all T steps",
    ),
    Method(
        "tdpm-dip",
        "generate",
        "paper",
        f"{_M}.generate:tdpm_dip",
        nfe="DIP iterations + T_trunc",
        rank=40,
        dip="paper",
        needs=("reference",),
        reads=("t_trunc",),
        help="the report's TDPM-DIP (paper protocol): G_psi(z) fitted to reference image i noised to T_trunc, "
        "then T_trunc steps, so output i reconstructs reference image i",
    ),
    # ------------------------------------------------------------------ restoration (blind: only y, A and sigma_y)
    # ranks: the order of PSNR on 4x super-resolution and inpainting (docs/results.md, restoration)
    Method(
        "tdpm-dip",
        "restore",
        "blind",
        f"{_M}.restore:tdpm_dip",
        nfe="DIP iterations + K steps",
        rank=20,
        dip="restore",
        reads=_RESTORE + ("t_trunc",),
        help="TDPM-DIP for restoration: a DIP fitted through the operator, diffused to T_trunc, then K truncated "
        "chains with a data-consistency step after every call, averaged",
    ),
    Method(
        "ccdf-net",
        "restore",
        "blind",
        f"{_M}.restore:ccdf_net",
        nfe="1 + K steps",
        rank=5,
        needs=("restorer",),
        reads=_RESTORE + ("t_trunc",),
        help="CCDF from the restoration network's estimate (the start CCDF recommends), then the same chains",
    ),
    Method(
        "net",
        "restore",
        "blind",
        f"{_M}.restore:net",
        nfe="1",
        rank=15,
        needs=("restorer",),
        reads=("sigma",),
        help="the restoration network alone: a UNet trained to map the classical estimate to the clean image",
    ),
    Method(
        "ccdf",
        "restore",
        "blind",
        f"{_M}.restore:ccdf",
        nfe="K steps",
        rank=10,
        reads=_RESTORE + ("t_trunc",),
        help="CCDF (Chung et al. 2022): the classical estimate diffused to T_trunc, then the same chains",
    ),
    Method(
        "ddnm",
        "restore",
        "blind",
        f"{_M}.restore:ddnm",
        nfe=f"steps (--steps, default {defaults.RESTORE_FULL_STEPS}; one chain)",
        rank=30,
        needs=("all-levels",),
        reads=_RESTORE,
        help="DDNM (Wang et al. 2023): the full chain from noise, each predicted x0 projected onto the observation",
    ),
    Method(
        "diffpir",
        "restore",
        "blind",
        f"{_M}.restore:diffpir",
        nfe=f"steps (--steps, default {defaults.RESTORE_FULL_STEPS}; one chain)",
        rank=40,
        needs=("all-levels",),
        reads=_RESTORE,
        help="DiffPIR (Zhu et al. 2023): the full chain from noise with a proximal data step (for noisy y)",
    ),
    Method(
        "dip",
        "restore",
        "blind",
        f"{_M}.restore:dip",
        nfe="DIP iterations",
        rank=50,
        dip="restore",
        reads=("sigma",),
        help="Deep Image Prior (Ulyanov et al. 2018) with the operator inside its loss",
    ),
    Method(
        "tdpm-dip-nodc",
        "restore",
        "blind",
        f"{_M}.restore:tdpm_dip_nodc",
        nfe="DIP iterations + K steps",
        rank=60,
        dip="restore",
        reads=_RESTORE + ("t_trunc",),
        help="the ablation: TDPM-DIP's chains without the data-consistency step",
    ),
    Method(
        "bicubic",
        "restore",
        "blind",
        f"{_M}.restore:bicubic",
        nfe="0 (no network)",
        rank=70,
        operators=("sr",),
        help="bicubic upscaling (PIL), the classical baseline",
    ),
    Method(
        "biharmonic",
        "restore",
        "blind",
        f"{_M}.restore:biharmonic",
        nfe="0 (no network)",
        rank=70,
        operators=("inpaint",),
        help="biharmonic inpainting (scikit-image), the classical baseline",
    ),
]


def register(method: Method) -> Method:
    """Add a method from outside the package; the CLI, bench, the demo and the app list it like the others. Every
    field is checked here, not on the method's first run (its module is still imported only then)."""
    bad = problems(method)
    if bad:
        raise ValueError(f"registry entry {method.name!r}: bad " + "; bad ".join(bad))
    if any((m.task, m.protocol, m.name) == (method.task, method.protocol, method.name) for m in METHODS):
        raise ValueError(f"method {method.task}/{method.protocol}/{method.name} is registered already")
    METHODS.append(method)
    return method


def problems(method: Method) -> list[str]:
    """What is wrong with an entry: each field against the values it may take, the entry's form."""
    bad = [
        f"{what} {value!r} (one of {', '.join(allowed)})"
        for what, values, allowed in (
            ("task", (method.task,), TASKS),
            ("protocol", (method.protocol,), PROTOCOLS),
            ("needs", method.needs, NEEDS),
            ("reads", method.reads, JOB_OPTIONS),
            ("operators", method.operators, OPERATORS),
            ("dip", (method.dip,) if method.dip is not None else (), tuple(defaults.DIP)),
        )
        for value in values
        if value not in allowed
    ]
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", method.entry):
        bad.append(f'entry {method.entry!r} ("package.module:function")')
    return bad


def methods(
    task: str, protocol: str | None = None, installed_only: bool = False, operator: str | None = None
) -> list[Method]:
    """Entries of a task (optionally one protocol, or those that restore one operator), best first."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    found = [
        m
        for m in METHODS
        if m.task == task
        and (protocol is None or m.protocol == protocol)
        and (not installed_only or m.installed)
        and (operator is None or operator in m.operators)
    ]
    return sorted(found, key=lambda m: (m.rank, m.name))


def names(task: str, protocol: str | None = None) -> list[str]:
    """Method names of a task, best first, each once (a name may run under several protocols)."""
    return list(dict.fromkeys(m.name for m in methods(task, protocol)))


def protocols(task: str) -> list[str]:
    """The protocols a task's methods run under, in the order of PROTOCOLS (the CLI's --protocol choices)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    return [p for p in PROTOCOLS if any(m.task == task and m.protocol == p for m in METHODS)]


def get(task: str, protocol: str, name: str) -> Method:
    """The entry (task, protocol, name); an unknown one is a one-line UserError that lists the valid names."""
    for m in METHODS:
        if (m.task, m.protocol, m.name) == (task, protocol, name):
            return m
    others = [m.protocol for m in METHODS if m.task == task and m.name == name]
    where = f" (it runs under the {' / '.join(others)} protocol)" if others else ""
    raise UserError(
        f"unknown {task} method {name!r} for the {protocol} protocol{where}; choose {', '.join(names(task, protocol))}"
    )


def find(task: str, name: str) -> Method:
    """The entry of a method whose name is unique within its task (every generation method is)."""
    found = [m for m in METHODS if m.task == task and m.name == name]
    if len(found) != 1:
        raise UserError(f"unknown {task} method {name!r}; choose {', '.join(names(task))}")
    return found[0]


def help_text(task: str, protocol: str | None = None) -> str:
    """One line per method for --help: name, protocol, NFE, what it does."""
    return "; ".join(
        f"{m.name} ({m.protocol}; NFE {m.nfe}): {m.help}" + (f" [extra: {m.extra}]" if m.extra else "")
        for m in methods(task, protocol)
    )


def load_plugins() -> list[str]:
    """Import the installed plugins (entry points of PLUGIN_GROUP; a callable one is called), which register their
    methods; returns their names. A plugin that fails is a warning naming it, not a command that fails."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as e:  # a third party's bug must not stop every command
            warnings.warn(f"tdpm-dip plugin {ep.name} ({ep.value}) not loaded: {type(e).__name__}: {e}", stacklevel=2)
            continue
        loaded.append(ep.name)
    return loaded


load_plugins()  # here, so that every reader of the registry (the CLI's choices first) sees the plugins' methods

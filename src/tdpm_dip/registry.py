"""The one list of methods. The CLI's choices, `bench` rows, the demo and any UI read it.

Every method is a function with one signature, in the spirit of k-diffusion's samplers:

    run(ctx: tasks.Context, job: Job) -> tasks.Result

`Job` carries the images, the per-image seeds and every option a method may read, so a new
method is one function plus one `register` call, and its callers never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch stays out of `--help`
    import torch

TASKS = ("denoise", "generate")
PROTOCOLS = ("paper", "blind", "noise")  # noise: generation from pure noise (no protocol question)


@dataclass(frozen=True)
class Job:
    """What a method is asked to do. Image i uses seeds[i] only, whatever the batch.

    noisy   blind denoising: the observation y in [-1, 1] (an 8-bit file, or float noise).
    sigma   blind denoising: per-image noise std on the 0..255 scale.
    clean   paper denoising: the clean images (the oracle); blind: only scores the DIP curves.
    reference  generation under the paper protocol: the images the DIP reconstructs.
    """

    seeds: tuple[int, ...]
    noisy: torch.Tensor | None = None
    sigma: tuple[float, ...] = ()
    clean: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    t_noisy: int = 600               # paper denoising: level of the noisy images
    t_trunc: int | None = None       # TDPM: None = the protocol's default (paper 10, blind automatic)
    samples: int = 4                 # chains (or posterior samples) averaged per image
    steps: int | None = None         # ddim / strided ddpm: network evaluations
    eta: float = 0.0                 # ddim: 0 deterministic, 1 ancestral
    declip: bool = True              # blind: clipping-aware observation model (tasks.declip)


@dataclass(frozen=True)
class Method:
    """One registry entry: the function, where it applies, what it costs and how to explain it."""

    name: str
    task: str                        # denoise | generate
    protocols: tuple[str, ...]       # the protocols it runs under
    run: Callable[[Any, Job], Any]   # (Context, Job) -> Result
    help: str
    nfe: str                         # network evaluations per image, as a formula for the help text
    uses_dip: bool = False
    extra: str | None = None         # optional dependency group (pip install 'tdpm-dip[extra]')
    rank: int = 100                  # blind denoisers: best first (the app and --help list them so)


_REGISTRY: dict[tuple[str, str, str], Method] = {}


def register(name: str, task: str, protocols: tuple[str, ...], help: str, nfe: str, uses_dip: bool = False,
             extra: str | None = None, rank: int = 100) -> Callable[[Callable[[Any, Job], Any]], Callable[[Any, Job], Any]]:
    """Decorator: add `run` under (task, protocol, name) for each protocol."""
    if task not in TASKS or not set(protocols) <= set(PROTOCOLS):
        raise ValueError(f"bad registry entry {name}: task {task}, protocols {protocols}")

    def deco(run: Callable[[Any, Job], Any]) -> Callable[[Any, Job], Any]:
        m = Method(name, task, tuple(protocols), run, help, nfe, uses_dip, extra, rank)
        for p in protocols:
            key = (task, p, name)
            if key in _REGISTRY:
                raise ValueError(f"method {key} registered twice")
            _REGISTRY[key] = m
        return run

    return deco


def _load() -> None:
    from . import tasks  # noqa: F401 - registers the methods on import


def methods(task: str, protocol: str | None = None) -> list[Method]:
    """Entries of a task (optionally one protocol), best first, each once."""
    _load()
    seen: dict[str, Method] = {}
    for (t, p, n), m in _REGISTRY.items():
        if t == task and (protocol is None or p == protocol) and n not in seen:
            seen[n] = m
    return sorted(seen.values(), key=lambda m: (m.rank, m.name))


def names(task: str, protocol: str | None = None) -> list[str]:
    return [m.name for m in methods(task, protocol)]


def installed(m: Method) -> bool:
    """Whether a method's optional extra (if any) is importable here."""
    import importlib.util

    return m.extra is None or importlib.util.find_spec(m.extra) is not None


def get(task: str, protocol: str, name: str) -> Method:
    _load()
    try:
        return _REGISTRY[(task, protocol, name)]
    except KeyError:
        valid = names(task, protocol)
        others = [p for p in PROTOCOLS if (task, p, name) in _REGISTRY]
        where = f" (it runs under the {' / '.join(others)} protocol)" if others else ""
        raise UserError(f"unknown {task} method {name!r} for the {protocol} protocol{where}; "
                        f"choose {', '.join(valid)}") from None


def help_text(task: str, protocol: str | None = None) -> str:
    """One line per method for --help: name, protocols, NFE, what it does."""
    lines = []
    for m in methods(task, protocol):
        extra = f" [extra: {m.extra}]" if m.extra else ""
        lines.append(f"{m.name} ({'/'.join(m.protocols)}; NFE {m.nfe}): {m.help}{extra}")
    return "; ".join(lines)

"""The report's Tables 1-4 as data: each table is a list of `RowSpec`s (method, protocol, model, parameters)
derived from the command line's `BenchSettings` and the registry, not listed by hand.

Each row carries the report's own number beside it ("report ..." columns, from anchors.md: paper protocol,
Pokemon 64x64, n = 200, the 113.7M-parameter DDPM, one NVIDIA T4); the report's settings themselves are
`defaults` (what "shrunk" is measured against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import defaults, registry
from ..dip import DIPConfig, dip_defaults
from ..errors import UserError

REPORT_DIP = dip_defaults("paper", "paper-dip")  # the report's Algorithm 2: 100 iterations, Adam lr 1e-4
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
    selected_by: tuple[str, ...] = ()  # the --methods names that select this row instead of its method

    @property
    def selectors(self) -> tuple[str, ...]:
        """The --methods names that pick this row."""
        return self.selected_by or (self.method,)


@dataclass
class BenchSettings:
    """The command line's choices (defaults: the report's settings)."""

    protocol: str = "paper"
    n: int = defaults.N_IMAGES
    seed: int = 0
    sigma: float = defaults.SIGMA
    t_noisy: int = defaults.T_NOISY
    t_trunc: int | None = None  # None: 10 (paper) / automatic (blind)
    t_truncs: tuple[int, ...] = defaults.T_TRUNCS
    samples: int = defaults.SAMPLES
    noise: str = defaults.NOISE_MODEL  # blind: observation model of observe.add_noise
    declip: bool = True  # blind: the clipping-aware observation (observe.declip)
    blind_ddim_steps: int = defaults.BLIND_DDIM_STEPS  # blind ddim: steps from t*
    methods: tuple[str, ...] = ()  # table1/2/4: the rows' methods to run (empty: every method of the protocol)
    ddpm_steps: int = defaults.DDPM_STEPS
    ddim_steps: int | None = None  # table1: one more DDIM row at this many steps (None: none)
    fid: bool = False
    fid_weights: str | None = None
    generators: dict[int, str] = field(default_factory=dict)  # table1: T_trunc -> generator folder (tdpm rows)
    reference_data: str | None = None  # table1: the reference set of FID/KID/precision/recall/SWD (None: --data)
    fig_images: int = 4
    dip: dict[str, DIPConfig] = field(default_factory=lambda: {"paper": REPORT_DIP})

    @property
    def paper_t_trunc(self) -> int:
        return defaults.T_TRUNC if self.t_trunc is None else self.t_trunc


DENOISE_REPORT_COLUMNS = ("report PSNR", "report SSIM", "report steps", "report time (T4)")
GENERATION_REPORT_COLUMNS = (
    "report FID@1k",
    "report steps",
    "report time (T4)",
    "report speed-up (steps)",
    "report speed-up (time)",
)


def _report(columns: tuple[str, ...], v: tuple | None) -> tuple:
    """((column, value), ...) of a row's report numbers `v` (none when the report has no such row)."""
    if v is None:
        return ()
    return tuple(zip(columns, v))


def _report_denoise(v: tuple | None) -> tuple:
    return _report(DENOISE_REPORT_COLUMNS, v)


def _report_generation(v: tuple | None) -> tuple:
    return _report(GENERATION_REPORT_COLUMNS, v)


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


def _table1_ddpm_row(s: BenchSettings) -> RowSpec:
    """Table 1's DDPM row: the report's 1000 ancestral steps, or, shrunk, --ddpm-steps strided ancestral steps
    (DDIM with eta = 1)."""
    report = _report_generation(REPORT_GENERATION["ddpm"])
    if s.ddpm_steps < defaults.DDPM_STEPS:
        return RowSpec(
            f"DDPM (strided, {s.ddpm_steps} steps)",
            "generate",
            "ddim",
            "unconditional",
            steps=s.ddpm_steps,
            eta=1.0,
            report=report,
            selected_by=("ddpm",),  # DDPM's row, run by the DDIM sampler: --methods ddpm picks it, not ddim
        )
    return RowSpec("DDPM-1000", "generate", "ddpm", "unconditional", steps=defaults.DDPM_STEPS, report=report)


def _table1(s: BenchSettings) -> list[RowSpec]:
    """Generation: DDPM, DDIM, amortized TDPM per --generator, and TDPM-DIP (paper protocol)."""
    # DDIM at amortized TDPM's NFE (1 + T_trunc), at 50 steps, and at --ddim-steps when given.
    ddims = {1 + s.paper_t_trunc: "1 + T_trunc NFE", TABLE1_DDIM_STEPS: "50 NFE"}
    if s.ddim_steps:
        ddims.setdefault(s.ddim_steps, "--ddim-steps")
    rows = [_table1_ddpm_row(s)] + [
        RowSpec(f"DDIM-{k} ({why})", "generate", "ddim", "unconditional", steps=k, eta=0.0) for k, why in ddims.items()
    ]
    rows += [
        RowSpec(f"TDPM (amortized, T_trunc {t})", "generate", "tdpm", "unconditional", t_trunc=t, generator=g)
        for t, g in sorted(s.generators.items())
    ]
    rows.append(
        RowSpec(
            "TDPM-DIP (paper; reconstructs --data)",
            "generate",
            "tdpm-dip",
            "paper",
            t_trunc=s.paper_t_trunc,
            report=_report_generation(REPORT_GENERATION["tdpm-dip"]),
        )
    )
    return [r for r in rows if set(r.selectors) & set(s.methods)] if s.methods else rows


def _t_trunc_row(s: BenchSettings, t: int) -> RowSpec:
    """Table 3's row of one T_trunc: T_trunc = 0 is the DIP alone (no reverse steps after it)."""
    if t == 0:
        return RowSpec(
            "T_trunc = 0 (DIP)", "denoise", "dip", s.protocol, report=_report_denoise(REPORT_T_TRUNC_ROWS[0])
        )
    return RowSpec(
        f"T_trunc = {t}",
        "denoise",
        "tdpm-dip",
        s.protocol,
        t_trunc=t,
        report=_report_denoise(REPORT_T_TRUNC_ROWS.get(t)),
    )


def _table3(s: BenchSettings) -> list[RowSpec]:
    """The T_trunc ablation over --t-truncs (blind: plus the automatic T_trunc)."""
    rows = [_t_trunc_row(s, t) for t in s.t_truncs]
    if s.protocol == "blind":
        rows.append(RowSpec("T_trunc automatic", "denoise", "tdpm-dip", "blind", t_trunc=None))
    return rows


# Table 2 denoises with the linear-schedule DDPM; Table 4 repeats its rows with the cosine one (same cache keys).
_TABLES: dict[str, Callable[[BenchSettings], list[RowSpec]]] = {
    "table1": _table1,
    "table2": lambda s: _denoise_rows(s, "linear"),
    "table3": _table3,
    "table4": lambda s: _denoise_rows(s, "linear") + _denoise_rows(s, "cosine"),
}


def table_specs(name: str, s: BenchSettings) -> list[RowSpec]:
    """The rows of one of the report's tables under the given settings."""
    if name not in _TABLES:
        raise UserError(f"unknown table {name!r}; choose {', '.join(defaults.BENCH_TABLES)} or all")
    return _TABLES[name](s)


def fig3_specs(s: BenchSettings) -> list[RowSpec]:
    """Fig. 3: TDPM-DIP generation (paper protocol) at T_trunc 10 / 50 / 100, on the first images."""
    k = min(s.fig_images, s.n)
    return [RowSpec(f"Fig. 3 T_trunc = {t}", "generate", "tdpm-dip", "paper", t_trunc=t, n=k) for t in FIG3_T_TRUNCS]


__all__ = ["FIG3_T_TRUNCS", "REPORT_DIP", "BenchSettings", "RowSpec", "fig3_specs", "table_specs"]

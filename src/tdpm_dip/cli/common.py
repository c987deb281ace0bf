"""What every `tdpm-dip` command shares: the click group, the help texts and the option groups read from the
defaults (`defaults`) and the registry (`registry`), progress lines and the thread policy.

Plain click and data at import time, no torch: `tdpm-dip --help` renders every option from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

import click

from .. import defaults
from ..errors import UserError

_MODEL = "DDPM: a diffusers folder (unet/ + scheduler/) or a hub id. Default: "
GENERATE_MODEL_HELP = _MODEL + (
    "the shipped 32 px sprite DDPM and its amortized TDPM generator (in the package, no download)."
)
DENOISE_MODEL_HELP = _MODEL + (
    "the shipped 64 px denoiser, a DDPM fine-tuned on noisy Pokemon artwork (in the package, no download)."
)
APP_MODEL_HELP = _MODEL + (
    "the shipped models: the 64 px denoiser for the Denoise tab, the 32 px sprite DDPM and "
    "its generator for the Generate tab (Upscale and Inpaint use the denoiser). Given, it serves every tab."
)
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}
F = typing.TypeVar("F", bound=Callable)


def echo(msg: str) -> None:
    """A progress line on stderr; under a launcher only the main process speaks."""
    from ..methods.shard import is_main_process  # loaded with the command's work, never for --help

    if is_main_process():
        click.echo(msg, err=True)


# What each use of the DIP in defaults.DIP is, in --help's words.
DIP_USES = {"paper": "paper protocol", "blind": "blind dip", "plugin": "blind tdpm-dip"}


def dip_default_text(field: str) -> str:
    """The DIP defaults of defaults.DIP, rendered for --help (the table is their only home)."""
    text = ", ".join(f"{cfg[field]:g} ({DIP_USES.get(use, use)})" for use, cfg in defaults.DIP.items())
    over = [
        f"{v[field]:g} ({DIP_USES.get(use, use)}, {preset})"
        for (use, preset), v in defaults.DIP_PRESET_OVERRIDES.items()
        if field in v
    ]
    return text + (f"; {', '.join(over)}" if over else "")


# ------------------------------------------------------------------------------------------ options


DEVICE_HELP = "cpu, cuda, cuda:N, or auto (GPU if present)."
THREADS_HELP = "CPU threads; 0 = auto: all cores when the 1-minute load average is under half of them, else 1"
REFERENCE_HELP = "With --input: the clean originals (same file names), only to score PSNR/SSIM."


def out_option(help: str = "Output folder.") -> Callable[[F], F]:
    """--out, a folder, required."""
    return click.option("--out", required=True, type=click.Path(file_okay=False), help=help)


def overwrite_option(folder: str = "output folder") -> Callable[[F], F]:
    """--overwrite: write into a non-empty `folder`."""
    return click.option("--overwrite", is_flag=True, help=f"Write into an existing, non-empty {folder}.")


def first_n_option() -> Callable[[F], F]:
    """--n: only the first N images of the input."""
    return click.option("--n", "n", type=int, default=None, help="Use only the first N images.")


def local_options(f: F) -> F:
    """--device, --threads of the commands that run in one process (demo, app)."""
    f = click.option("--threads", type=int, default=0, help=THREADS_HELP + ".")(f)
    return click.option("--device", default="auto", help=DEVICE_HELP)(f)


def compute_options(f: F) -> F:
    """--device, --dtype, --batch-size, --threads, --seed, --overwrite."""
    for decorator in reversed(
        [
            click.option(
                "--device",
                default="auto",
                help=DEVICE_HELP + " Under accelerate launch / torchrun: each process's own GPU (auto or cuda), "
                "or cpu.",
            ),
            click.option(
                "--dtype",
                type=click.Choice(defaults.DTYPES),
                default="auto",
                help="Autocast dtype for networks: auto = bf16 on GPUs and on CPUs that compute bf16 natively "
                "(AVX512-BF16 or AMX), else fp32.",
            ),
            click.option(
                "--batch-size",
                type=int,
                default=defaults.BATCH_SIZE,
                help="Images processed (and DIPs fitted) at once.",
            ),
            click.option(
                "--threads",
                type=int,
                default=0,
                help=THREADS_HELP + " (threads that wait on a busy machine are many times slower than one).",
            ),
            click.option(
                "--seed",
                type=int,
                default=0,
                help="Image i uses seed SEED+i, whatever the batch size. The arithmetic still rounds differently for "
                "another batch size: the same image comes out within a grey level in fp32, a few under bf16; a chain "
                "of hundreds of steps can amplify that.",
            ),
            overwrite_option(),
        ]
    ):
        f = decorator(f)
    return f


def dip_options(f: F) -> F:
    """--dip-preset, --dip-iters, --dip-lr (their defaults come from defaults.DIP)."""
    f = click.option(
        "--dip-lr", type=float, default=None, help=f"DIP Adam learning rate. Default: {dip_default_text('lr')}."
    )(f)
    f = click.option(
        "--dip-iters", type=int, default=None, help=f"DIP iterations i_max. Default: {dip_default_text('iters')}."
    )(f)
    return click.option(
        "--dip-preset",
        default="auto",
        help="DIP network G_psi: paper-dip (the report's, 61.5M parameters), paper-dip-noattn (the same without "
        "attention), dip-small (2.5M, for a CPU), dip-tiny (for tests); auto = paper-dip on GPU, dip-small on CPU.",
    )(f)


def config_options(cls: type) -> Callable[[F], F]:
    """The fields of a config dataclass as click options (help, choices and defaults from the fields)."""
    hints = typing.get_type_hints(cls)

    def deco(f: F) -> F:
        for fld in reversed(dataclasses.fields(cls)):
            tp = hints[fld.name]
            if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            opt = "--" + fld.name.replace("_", "-")
            default = fld.default if fld.default is not dataclasses.MISSING else None
            required = fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING
            choices = fld.metadata.get("choices")
            if tp is bool:
                f = click.option(opt, is_flag=True, default=bool(default), help=fld.metadata.get("help", ""))(f)
            else:
                f = click.option(
                    opt,
                    type=click.Choice(choices) if choices else tp,
                    default=default,
                    required=required,
                    help=fld.metadata.get("help", ""),
                )(f)
        return f

    return deco


def set_threads(threads: int) -> int:
    """The one thread policy of every command (`runtime.pick_threads`), applied to torch; returns the count."""
    import torch  # deferred: --help loads no network library

    from ..runtime import pick_threads  # deferred: --help loads no network library

    n = pick_threads(threads)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------ the group


class _Command(click.Command):
    """Every command: an option given an empty value on the command line (`--input ""`, an unset shell variable)
    is one error line, not the current folder or a silent default."""

    def invoke(self, ctx: click.Context) -> typing.Any:
        for p in self.params:
            given = ctx.get_parameter_source(p.name or "") == click.core.ParameterSource.COMMANDLINE
            value = ctx.params.get(p.name or "")
            if given and isinstance(p, click.Option) and isinstance(value, str) and not value.strip():
                raise UserError(f"{p.opts[-1]} is empty: give a value or leave the option out")
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="tdpm-dip")
def cli() -> None:
    """Truncated Diffusion with a Deep Image Prior (TDPM-DIP).

    Train a DDPM (Algorithm 1), fit a Deep Image Prior as the generator of a truncated chain
    (Algorithm 2), sample and denoise with it (Algorithm 3), and regenerate the report's tables.

    \b
    Protocols (every printed number says which one produced it):
      paper  the report's: the DIP target is built from the CLEAN image (an oracle); its
             "denoising" never looks at the noisy image and its "generation" reconstructs
             the reference images it is given.
      blind  an honest denoiser: only the noisy observation (and its noise level) is used.
    \b
    Words the commands use:
      t, level   a noise level of the DDPM, 1..T (T = 1000): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z
      T_trunc    the level a truncated chain starts from (Algorithm 3 runs T_trunc steps down to 0)
      G_psi      the generator of x_T_trunc: a DIP fitted per image, or TDPM's trained generator
      t*         the level whose noise matches a noisy image's sigma (blind denoising starts there)
      NFE        network function evaluations: calls of the DDPM (or DIP iterations) per image
    """

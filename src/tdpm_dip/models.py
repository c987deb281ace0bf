"""Build UNets from presets and load / save DDPMs in diffusers layout (safetensors only)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import logging as diffusers_logging

from .config import STYLE_PRESETS, UNetPreset, get_preset
from .data import is_hub_id
from .errors import UserError
from .outputs import ordinary_modes


def build_unet(preset: UNetPreset | str, seed: int | None = None, sample_size: int | None = None) -> UNet2DModel:
    """A freshly initialised `UNet2DModel`; `seed` makes the initial weights reproducible."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    if seed is None:
        return UNet2DModel(**preset.unet_kwargs(sample_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**preset.unet_kwargs(sample_size))


def unet_size(config: Mapping) -> int:
    """Image side of a `UNet2DModel` from its config (`unet.config` or a parsed config.json). diffusers
    allows an int or an (h, w) pair for `sample_size`; this project's models are square."""
    s = config["sample_size"]
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def ddpm_fingerprint(unet: UNet2DModel, scheduler: DDPMScheduler) -> str:
    """Hash of a DDPM's weights (as fp32) and scheduler configuration: keys bench rows and distillation
    pairs, and ties a generator to the DDPM it was trained for."""
    return weights_fingerprint(unet, json.dumps(dict(scheduler.config), sort_keys=True, default=str))


def weights_fingerprint(net: torch.nn.Module, salt: str = "") -> str:
    """Hash of a network's weights (as fp32), after `salt`: what keys cached results of the network."""
    h = hashlib.sha1(salt.encode())
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None


def _check_unet(unet: UNet2DModel, where: str) -> UNet2DModel:
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise UserError(
            f"{where}: the UNet has {unet.config.in_channels} input / {unet.config.out_channels} "
            "output channels; tdpm-dip needs an RGB noise predictor (3 / 3)"
        )
    return unet


def _check_scheduler_config(cfg: dict, where: str) -> None:
    needed = ("num_train_timesteps", "beta_schedule")
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise UserError(f"{where}: scheduler config lacks {', '.join(missing)}: not a DDPM-compatible scheduler")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"{where}: prediction_type {cfg['prediction_type']!r} is not supported (need 'epsilon')")
    known = ("linear", "squaredcos_cap_v2", "scaled_linear")
    if cfg["beta_schedule"] not in known and cfg.get("trained_betas") is None:
        raise UserError(f"{where}: beta_schedule {cfg['beta_schedule']!r} is not DDPM-compatible")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


_Net = TypeVar("_Net", bound=ModelMixin)


def load_weights(
    cls: type[_Net], folder: str | os.PathLike, where: str, network: str, dtype: torch.dtype = torch.float32
) -> _Net:
    """`cls.from_pretrained(folder)` from safetensors only, every failure one UserError line that starts with
    `where`: an unreadable file, or one that lacks some of the network's tensors (diffusers leaves those on the
    meta device, without data, after a screen of warnings: refused here, not with a traceback later)."""
    try:
        with _quiet_diffusers():  # its list of missing weights: one line below says it
            net = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: cannot load the {network} weights ({str(e).splitlines()[0]})") from None
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"{where}: cannot load the {network} weights (the file lacks {', '.join(missing[:3])}{more}): "
            f"not this {network}'s weights"
        )
    return net


def load_ddpm(
    model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a noise predictor and its DDPM scheduler.

    `model` is a local folder in diffusers layout (`unet/` + `scheduler/`, e.g. a `DDPMPipeline`
    export) or a hub id (needs the network unless cached). Weights are read from safetensors only.
    """
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: a model must be a folder in diffusers layout (unet/ + scheduler/)")
        unet_dir, sched_dir = path / "unet", path / "scheduler"
        if not (unet_dir / "config.json").is_file():
            raise UserError(f"{path}: no unet/config.json: not a diffusers DDPM folder")
        ucfg = _read_json(unet_dir / "config.json")
        if ucfg.get("_class_name") != "UNet2DModel":
            raise UserError(f"{path}: unet/ holds a {ucfg.get('_class_name')!r}, not a UNet2DModel")
        if not (sched_dir / "scheduler_config.json").is_file():
            raise UserError(f"{path}: no scheduler/scheduler_config.json")
        _check_scheduler_config(_read_json(sched_dir / "scheduler_config.json"), str(path))
        unet = load_weights(UNet2DModel, unet_dir, str(path), "UNet", dtype)
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
    else:
        if not is_hub_id(model):
            raise UserError(f"{model}: no such model folder (and not a hub id of the form owner/name)")
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                unet = UNet2DModel.from_pretrained(
                    str(model), subfolder="unet", torch_dtype=dtype, use_safetensors=True
                )
                scheduler = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
        except Exception as e:  # hub errors come in many types (offline, 404, no safetensors)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{model}: cannot load from the hub ({msg}); are you online? A local diffusers folder works offline"
            ) from None
        _check_scheduler_config(dict(scheduler.config), str(model))
    _check_unet(unet, str(model))
    return unet.to(device).eval(), scheduler


LEVELS_FILE = "trained_levels.json"


def save_ddpm(
    unet: UNet2DModel, scheduler: DDPMScheduler, out: str | os.PathLike, levels: tuple[int, int] | None = None
) -> None:
    """Write a `DDPMPipeline` folder (model_index.json, unet/, scheduler/) that diffusers loads; with `levels`,
    also trained_levels.json: the noise levels (lo, hi) the network was trained on."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    ordinary_modes(out)
    if levels is not None:
        (Path(out) / LEVELS_FILE).write_text(json.dumps({"levels": list(levels)}) + "\n")


def trained_levels(model: str | os.PathLike, scheduler: DDPMScheduler) -> tuple[int, int]:
    """The noise levels (lo, hi) a DDPM folder's network was trained on: its trained_levels.json, else all
    1..T (a hub model, or a folder without the file). A truncated diffusion model (hi < T, Zheng et al. 2023)
    cannot start a chain from pure noise."""
    path = Path(model) / LEVELS_FILE
    T = int(scheduler.config.num_train_timesteps)
    if not path.is_file():
        return 1, T
    try:
        lo, hi = (int(v) for v in json.loads(path.read_text())["levels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{model}: unreadable {LEVELS_FILE} ({type(e).__name__}: {e})") from None
    if not 1 <= lo <= hi <= T:
        raise UserError(f"{model}: {LEVELS_FILE} says levels {lo}..{hi}, outside 1..{T}")
    return lo, hi


# ---------------------------------------------------------------- a generator made for GANs


class _StyleBlock(torch.nn.Module):
    """conv3x3 -> + per-channel scaled noise -> LeakyReLU -> instance norm -> AdaIN style (StyleGAN's layer)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.noise = torch.nn.Conv2d(3, c_out, 1, bias=False)  # z_img's 3 channels, mixed per output channel
        torch.nn.init.zeros_(self.noise.weight)
        self.style = torch.nn.Linear(w_dim, 2 * c_out)
        torch.nn.init.zeros_(self.style.weight)
        torch.nn.init.zeros_(self.style.bias)  # starts as the identity: scale 1 + 0, shift 0

    def forward(self, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x + self.noise(F.interpolate(z, size=x.shape[-2:], mode="area"))
        x = F.instance_norm(F.leaky_relu(x, 0.2))
        scale, shift = self.style(w)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + scale) + shift


class StyleGenerator(ModelMixin, ConfigMixin):
    """G_psi(z_img, w) made for GANs (StyleGAN-lite, Karras et al. 2019): a mapping MLP turns w into a style, a
    learned 4x4 constant (plus, with latent_input, a projection of w, as DCGAN's input) grows to the image size
    through blocks of two styled convolutions (x2 upsampling between them), and the image-shaped noise z_img,
    resized to each block, is its per-pixel noise input.
    Called as a UNet generator is, `net(z_img, 0, class_labels=w).sample`, so the TDPM code takes either."""

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, ...] = (128, 128, 64, 32),
        w_dim: int = 64,
        mapping_layers: int = 2,
        sample_size: int = 32,
        out_channels: int = 3,
        latent_input: bool = False,
    ) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for _ in range(mapping_layers):
            layers += [torch.nn.Linear(w_dim, w_dim), torch.nn.LeakyReLU(0.2)]
        self.mapping = torch.nn.Sequential(*layers)
        self.const = torch.nn.Parameter(torch.randn(1, channels[0], 4, 4))
        # latent_input: the 4x4 input is projected from the mapped w (DCGAN), added to the constant
        self.project = torch.nn.Linear(w_dim, channels[0] * 16) if latent_input else None
        self.blocks = torch.nn.ModuleList()
        c_prev = channels[0]
        for c in channels:
            self.blocks.append(torch.nn.ModuleList([_StyleBlock(c_prev, c, w_dim), _StyleBlock(c, c, w_dim)]))
            c_prev = c
        self.to_rgb = torch.nn.Conv2d(c_prev, out_channels, 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: object = 0,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        if class_labels is None:
            raise ValueError("StyleGenerator needs its style vector w (class_labels)")
        w = self.mapping(class_labels.to(self.const.dtype))
        x = self.const.expand(sample.shape[0], -1, -1, -1)
        if self.project is not None:
            x = x + self.project(w).view(-1, *self.const.shape[1:])
        for i, block in enumerate(self.blocks):
            assert isinstance(block, torch.nn.ModuleList)  # a ModuleList yields Modules: each block is a pair
            first, second = block
            if i:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = second(first(x, sample, w), sample, w)
        out = self.to_rgb(x)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def build_generator_network(
    preset: str, seed: int | None = None, sample_size: int | None = None
) -> UNet2DModel | StyleGenerator:
    """G_psi of a preset: a `StyleGenerator` (config.STYLE_PRESETS) or a UNet generator (config.PRESETS)."""
    if preset not in STYLE_PRESETS:
        return build_unet(preset, seed=seed, sample_size=sample_size)
    kwargs = STYLE_PRESETS[preset].model_kwargs()
    if sample_size is not None and sample_size != kwargs["sample_size"]:
        raise UserError(f"preset {preset!r} makes {kwargs['sample_size']} px images, the DDPM {sample_size} px")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return StyleGenerator(**kwargs)

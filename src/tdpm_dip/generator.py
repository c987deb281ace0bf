"""TDPM's amortized generator G_psi for the truncated chain (Zheng et al., ICLR 2023).

A truncated diffusion model starts its reverse chain at level T_trunc from a sample of q(x_T_trunc),
the training images noised to T_trunc. TDPM draws that sample from an implicit generator
x_T = G_psi(z), z ~ N(0, I), so a new image costs 1 + T_trunc network calls. G_psi here is a small
network called at timestep 0 on z = (z_img, w): z_img of the image's shape, and a style vector w ~ N(0, I).
Both come from the image's seed, z_img first. The network is a `UNet2DModel` whose class embedding feeds w to
every ResNet block (preset `generator-small`), or a `models.StyleGenerator` made for GANs (presets `style-*`),
which reads z_img as its per-pixel noise. `training/generator.py` trains it.

A generator folder (RUN/generator) holds the `UNet2DModel` (save_pretrained, safetensors, so diffusers
loads it) and generator.json {t_trunc, z_shape, w_dim, objective, ddpm, ddpm_fingerprint, image_size, ...}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .errors import UserError, check_reverse_steps
from .models import StyleGenerator, ddpm_fingerprint, load_weights, unet_size
from .noise import num_levels, q_sample, randn
from .sampling import EpsModel, reverse_chain

GENERATOR_JSON = "generator.json"
FORMAT = "tdpm-dip generator"


def style_dim(config: Mapping) -> int:
    """Width of G_psi's style vector w: a StyleGenerator's w_dim; for a UNet, the time-embedding width when it
    takes class_labels through an identity class embedding (preset generator-small), else 0 (z_img alone)."""
    if "w_dim" in config:
        return int(config["w_dim"])
    if config.get("class_embed_type") != "identity":
        return 0
    return int(config.get("time_embedding_dim") or 4 * config["block_out_channels"][0])


def draw_latents(
    z_shape: tuple[int, ...], w_dim: int, generators: list[torch.Generator], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z_img [B, *z_shape], w [B, w_dim] or None): row i from generators[i], z_img first, then w."""
    z = randn(tuple(z_shape), generators, device)
    w = randn((w_dim,), generators, device) if w_dim else None
    return z, w


def g_forward(net: torch.nn.Module, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """x_T = G_psi(z, w): the generator UNet at timestep 0 (its time embedding is a constant, to which the
    identity class embedding adds w)."""
    return net(z, 0, class_labels=w).sample


@dataclass(frozen=True)
class TDPMGenerator:
    """A trained G_psi and what it was trained for (read from generator.json by `load_generator`)."""

    unet: UNet2DModel
    t_trunc: int
    z_shape: tuple[int, int, int]
    info: dict
    path: str

    @property
    def w_dim(self) -> int:
        return style_dim(self.unet.config)

    def draw(
        self, generators: list[torch.Generator], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This generator's (z_img, w) of each image (`draw_latents`)."""
        return draw_latents(self.z_shape, self.w_dim, generators, device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return g_forward(self.unet, z.to(self.unet.dtype), None if w is None else w.to(self.unet.dtype)).float()

    @property
    def reverse_steps(self) -> int:
        """DDPM steps from T_trunc to 0: generator.json's reverse_steps, else T_trunc (Algorithm 3)."""
        return int(self.info.get("reverse_steps") or self.t_trunc)

    @property
    def predicts_x0(self) -> bool:
        """Whether the network makes a clean image, to which the forward noise of level T_trunc is added (else it
        makes x_T itself)."""
        return self.info.get("predict", "x_T") == "x0"

    @torch.no_grad()
    def x_t(self, model: EpsModel, generators: list[torch.Generator]) -> torch.Tensor:
        """x_T = G_psi(z): the network's output, or (predict x0) sqrt(abar_T) G(z) + sqrt(1 - abar_T) eps with eps
        drawn from image i's generator after z_img and w (Eq. 3)."""
        device = generators[0].device
        z, w = self.draw(generators, device)
        out = self(z, w)
        if not self.predicts_x0:
            return out
        return q_sample(model.scheduler, out, self.t_trunc, randn(self.z_shape, generators, device))

    @torch.no_grad()
    def sample(
        self, model: EpsModel, generators: list[torch.Generator], callback: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Amortized TDPM (Zheng et al. 2023): x_T = G_psi(z) (`x_t`), then the DDPM `model`'s posterior steps
        from T_trunc to 0 (`sampling.reverse_chain`: Algorithm 3's T_trunc steps, or `reverse_steps` strided ones),
        clamped to [-1, 1]."""
        x_t = self.x_t(model, generators)
        return reverse_chain(model, x_t, self.t_trunc, generators, callback, self.reverse_steps).clamp(-1, 1)


def read_generator_info(path: str | os.PathLike) -> dict:
    """generator.json of a generator folder (one-line UserError when it is not one)."""
    p = Path(path)
    if not p.is_dir():
        what = "no such folder" if not p.exists() else f"not a folder (a generator is the folder of {GENERATOR_JSON})"
        raise UserError(f"--generator {p}: {what}")
    meta_path = p / GENERATOR_JSON
    if not meta_path.is_file():
        hint = " (it looks like a DDPM folder; pass it as --model)" if (p / "unet" / "config.json").is_file() else ""
        raise UserError(
            f"--generator {p}: not a generator folder: no {GENERATOR_JSON}{hint}; "
            "make one with `tdpm-dip train-generator`"
        )
    try:
        info = json.loads(meta_path.read_text())
        info["t_trunc"], info["image_size"] = int(info["t_trunc"]), int(info["image_size"])
        info["z_shape"] = [int(v) for v in info["z_shape"]]
        info["reverse_steps"] = int(info.get("reverse_steps") or info["t_trunc"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--generator {p}: unreadable {GENERATOR_JSON} ({type(e).__name__}: {e})") from None
    if info["t_trunc"]:  # T_trunc 0: no chain, reverse_steps 0
        check_reverse_steps(info["reverse_steps"], info["t_trunc"], f"--generator {p}: reverse_steps")
    if len(info["z_shape"]) != 3:
        raise UserError(f"--generator {p}: z_shape must be [channels, height, width], got {info['z_shape']}")
    return info


def generator_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a generator folder's files (weights, UNet config and generator.json): keys bench rows."""
    h = hashlib.sha1()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _class_name(folder: Path) -> str | None:
    """The network class a generator folder's config.json names (diffusers' `_class_name`)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _check_pairing(p: Path, info: dict, ddpm: UNet2DModel | None, scheduler: DDPMScheduler | None) -> None:
    """A generator makes x_T_trunc of one noise schedule: another schedule's chain would start from the wrong noise
    level. A distilled one imitates one DDPM's chain (its fingerprint); a GAN's target (training images noised to
    T_trunc) involves the schedule only, so it may serve another DDPM of that schedule and size."""
    made_for = info.get("schedule")
    if scheduler is not None and made_for is not None and made_for != scheduler.config.beta_schedule:
        raise UserError(
            f"--generator {p} was trained for the {made_for} noise schedule, but the DDPM's is "
            f"{scheduler.config.beta_schedule}: train a generator for this DDPM"
        )
    fp = info.get("ddpm_fingerprint")
    if info.get("objective") == "distill" and ddpm is not None and scheduler is not None and fp is not None:
        if ddpm_fingerprint(ddpm, scheduler) != fp:
            raise UserError(
                f"--generator {p} was distilled from another DDPM ({info.get('ddpm', 'unknown')}): it imitates that "
                "DDPM's chain only; train one for this DDPM"
            )


def load_generator(
    path: str | os.PathLike,
    ddpm: UNet2DModel | None = None,
    scheduler: DDPMScheduler | None = None,
    device: torch.device | str = "cpu",
) -> TDPMGenerator:
    """Load RUN/generator (or any folder with generator.json and a UNet2DModel); with the DDPM given, check
    that its image size and T_trunc fit that DDPM. Every problem is a one-line UserError."""
    p = Path(path)
    info = read_generator_info(p)
    t_trunc, z_shape, image_size = info["t_trunc"], tuple(info["z_shape"]), info["image_size"]
    if ddpm is not None and image_size != unet_size(ddpm.config):
        raise UserError(
            f"--generator {p} makes {image_size} px images, but the DDPM makes "
            f"{unet_size(ddpm.config)} px: "
            "train a generator for this DDPM"
        )
    if scheduler is not None and not 0 <= t_trunc < num_levels(scheduler):
        raise UserError(
            f"--generator {p}: its T_trunc {t_trunc} is outside the DDPM's levels 0..{num_levels(scheduler) - 1}"
        )
    _check_pairing(p, info, ddpm, scheduler)
    cls = StyleGenerator if _class_name(p) == "StyleGenerator" else UNet2DModel
    unet = load_weights(cls, p, f"--generator {p}", "generator")  # fp16 on disk: upcast to fp32
    if info.get("w_dim", style_dim(unet.config)) != style_dim(unet.config):
        raise UserError(
            f"--generator {p}: {GENERATOR_JSON} says w_dim {info['w_dim']}, but its UNet takes {style_dim(unet.config)}"
        )
    return TDPMGenerator(unet.to(device).eval().requires_grad_(False), t_trunc, z_shape, info, str(p))

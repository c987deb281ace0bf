"""The restoration network: a feed-forward estimate of x0 from an observation, the "better start" of CCDF.

CCDF (Chung, Sim and Ye, CVPR 2022, Sec. 3.3) shows that the closer the start estimate is to x0, the lower the
level t0 the reverse chain must start from; its best starts come from a network trained for the task. Here that
network is a small `UNet2DModel` R called at timestep 0 on five channels:

    the classical estimate (3: bicubic upscaling or biharmonic inpainting, `Operator.classical`),
    the share of each pixel the observation measures (1: `Operator.density`: the mask, or 1 / scale^2),
    the observation's noise std on the [-1, 1] scale (1, constant),

and it predicts the residual: x0_hat = classical + R(...). One network serves super-resolution and inpainting at
any mask and noise level it was trained on (`training/restorer.py` trains it on clean images alone).

A DDPM folder may hold one in `restorer/` (a diffusers UNet2DModel folder, safetensors, beside restorer.json);
`load_restorer` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import UNet2DModel

from .devices import autocast
from .errors import UserError
from .models import load_weights
from .operators import Operator
from .outputs import ordinary_modes

RESTORER_DIR = "restorer"
RESTORER_JSON = "restorer.json"
FORMAT = "tdpm-dip restorer"
IN_CHANNELS = 5  # classical estimate (3), measured share (1), noise std (1)


def inputs(estimate: torch.Tensor, op: Operator, sigma_y: float) -> torch.Tensor:
    """The network's input [B, 5, H, W] for a classical estimate of observations of `op` with noise std sigma_y
    (on the [-1, 1] scale)."""
    b, _, h, w = estimate.shape
    density = op.density(h, w).to(estimate.device, estimate.dtype).expand(b, 1, h, w)
    return torch.cat([estimate, density, torch.full_like(density, sigma_y)], dim=1)


def estimate(
    net: UNet2DModel, start: torch.Tensor, op: Operator, sigma_y: float, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x0_hat = start + R(start, density, sigma_y), clamped to [-1, 1]: one network call per image."""
    with torch.no_grad(), autocast(start.device, amp_dtype):
        out = net(inputs(start, op, sigma_y).to(net.dtype), 0).sample.float()
    return (start + out).clamp(-1, 1)


def save_restorer(net: UNet2DModel, out: str | os.PathLike, record: dict) -> None:
    """Write a restorer folder: the UNet (safetensors, diffusers layout) and restorer.json (`record`: how it was
    trained)."""
    net.save_pretrained(out, safe_serialization=True)
    (Path(out) / RESTORER_JSON).write_text(json.dumps({"format": FORMAT} | record, indent=1) + "\n")
    ordinary_modes(out)


def load_restorer(folder: str | os.PathLike, device: torch.device | str = "cpu") -> UNet2DModel:
    """A restorer folder (`save_restorer`), checked: one error line for what is not one."""
    path = Path(folder)
    try:
        record = json.loads((path / RESTORER_JSON).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a restorer folder (no readable {RESTORER_JSON}: {type(e).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path}: {RESTORER_JSON} is not a {FORMAT!r} record")
    net = load_weights(UNet2DModel, path, str(path), "restorer")  # fp16 on disk: upcast
    if net.config.in_channels != IN_CHANNELS or net.config.out_channels != 3:
        raise UserError(f"{path}: the restorer takes {IN_CHANNELS} channels and returns 3")
    return net.to(device).eval()


def model_restorer(model: str | os.PathLike, device: torch.device | str = "cpu") -> UNet2DModel | None:
    """The restorer a DDPM folder holds in restorer/, or None (a hub model, or a folder without one)."""
    folder = Path(model) / RESTORER_DIR
    return load_restorer(folder, device) if folder.is_dir() else None

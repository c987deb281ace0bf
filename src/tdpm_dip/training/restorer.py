"""Train the restoration network (`restoration_net`): clean images only, the observations made here.

Each training image is degraded `repeats` times, each time by one operator drawn at random: PIL-bicubic
downscaling by 2 or 4, or a mask (a share of 50 to 95 % of the pixels missing at random, the centred box, a random
rectangle, or a random half), with Gaussian noise of std 0..15 (0..255 scale) on a third of them, rounded to 8 bits
as files are. The network learns x0 from (classical estimate, measured share, noise std) by MSE, the posterior
mean that PSNR rewards, with horizontal flips; AdamW with a one-cycle learning rate.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from ..data import load_images
from ..errors import UserError
from ..noise import to_8bit
from ..operators import Downsample, Inpaint, Operator, make_mask
from ..restoration_net import IN_CHANNELS, inputs, save_restorer
from .options import RestorerConfig

NOISY_SHARE = 1 / 3  # observations with noise
MAX_SIGMA = 15.0  # their noise std, drawn uniformly up to this (0..255 scale)
MASKS = ("random", "box", "rect", "half")
KINDS = ("sr2", "sr4", *MASKS)


def build_restorer(widths: tuple[int, ...], size: int, seed: int) -> UNet2DModel:
    """The restorer's UNet: plain ResNet blocks (no attention: it runs at any image size), 5 inputs, 3 outputs,
    initialised from `seed`, its last layer at zero so that it starts as the classical estimate."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet2DModel(
            sample_size=size,
            in_channels=IN_CHANNELS,
            out_channels=3,
            block_out_channels=widths,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths),
            norm_num_groups=8,
            add_attention=False,
        )
    torch.nn.init.zeros_(net.conv_out.weight)
    torch.nn.init.zeros_(net.conv_out.bias)
    return net


def _mask(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """[1, 1, size, size], 1 = known, of a mask kind of MASKS."""
    if kind == "box":
        return make_mask("box", size, size, 0)[None]
    m = torch.ones(1, 1, size, size)
    if kind == "random":
        p = 0.5 + 0.45 * float(torch.rand((), generator=g))
        return (torch.rand(1, 1, size, size, generator=g) >= p).float()
    if kind == "rect":
        h, w = (int(v) for v in torch.randint(size // 8, size // 2 + 1, (2,), generator=g))
        top, left = (int(v) for v in torch.randint(0, size - max(h, w) + 1, (2,), generator=g))
        m[..., top : top + h, left : left + w] = 0
        return m
    side = int(torch.randint(0, 4, (), generator=g))  # half: right, left, bottom, top
    half = size // 2
    idx = [(..., slice(half, None)), (..., slice(None, half)), (..., slice(half, None), slice(None)),
           (..., slice(None, half), slice(None))][side]  # fmt: skip
    m[idx] = 0
    return m


def observe(x: torch.Tensor, kind: str, g: torch.Generator) -> tuple[torch.Tensor, Operator, float]:
    """(8-bit observation y, its operator, sigma_y on the [-1, 1] scale) of one image x [1, 3, H, W]."""
    size = x.shape[-1]
    op: Operator = Downsample(int(kind[2]), size, size) if kind.startswith("sr") else Inpaint(_mask(kind, size, g))
    y = op.A(x)
    sigma = 0.0
    if float(torch.rand((), generator=g)) < NOISY_SHARE:
        sigma = 2.0 * MAX_SIGMA / 255.0 * float(torch.rand((), generator=g))
        y = y + sigma * torch.randn(y.shape, generator=g)
    y = to_8bit(y)  # stored in 8 bits (noise.add_noise's file model; the noise drawn from g, with the mask)
    if isinstance(op, Inpaint):
        y = op.A(y)  # a missing pixel holds no noise: it is not there
    return y, op, sigma


def make_pool(images: torch.Tensor, repeats: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, ...]:
    """(network inputs [N, 5, H, W], whose first 3 channels are the classical estimates; targets [N, 3, H, W]) of
    `repeats` observations of each image; observation r of image i draws from seed + r * len(images) + i."""
    xs, targets = [], []
    n = images.shape[0]
    for r in tqdm(range(repeats), desc="observations", disable=not progress):
        for i in range(n):
            g = torch.Generator().manual_seed(seed + r * n + i)
            kind = KINDS[int(torch.randint(0, len(KINDS), (), generator=g))]
            y, op, sigma = observe(images[i : i + 1], kind, g)
            xs.append(inputs(op.classical(y), op, sigma))
            targets.append(images[i : i + 1])
    return torch.cat(xs), torch.cat(targets)


def train_restorer(cfg: RestorerConfig, progress: bool = True) -> Path:
    """Fit the restorer (module docstring) and write it to cfg.out; returns that folder."""
    cfg.check()
    started = time.time()
    images = load_images(cfg.data, cfg.size, cfg.fill, limit=cfg.limit, progress=progress).images.float()
    if images.shape[0] == 0:
        raise UserError(f"{cfg.data}: no images")
    xs, targets = make_pool(images, cfg.repeats, cfg.seed, progress)
    net = build_restorer(cfg.widths(), cfg.size, cfg.seed).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps + 1, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train-restorer", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, xs.shape[0], (cfg.batch_size,), generator=g)
        x, target = xs[idx], targets[idx]
        if float(torch.rand((), generator=g)) < 0.5:  # a horizontal flip: of the image, its mask and its start
            x, target = x.flip(-1), target.flip(-1)
        loss = torch.nn.functional.mse_loss(x[:, :3] + net(x, 0).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    record = asdict(cfg) | {
        "images": int(images.shape[0]),
        "kinds": list(KINDS),
        "max_sigma": MAX_SIGMA,
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "minutes": round((time.time() - started) / 60, 1),
    }
    save_restorer(net.eval(), cfg.out, record)
    return Path(cfg.out)

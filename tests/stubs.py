"""Stub noise predictors whose outputs are known by hand (imported as a plain module: pytest puts tests/ on
sys.path). `StubUNet` stands in for a diffusers UNet2DModel wherever a method calls one: eps = coef(timestep) x,
pixel by pixel."""

from __future__ import annotations

from types import SimpleNamespace

import torch

SIZE = 16


class StubConfig(dict):
    """A dict that also reads as attributes, as diffusers' FrozenDict does (`config["sample_size"]`,
    `config.block_out_channels`)."""

    def __getattr__(self, key: str) -> object:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class StubUNet(torch.nn.Module):
    """eps = (base + per_step * (timestep + 1)) * x. Records the timesteps it is called at and the shapes it sees.
    Two levels (block_out_channels), so methods pad images to even sides (plus what the DIP presets need)."""

    def __init__(self, base: float = 0.0, per_step: float = 0.0, sample_size: int = SIZE) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.config = StubConfig(sample_size=sample_size, block_out_channels=(16, 32))
        self.base, self.per_step = base, per_step
        self.timesteps: list[int] = []
        self.shapes: list[tuple[int, ...]] = []

    def coef(self, timestep: int) -> float:
        return self.base + self.per_step * (timestep + 1)

    def forward(self, x: torch.Tensor, timestep: int | torch.Tensor, class_labels: object = None) -> SimpleNamespace:
        ts = int(timestep)
        self.timesteps.append(ts)
        self.shapes.append(tuple(x.shape))
        return SimpleNamespace(sample=self.coef(ts) * x)


def eps_zero() -> StubUNet:
    """The identity denoiser: eps = 0, so Tweedie's estimate of y is y."""
    return StubUNet()


def eps_linear(per_step: float = 0.02) -> StubUNet:
    """eps = per_step * (timestep + 1) * x: a call one timestep off changes eps by per_step * x."""
    return StubUNet(per_step=per_step)

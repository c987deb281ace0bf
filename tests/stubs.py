"""Networks for the tests (imported as a plain module: pytest puts tests/ on sys.path): a tiny real diffusers
UNet2DModel where a test only needs "a UNet", and stand-ins whose outputs are known by hand where a test compares
a method with a closed form (tests/by_hand.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import UNet2DModel

from tdpm_dip.dip import DIPResult

SIZE = 16


def tiny_unet(levels: int = 2, sample_size: int = SIZE, zero: bool = False, seed: int = 0) -> UNet2DModel:
    """A real UNet2DModel, as small as diffusers builds one: 8 channels at the first level and 16 below it (8 at
    each of more levels), one ResNet per block, no attention; seeded weights. It needs sides that are multiples of
    2^(levels - 1), as every DDPM does, so a method that pads wrongly fails here.

    zero=True zeroes its output convolution: then eps = 0 exactly whatever x and the timestep (the identity
    denoiser: Tweedie's estimate of y is y). Like StubUNet it records the timesteps it is called at and the shapes
    it sees (`.timesteps`, `.shapes`)."""
    channels = (8, 16) if levels == 2 else (8,) * levels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            layers_per_block=1,
            norm_num_groups=4,
            add_attention=False,
        )
    if zero:
        with torch.no_grad():
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.zero_()
    unet.timesteps, unet.shapes = [], []

    def record(module: UNet2DModel, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        module.timesteps.append(int(t))
        module.shapes.append(tuple(x.shape))

    unet.register_forward_pre_hook(record, with_kwargs=True)
    return unet.eval()


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
    Two levels (block_out_channels), so methods pad images to even sides (plus what the DIP presets need).

    Why not a real UNet (tiny_unet above) in the tests that use this one: they compare a method's output with a
    closed form written out in the test (tests/by_hand.py), which needs eps as a known function of x and of the
    timestep. A real network's eps is only known by running it, and its dependence on the timestep is some small,
    unknown amount, so a chain that calls it one timestep off would stay within any tolerance; here a call one
    timestep off changes eps by per_step * x, hundreds of times the tolerance. The arithmetic is also cheap enough
    for the full 1000-step chains (microseconds a call, where the smallest real UNet takes ~5 ms on a CPU core)."""

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
    """The identity denoiser: eps = 0, so Tweedie's estimate of y is y (tiny_unet(zero=True) where the chains are
    short and only eps = 0 matters)."""
    return StubUNet()


def eps_linear(per_step: float = 0.02) -> StubUNet:
    """eps = per_step * (timestep + 1) * x: a call one timestep off changes eps by per_step * x."""
    return StubUNet(per_step=per_step)


class StubG(torch.nn.Module):
    """G_psi stand-in: G(z, w) = 0.5 z + mean(w) per image (0.5 z without w). Records the timesteps and w it gets.
    With w_dim its config names it (as StyleGenerator's does), else it has no style input (style_dim 0). A stub
    for the reason StubUNet is one: the amortized sampler's output is compared with a closed form."""

    def __init__(self, w_dim: int = 0) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.config = StubConfig(w_dim=w_dim) if w_dim else StubConfig(block_out_channels=(16, 32))
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, z: torch.Tensor, timestep: int, class_labels: torch.Tensor | None = None) -> SimpleNamespace:
        self.calls.append((int(timestep), None if class_labels is None else class_labels.clone()))
        out = 0.5 * z
        if class_labels is not None:
            out = out + class_labels.mean(1).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=out)


# The +-1 checkerboard FakeFit adds to its target.
PATTERN = torch.where(torch.arange(3 * SIZE * SIZE).view(3, SIZE, SIZE) % 2 == 0, 1.0, -1.0)


class FakeFit:
    """Algorithm 2 stand-in (monkeypatched over a method module's `fit`): G(z) = target + 0.1 * (+-1 pattern), a
    fit that took 100 s. Records its arguments."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.amplitude = 0.1

    def __call__(self, ctx, target, z, seeds, reference, cfg=None):
        self.calls.append(
            {
                "target": target.clone(),
                "z": z.clone(),
                "seeds": list(seeds),
                "cfg": cfg,
                "reference": None if reference is None else reference.clone(),
            }
        )
        return DIPResult(target + self.amplitude * PATTERN, torch.zeros(3, target.shape[0]), seconds=100.0)


def tiny_restorer(seed: int = 0) -> UNet2DModel:
    """The restoration network's UNet (training.restorer.build_restorer) at 8 / 16 channels, its output layer
    drawn small but not zero (as built it returns the classical estimate itself), so a method that skips it or
    feeds it the wrong channels gives other images."""
    from tdpm_dip.training.restorer import build_restorer

    net = build_restorer((8, 16), SIZE, seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        net.conv_out.weight.normal_(0, 0.05)
    return net.eval()

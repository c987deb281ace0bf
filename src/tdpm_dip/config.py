"""Typed, serialisable network presets.

The report's networks (Sec. 4.3, anchors.md) are diffusers `UNet2DModel`s; the presets below
reproduce them by name, plus the layout of the small reference DDPMs and tiny CPU presets for tests
and the demo. A preset is plain data: `UNetPreset.unet_kwargs()` is what `UNet2DModel(**kwargs)` takes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UserError

WHITE = (255, 255, 255)
D, AD = "DownBlock2D", "AttnDownBlock2D"
U, AU = "UpBlock2D", "AttnUpBlock2D"


@dataclass(frozen=True)
class UNetPreset:
    """Hyperparameters of a `UNet2DModel` (64x64 RGB unless said otherwise)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 2
    norm_num_groups: int = 32
    attention_head_dim: int = 8
    # Self-attention in the mid block (diffusers' default). Off for the DIP presets meant to be
    # attention-free: attention has no vmap batching rule on some backends.
    add_attention: bool = True
    # A global input vector beside the image (diffusers' class embedding): "identity" adds class_labels of the
    # time-embedding width to the time embedding, which every ResNet block reads. With "scale_shift" a block
    # applies it after its GroupNorm as norm(h) * (1 + scale) + shift (AdaIN, as StyleGAN's styles), so the
    # vector is not normalised away. The generator presets use both; the DDPM/DIP presets neither.
    class_embed_type: str | None = None
    resnet_time_scale_shift: str = "default"
    sample_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    description: str = ""
    # Expected parameter count (millions) for the presets that name a published network.
    params_m: float | None = field(default=None, compare=False)

    @property
    def has_attention(self) -> bool:
        return self.add_attention or any("Attn" in b for b in self.down_block_types + self.up_block_types)

    def unet_kwargs(self, sample_size: int | None = None) -> dict:
        kw = asdict(self)
        kw.pop("description")
        kw.pop("params_m")
        kw["block_out_channels"] = tuple(kw["block_out_channels"])
        kw["down_block_types"] = tuple(kw["down_block_types"])
        kw["up_block_types"] = tuple(kw["up_block_types"])
        if sample_size is not None:
            kw["sample_size"] = sample_size
        return kw


PRESETS: dict[str, UNetPreset] = {
    # The report's DDPM: 6 levels, attention in the 5th down / 2nd up block (113.7M parameters).
    "paper-ddpm": UNetPreset(
        (128, 128, 256, 256, 512, 512),
        (D, D, D, D, AD, D),
        (U, AU, U, U, U, U),
        description="the report's DDPM (113.7M parameters)",
        params_m=113.67,
    ),
    # The report's DIP G_psi: 4 levels, attention in the 3rd down / 2nd up block (61.5M).
    "paper-dip": UNetPreset(
        (128, 128, 256, 512),
        (D, D, AD, D),
        (U, AU, U, U),
        description="the report's DIP network G_psi (61.5M parameters)",
        params_m=61.53,
    ),
    # Same widths without attention: vmap-friendly, and attention adds little to a DIP.
    "paper-dip-noattn": UNetPreset(
        (128, 128, 256, 512),
        (D, D, D, D),
        (U, U, U, U),
        add_attention=False,
        description="paper-dip without any attention (vmap-friendly)",
        params_m=None,
    ),
    # The layout of the small reference DDPMs (12.5M).
    "small": UNetPreset(
        (64, 128, 128, 192),
        (D, D, AD, D),
        (U, AU, U, U),
        description="layout of the small reference DDPMs (12.5M parameters)",
        params_m=12.47,
    ),
    # A DIP small enough to fit the report's 100 iterations at 64x64 on a laptop CPU.
    "dip-small": UNetPreset(
        (32, 64, 128),
        (D, D, D),
        (U, U, U),
        layers_per_block=1,
        norm_num_groups=8,
        add_attention=False,
        description="CPU-sized DIP (2.5M parameters)",
    ),
    # Tiny presets for tests and the demo, sized for a CPU.
    "tiny": UNetPreset(
        (32, 64),
        (D, AD),
        (AU, U),
        layers_per_block=1,
        norm_num_groups=8,
        description="tiny DDPM for tests and the CPU demo",
    ),
    # The demo's DDPM: as many parameters as "tiny" (0.69M) but a third level, so its widest layers and
    # its attention run at 8x8 on 32 px images: far fewer FLOPs than "tiny" (tdpm-dip demo).
    "demo": UNetPreset(
        (16, 32, 64),
        (D, D, AD),
        (AU, U, U),
        layers_per_block=1,
        norm_num_groups=8,
        description="CPU demo DDPM for 32 px images (0.69M parameters)",
    ),
    # The shipped sprite DDPM: four times the demo's widths at the same three levels, attention at 8x8.
    "sprites": UNetPreset(
        (32, 64, 128),
        (D, D, AD),
        (AU, U, U),
        layers_per_block=1,
        norm_num_groups=16,
        description="sprite DDPM for 32 px images (2.7M parameters)",
    ),
    # TDPM's amortized generator G_psi(z) (generator.py): one call per image, so small; attention-free.
    # A spatial z alone gives a UNet no per-image global variable (GroupNorm removes what i.i.d. noise
    # has of one), and GANs on it collapse to one image; so G_psi also takes a style vector w (above).
    "generator-small": UNetPreset(
        (16, 32, 64),
        (D, D, D),
        (U, U, U),
        layers_per_block=1,
        norm_num_groups=8,
        add_attention=False,
        class_embed_type="identity",
        resnet_time_scale_shift="scale_shift",
        description="TDPM generator G_psi(z, w) for the truncated chain (CPU-sized: the demo DDPM's widths; "
        "style vector w of 64)",
    ),
    "dip-tiny": UNetPreset(
        (16, 32),
        (D, D),
        (U, U),
        layers_per_block=1,
        norm_num_groups=8,
        add_attention=False,
        description="tiny DIP for tests",
    ),
}


@dataclass(frozen=True)
class StylePreset:
    """Hyperparameters of a `models.StyleGenerator` (a G_psi made for GANs), by output resolution."""

    channels: tuple[int, ...]  # per resolution, from 4x4 up: 4 * 2**i px for block i
    w_dim: int = 64  # the style vector w ~ N(0, I)
    mapping_layers: int = 2
    latent_input: bool = False  # the 4x4 input made from w (DCGAN's projection) instead of a learned constant
    description: str = ""

    @property
    def sample_size(self) -> int:
        return 4 * 2 ** (len(self.channels) - 1)

    def model_kwargs(self) -> dict:
        return {
            "channels": tuple(self.channels),
            "w_dim": self.w_dim,
            "mapping_layers": self.mapping_layers,
            "sample_size": self.sample_size,
            "latent_input": self.latent_input,
        }


# Generators for TDPM's G_psi that are not UNets (training/generator.py accepts these names as --preset too).
STYLE_PRESETS: dict[str, StylePreset] = {
    "style-32": StylePreset((128, 128, 64, 32), description="StyleGAN-lite G_psi for 32 px images (0.5M)"),
    "style-64": StylePreset((128, 128, 128, 64, 32), description="StyleGAN-lite G_psi for 64 px images"),
    # The coarse layout (where the body is, how large, which shape) drawn from w at 4x4, as DCGAN does: the
    # constant input leaves it to the styles, which learn it slowly.
    "style-32-latent": StylePreset(
        (128, 128, 64, 32),
        w_dim=128,
        latent_input=True,
        description="StyleGAN-lite G_psi for 32 px images, its 4x4 input projected from w",
    ),
}


def get_preset(name: str) -> UNetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def parse_fill(fill: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """'white', 'black', '#rrggbb' or 'r,g,b' -> an RGB tuple."""
    if isinstance(fill, tuple):
        return fill
    named = {"white": WHITE, "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
    s = fill.strip().lower()
    if s in named:
        return named[s]
    try:
        if s.startswith("#") and len(s) == 7:
            return tuple(int(s[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        parts = tuple(int(p) for p in s.split(","))
        if len(parts) == 3 and all(0 <= p <= 255 for p in parts):
            return parts
    except ValueError:
        pass
    raise UserError(f"--fill {fill!r}: use white, black, gray, #rrggbb or r,g,b")

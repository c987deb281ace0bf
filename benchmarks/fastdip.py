"""Algorithm 2 for B images with every convolution run as one batched matmul (tensor-core friendly).

`tdpm_dip.dip.fit_dip` stacks the B networks and calls them through `vmap(functional_call)`; vmap turns each
convolution into a grouped one (groups = B), which runs far below the tensor cores' rate. Here the
network is the same diffusers `UNet2DModel` code, but every `Conv2d`, `Linear` and `GroupNorm` is
swapped for a module holding the B networks' parameters stacked on a leading axis:

* a k x k convolution is an im2col matmul per image, all images in one `torch.baddbmm`:
  patches [B, H*W, k*k*Cin] @ weights [B, k*k*Cin, Cout] ("taps": channels-last patches built from
  k*k shifted views), or `F.unfold` + weights [B, Cout, Cin*k*k] ("unfold", NCHW);
* a Linear is `baddbmm` over [B, tokens, Cin] @ [B, Cin, Cout];
* GroupNorm is normalised per image as usual, then scaled / shifted by image b's affine parameters.

Everything else (SiLU, skip concatenations, nearest upsampling, attention with `scaled_dot_product_attention`)
is diffusers' own forward with the image index as the batch axis, so attention presets work too. One Adam
over the stacked tensors equals B independent Adams (Adam is element-wise) and the loss is the *sum* of
per-image MSEs, so image b's network follows exactly the trajectory it would alone: with `init="cpu"` the
weights start from `build_unet(preset, seed)`, as in `fit_dip`, and the outputs match `fit_dip` up to
float rounding (tests/test_speed_script.py). `init="device"` draws the same distribution (PyTorch's
default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv / linear weights and biases, GroupNorm 1 / 0)
directly on the device from per-image generators, which avoids building B networks on the host (slow
for the paper's networks); image b still depends only on seed b, but not the same numbers as
`build_unet(seed)`.

A benchmark, not part of the package: `benchmarks/speed.py` times it against `tdpm_dip.dip.fit_dip`.
Its fitting loop is its own copy of fit_dip's (fused Adam on CUDA, a device timestep, optional
torch.compile); tests/test_speed_script.py checks that both give the same result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from tdpm_dip.config import UNetPreset, get_preset
from tdpm_dip.devices import autocast, timer
from tdpm_dip.dip import DIPConfig, DIPResult
from tdpm_dip.errors import UserError
from tdpm_dip.metrics import mse_per_image, psnr, ssim
from tdpm_dip.models import build_unet
from tdpm_dip.noise import image_generators, randn

IMPLS = ("taps", "unfold")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for `device_type`, or None (torch >= 2.4 API with a fallback)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):  # older torch
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _pick(mod: nn.Module, b: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image b's slice of a stacked module's weight and bias (or of their gradients)."""
    if grad:
        if mod.weight.grad is None or mod.bias.grad is None:
            raise ValueError("no gradient: run backward first")
        return mod.weight.grad[b], mod.bias.grad[b]
    return mod.weight.data[b], mod.bias.data[b]


class StackedConv2d(nn.Module):
    """B independent `Conv2d`s (groups 1, zero padding) applied to B images, as one batched matmul."""

    def __init__(
        self,
        n: int,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        padding: int,
        impl: str,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise UserError(f"unknown conv implementation {impl!r}; choose {' or '.join(IMPLS)}")
        self.n, self.cin, self.cout, self.impl = n, cin, cout, impl
        self.k, self.stride, self.padding = k, stride, padding
        shape = (n, k * k * cin, cout) if impl == "taps" else (n, cout, cin * k * k)
        self.weight = nn.Parameter(torch.empty(shape, device=device))
        self.bias = nn.Parameter(torch.empty(n, cout, device=device))

    # layout conversions between one diffusers weight [Cout, Cin, k, k] and this module's slice
    def set_image(self, b: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        w = weight.permute(2, 3, 1, 0).reshape(-1, self.cout) if self.impl == "taps" else weight.reshape(self.cout, -1)
        self.weight.data[b].copy_(w)
        self.bias.data[b].copy_(bias)

    def get_image(self, b: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        w, bias = _pick(self, b, grad)
        if self.impl == "taps":
            w = w.reshape(k, k, self.cin, self.cout).permute(3, 2, 0, 1)
        else:
            w = w.reshape(self.cout, self.cin, k, k)
        return w.contiguous(), bias.clone()

    @property
    def fan_in(self) -> int:
        return self.cin * self.k * self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, s, p = self.k, self.stride, self.padding
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        amp = _autocast_dtype(x.device.type)
        if amp is not None:  # build the patches in the matmul dtype, not in fp32 and cast them after
            x = x.to(amp)
        if self.impl == "taps":
            xh = x.permute(0, 2, 3, 1)  # [B, H, W, C]: free when x is channels-last
            if k == 1 and s == 1 and p == 0:
                cols = xh.reshape(n, h * w, c)
            else:
                if p:
                    xh = F.pad(xh, (0, 0, p, p, p, p))
                taps = [
                    xh[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :]
                    for i in range(k)
                    for j in range(k)
                ]
                cols = torch.cat(taps, dim=-1).reshape(n, ho * wo, k * k * c)
            out = torch.baddbmm(self.bias.unsqueeze(1), cols, self.weight)  # [B, HoWo, Cout]
            return out.view(n, ho, wo, self.cout).permute(0, 3, 1, 2)  # NCHW view, channels-last memory
        cols = F.unfold(x, k, padding=p, stride=s) if (k, s, p) != (1, 1, 0) else x.reshape(n, c, h * w)
        out = torch.baddbmm(self.bias.unsqueeze(2), self.weight, cols)  # [B, Cout, HoWo]
        return out.view(n, self.cout, ho, wo)


class _SameLayout(nn.Module):
    """Stacked modules whose per-image slice has the diffusers layout already (Linear, GroupNorm)."""

    weight: nn.Parameter
    bias: nn.Parameter

    def set_image(self, b: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight.data[b].copy_(weight)
        self.bias.data[b].copy_(bias)

    def get_image(self, b: int, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        w, bias = _pick(self, b, grad)
        return w.clone(), bias.clone()


class StackedLinear(_SameLayout):
    """B independent `Linear`s: x[b] (any leading token axes) goes through network b's weights."""

    def __init__(self, n: int, cin: int, cout: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n, self.cin, self.cout = n, cin, cout
        self.weight = nn.Parameter(torch.empty(n, cout, cin, device=device))
        self.bias = nn.Parameter(torch.empty(n, cout, device=device))

    @property
    def fan_in(self) -> int:
        return self.cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[1:-1]
        x2 = x.reshape(x.shape[0], -1, self.cin)
        out = torch.baddbmm(self.bias.unsqueeze(1), x2, self.weight.transpose(1, 2))
        return out.reshape(x.shape[0], *lead, self.cout)


class StackedGroupNorm(_SameLayout):
    """B `GroupNorm`s: per-image normalisation (as usual), then image b's own scale and shift."""

    def __init__(
        self, n: int, groups: int, channels: int, eps: float, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.n, self.groups, self.channels, self.eps = n, groups, channels, eps
        self.weight = nn.Parameter(torch.empty(n, channels, device=device))
        self.bias = nn.Parameter(torch.empty(n, channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.groups, None, None, self.eps)
        shape = (x.shape[0], self.channels) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


_Stacked = (StackedConv2d, StackedLinear, StackedGroupNorm)


def _swap(skeleton: UNet2DModel, n: int, impl: str, device: torch.device | str) -> dict[str, nn.Module]:
    """Replace every parameterised leaf of `skeleton` by its stacked version (in place); returns them by name."""
    swapped: dict[str, nn.Module] = {}
    for name, mod in list(skeleton.named_modules()):
        if not list(mod.parameters(recurse=False)):
            continue
        if isinstance(mod, nn.Conv2d):
            k, s, p = mod.kernel_size, mod.stride, mod.padding
            if (
                mod.groups != 1
                or mod.dilation != (1, 1)
                or mod.padding_mode != "zeros"
                or isinstance(p, str)
                or k[0] != k[1]
                or s[0] != s[1]
                or p[0] != p[1]
                or mod.bias is None
            ):
                raise UserError(f"fastdip: unsupported Conv2d {name} ({mod}); use dip.fit_dip")
            new: nn.Module = StackedConv2d(n, mod.in_channels, mod.out_channels, k[0], s[0], p[0], impl, device)
        elif isinstance(mod, nn.Linear):
            if mod.bias is None:
                raise UserError(f"fastdip: Linear {name} without bias is not supported; use dip.fit_dip")
            new = StackedLinear(n, mod.in_features, mod.out_features, device)
        elif isinstance(mod, nn.GroupNorm):
            if not mod.affine:
                raise UserError(f"fastdip: GroupNorm {name} without affine parameters is not supported")
            new = StackedGroupNorm(n, mod.num_groups, mod.num_channels, mod.eps, device)
        else:
            raise UserError(
                f"fastdip: layer {name} ({type(mod).__name__}) has parameters but no stacked version; use dip.fit_dip"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        setattr(parent, attr, new)
        swapped[name] = new
    leftover = [n_ for n_, p in skeleton.named_parameters() if not any(n_.startswith(k + ".") for k in swapped)]
    if leftover or list(skeleton.buffers()):
        raise UserError(f"fastdip: unexpected parameters / buffers {leftover[:3]}; use dip.fit_dip")
    return swapped


def _skeleton(config: dict) -> UNet2DModel:
    with torch.device("meta"):
        return UNet2DModel.from_config(config)


def stack_unets(models: list[UNet2DModel], impl: str = "taps") -> UNet2DModel:
    """One `UNet2DModel` whose layers hold `models`' weights stacked: input image b uses models[b].

    The models must share one configuration; the result lives on models[0]'s device.
    """
    if not models:
        raise ValueError("stack_unets needs at least one model")
    device = next(models[0].parameters()).device
    net = _skeleton(models[0].config)
    swapped = _swap(net, len(models), impl, device)
    for b, m in enumerate(models):
        mods = dict(m.named_modules())
        for name, new in swapped.items():
            old = mods[name]
            new.set_image(b, old.weight.detach(), old.bias.detach())
    return net.train()


@torch.no_grad()
def init_stacked(
    preset: UNetPreset | str,
    seeds: list[int],
    device: torch.device | str,
    impl: str = "taps",
    sample_size: int | None = None,
) -> UNet2DModel:
    """B freshly initialised networks drawn on `device` (PyTorch's default init; network b from seed b)."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    net = _skeleton(dict(preset.unet_kwargs(sample_size)))
    swapped = _swap(net, len(seeds), impl, device)
    gens = image_generators(seeds, device)
    for mod in swapped.values():
        if isinstance(mod, StackedGroupNorm):
            mod.weight.fill_(1.0)
            mod.bias.zero_()
            continue
        bound = 1.0 / math.sqrt(mod.fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias rule of nn.Conv2d / nn.Linear
        for b, g in enumerate(gens):
            # iid uniform entries: the stacked layout does not change the distribution
            mod.weight[b].uniform_(-bound, bound, generator=g)
            mod.bias[b].uniform_(-bound, bound, generator=g)
    return net.train()


@torch.no_grad()
def unstack(net: UNet2DModel, b: int, grad: bool = False) -> dict[str, torch.Tensor]:
    """Network b's weights (or gradients) as a state dict in diffusers layout (`UNet2DModel.load_state_dict`)."""
    out = {}
    for name, mod in net.named_modules():
        if isinstance(mod, _Stacked):
            w, bias = mod.get_image(b, grad)
            out[f"{name}.weight"], out[f"{name}.bias"] = w, bias
    return out


def _stacked_net(
    preset: UNetPreset, seeds: list[int], device: torch.device, size: int, impl: str, init: str
) -> UNet2DModel:
    if init == "cpu":
        return stack_unets([build_unet(preset, seed=s, sample_size=size).to(device) for s in seeds], impl)
    return init_stacked(preset, seeds, device, impl, sample_size=size)


def _fit_stacked(
    net: UNet2DModel,
    target: torch.Tensor,
    net_input: torch.Tensor,
    seeds: list[int],
    cfg: DIPConfig,
    reference: torch.Tensor | None,
    amp_dtype: torch.dtype | None,
    compile: bool | str,
    channels_last: bool,
) -> DIPResult:
    """fit_dip's loop (Alg. 2 lines 4-9) on one stacked network; fused Adam on CUDA."""
    device = target.device
    # Timestep 0 as a device tensor: an int would be copied host->device (a sync) at every call.
    t0 = torch.zeros(len(seeds), dtype=torch.long, device=device)
    fwd = torch.compile(net, mode=None if compile is True else compile, dynamic=False) if compile else net
    if channels_last:
        net_input = net_input.contiguous(memory_format=torch.channels_last)
    gens = image_generators([s + 7919 for s in seeds], device) if cfg.input_noise > 0 else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, **({"fused": True} if device.type == "cuda" else {}))
    curves: dict[str, list] = {"loss": [], "psnr": [], "ssim": []}
    ssim_at = [
        i
        for i in range(cfg.iters)
        if reference is not None and cfg.ssim_every > 0 and (i % cfg.ssim_every == 0 or i == cfg.iters - 1)
    ]
    avg = None
    for i in range(cfg.iters):
        x = net_input
        if gens is not None:  # blind-protocol input perturbation, drawn as in fit_dip
            x = x + cfg.input_noise * randn(tuple(x.shape[1:]), gens, device, x.dtype)
        with autocast(device, amp_dtype):
            out = fwd(x, t0).sample
        per_image = mse_per_image(out, target)
        curves["loss"].append(per_image.detach().float())
        snapshot = out.detach().float()
        if reference is not None:
            curves["psnr"].append(psnr(snapshot, reference))
        if i in ssim_at:
            curves["ssim"].append(ssim(snapshot, reference))
        if cfg.average is not None:
            avg = snapshot if avg is None else cfg.average * avg + (1 - cfg.average) * snapshot
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()  # the sum: each network gets the gradient of its own MSE
        opt.step()
    if avg is None:
        with torch.no_grad(), autocast(device, amp_dtype):
            avg = fwd(net_input, t0).sample.float()
    stacked = {k: torch.stack(v).cpu() if v else None for k, v in curves.items()}
    loss = stacked["loss"] if stacked["loss"] is not None else torch.zeros(0, len(seeds))
    return DIPResult(avg, loss, stacked["psnr"], stacked["ssim"], ssim_at)


def fit_dip_fast(
    target: torch.Tensor,
    net_input: torch.Tensor,
    seeds: list[int],
    cfg: DIPConfig | None = None,
    reference: torch.Tensor | None = None,
    batch_size: int = 16,
    amp_dtype: torch.dtype | None = None,
    impl: str = "taps",
    init: str = "cpu",
    compile: bool | str = False,
    channels_last: bool = True,
) -> DIPResult:
    """`tdpm_dip.dip.fit_dip` (Algorithm 2 for B images) with batched-matmul convolutions; same result.

    impl: "taps" (channels-last im2col from shifted views) or "unfold" (F.unfold); init: "cpu"
    (`build_unet(preset, seed)`, identical to fit_dip) or "device" (same law, drawn on the device);
    compile: False, True or a `torch.compile` mode. cfg None: DIPConfig()'s defaults.
    """
    cfg = cfg or DIPConfig()
    if impl not in IMPLS:
        raise UserError(f"unknown conv implementation {impl!r}; choose {' or '.join(IMPLS)}")
    if init not in ("cpu", "device"):
        raise UserError(f"unknown init {init!r}; choose cpu or device")
    if target.shape[0] != len(seeds) or net_input.shape[0] != len(seeds):
        raise ValueError("target, net_input and seeds must have the same length")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    preset = get_preset(cfg.preset)
    parts = []
    with timer(target.device) as tm:
        for lo in range(0, len(seeds), batch_size):
            part = slice(lo, lo + batch_size)
            net = _stacked_net(preset, list(seeds[part]), target.device, target.shape[-1], impl, init)
            parts.append(
                _fit_stacked(
                    net,
                    target[part],
                    net_input[part],
                    list(seeds[part]),
                    cfg,
                    reference[part] if reference is not None else None,
                    amp_dtype,
                    compile,
                    channels_last,
                )
            )
    curves = {
        k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts], dim=1)
        for k in ("loss", "psnr", "ssim")
    }
    return DIPResult(
        torch.cat([p.output for p in parts]), curves["loss"], curves["psnr"], curves["ssim"], parts[0].ssim_iters, tm[0]
    )

"""Linear observation operators y = A x + n for restoration, in deepinv's convention (`LinearPhysics`).

Every operator works on images in [-1, 1] ([B, C, H, W]) and offers:

A(x)             the observation of x (noise-free);
adjoint(y)       A^T y, so that <A x, y> = <x, A^T y>;
pinv(y)          the Moore-Penrose pseudo-inverse A^+ y (closed form: a mask, or separable SVDs);
prox(x, y, rho)  argmin_v ||A v - y||^2 + rho ||v - x||^2; rho = 0 is the projection of x onto {v : A v = y}
                 (DDNM's x - A^+(A x - y), Wang et al. 2023), rho > 0 DiffPIR's data step (Zhu et al. 2023, Eq. 13).

`Inpaint` keeps the image's shape (missing pixels are 0 in y, as DDNM's mask operator); `Downsample` is PIL's
bicubic resize with antialiasing, written as one matrix per axis (A = D_h x D_w^T), so that every quantity above
is exact. `Identity` is denoising's operator.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import defaults
from .errors import UserError
from .images import pad_bottom_right


class Operator:
    """A linear operator with its adjoint, pseudo-inverse and proximal data step (see the module docstring)."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classical(self, y: torch.Tensor) -> torch.Tensor:
        """The estimate without a network, where the diffusion methods start (CCDF) and the classical baseline:
        the pseudo-inverse unless the operator knows better (bicubic upscaling, biharmonic inpainting)."""
        return self.pinv(y)

    def prox(self, x: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The closest v to x with A v = y (x - A^+(A x - y))."""
        return self.prox(x, y, 0.0)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of the restored image for an observation of size h x w."""
        return h, w

    def density(self, h: int, w: int) -> torch.Tensor:
        """[B or 1, 1, h, w]: the share of each output pixel the observation measures (1 = all of it), what a
        learned restorer is told besides its start estimate."""
        return torch.ones(1, 1, h, w)

    def part(self, idx: slice) -> Operator:
        """The operator of images idx of a batch (the same one unless it holds something per image)."""
        return self

    def key(self) -> str:
        """What determines the operator (a cache key)."""
        return repr(self)

    def padded(self, ph: int, pw: int) -> Operator:
        """The operator of observations padded by ph rows and pw columns (bottom, right) of their own grid."""
        return self

    def to(self, device: torch.device | str) -> Operator:
        """The operator with its tensors on `device`."""
        return self


class Identity(Operator):
    """Denoising: A = A^T = A^+ = I."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def prox(self, x: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor = 0.0) -> torch.Tensor:
        return (y + rho * x) / (1 + rho)


@dataclass
class Inpaint(Operator):
    """A x = m * x for a binary mask m ([B or 1, 1, H, W], 1 = known): A = A^T = A^+."""

    mask: torch.Tensor

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.mask * y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.mask * y

    def classical(self, y: torch.Tensor) -> torch.Tensor:
        return inpaint_biharmonic(y, self.mask).clamp(-1, 1)

    def density(self, h: int, w: int) -> torch.Tensor:
        return (self.mask > 0.5).float().expand(-1, 1, h, w)

    def to(self, device: torch.device | str) -> Inpaint:
        return Inpaint(self.mask.to(device))

    def part(self, idx: slice) -> Inpaint:
        return self if self.mask.shape[0] == 1 else Inpaint(self.mask[idx])

    def key(self) -> str:
        return "inpaint:" + hashlib.sha1(self.mask.detach().cpu().numpy().tobytes()).hexdigest()

    def padded(self, ph: int, pw: int) -> Inpaint:
        return Inpaint(pad_bottom_right(self.mask, ph, pw))  # reflected, as the image is

    def prox(self, x: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor = 0.0) -> torch.Tensor:
        # Per pixel: (m y + rho x) / (m + rho); rho = 0 keeps x where nothing is known.
        if isinstance(rho, float) and rho == 0.0:
            return torch.where(self.mask > 0.5, y, x)
        return (self.mask * y + rho * x) / (self.mask + rho)


def check_scale(scale: int) -> int:
    """A super-resolution factor: one of defaults.SR_SCALES (a one-line error otherwise)."""
    if scale not in defaults.SR_SCALES:
        raise UserError(f"the scale must be {' or '.join(map(str, defaults.SR_SCALES))}, got {scale}")
    return scale


@functools.lru_cache(maxsize=16)
def resize_matrix(size: int, factor: int) -> torch.Tensor:
    """[size // factor, size] float64: PIL's bicubic (a = -0.5) antialiased downscaling of one axis, as a matrix.

    Built by resizing the unit vectors with PIL itself (mode "F", no rounding), so A matches
    `Image.resize(..., Image.Resampling.BICUBIC)` of the files users and benchmarks make."""
    out = size // factor
    cols = []
    for i in range(size):
        e = np.zeros((1, size), np.float32)
        e[0, i] = 1.0
        img = Image.fromarray(e, mode="F").resize((out, 1), Image.Resampling.BICUBIC, reducing_gap=None)
        cols.append(np.asarray(img, np.float64)[0])
    return torch.from_numpy(np.stack(cols, axis=1))


@dataclass
class Downsample(Operator):
    """Bicubic downscaling by an integer factor of an H x W image (H, W multiples of the factor): A x = D_h x D_w^T.

    A = (U_h S_h V_h^T) (x) (U_w S_w V_w^T) has singular values s_i s_j, so the pseudo-inverse and the proximal
    step are closed forms in the two SVD bases (DDRM's `H_functions` in separable form)."""

    factor: int
    height: int
    width: int
    _svd: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_scale(self.factor)
        if self.height % self.factor or self.width % self.factor:
            raise UserError(f"a {self.width}x{self.height} image is not a multiple of the scale {self.factor}")
        svds = []
        for n in (self.height, self.width):
            u, s, vt = torch.linalg.svd(resize_matrix(n, self.factor), full_matrices=False)
            svds.append((u.float(), s.float(), vt.float()))
        self._svd = tuple(svds)

    def _mats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dh = resize_matrix(self.height, self.factor).to(x.device, x.dtype)
        dw = resize_matrix(self.width, self.factor).to(x.device, x.dtype)
        return dh, dw

    def A(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = self._mats(x)
        return dh @ x @ dw.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        dh, dw = self._mats(y)
        return dh.T @ y @ dw

    def _bases(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (uh, sh, vth), (uw, sw, vtw) = self._svd
        dev, dt = x.device, x.dtype
        return uh.to(dev, dt), vth.to(dev, dt), uw.to(dev, dt), vtw.to(dev, dt), torch.outer(sh, sw).to(dev, dt)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        uh, vth, uw, vtw, s = self._bases(y)
        return vth.T @ ((uh.T @ y @ uw) / s) @ vtw

    def classical(self, y: torch.Tensor) -> torch.Tensor:
        return upsample_bicubic(y, self.factor).clamp(-1, 1)

    def prox(self, x: torch.Tensor, y: torch.Tensor, rho: float | torch.Tensor = 0.0) -> torch.Tensor:
        # In the bases V: x = V x~; the observed components (rank r) solve (s^2 + rho) v = s y~ + rho x~,
        # the others (A's null space) keep x's.
        uh, vth, uw, vtw, s = self._bases(x)
        xt = vth @ x @ vtw.T
        yt = uh.T @ y @ uw
        rho_t = rho if isinstance(rho, float) else rho.view(-1, 1, 1, 1)
        vt = (s * yt + rho_t * xt) / (s * s + rho_t)
        return x + vth.T @ (vt - xt) @ vtw

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h * self.factor, w * self.factor

    def density(self, h: int, w: int) -> torch.Tensor:
        return torch.full((1, 1, h, w), 1.0 / self.factor**2)  # one measurement per factor x factor pixels

    def padded(self, ph: int, pw: int) -> Downsample:
        return Downsample(self.factor, self.height + ph * self.factor, self.width + pw * self.factor)


def upsample_bicubic(y: torch.Tensor, factor: int) -> torch.Tensor:
    """The classical baseline: PIL's bicubic upscaling of each channel (mode "F", no rounding)."""
    out = []
    for img in y.detach().float().cpu():
        chans = []
        for c in img.numpy():
            im = Image.fromarray(c, mode="F").resize(
                (c.shape[1] * factor, c.shape[0] * factor), Image.Resampling.BICUBIC
            )
            chans.append(np.asarray(im))
        out.append(torch.from_numpy(np.stack(chans)))
    return torch.stack(out).to(y.device)


def inpaint_biharmonic(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The classical baseline: scikit-image's biharmonic inpainting of the unknown pixels, per image."""
    from skimage.restoration import inpaint_biharmonic as biharmonic  # deferred: scikit-image loads on use

    out = []
    m = mask.expand(y.shape[0], 1, *y.shape[-2:])
    for img, mk in zip(y.detach().float().cpu(), m.detach().cpu()):
        known = mk[0].numpy() > 0.5
        if known.all():
            out.append(img)
            continue
        if not known.any():  # nothing to interpolate from: the pseudo-inverse's flat grey
            out.append(torch.zeros_like(img))
            continue
        a = ((img.permute(1, 2, 0).numpy() + 1.0) / 2.0).astype(np.float64)
        rec = biharmonic(a, ~known, channel_axis=-1)
        out.append(torch.from_numpy(rec).float().permute(2, 0, 1) * 2.0 - 1.0)
    return torch.stack(out).to(y.device)


MASK_KINDS = ("box", "half", "random:P")


def check_mask_kind(kind: str) -> float | None:
    """A mask kind: box, half, or random:P (P = the share of pixels missing, 0 < P < 1); returns P for random."""
    if kind in ("box", "half"):
        return None
    head, _, tail = kind.partition(":")
    try:
        p = float(tail)
    except ValueError:
        p = -1.0
    if head != "random" or not 0 < p < 1:
        raise UserError(f"--mask-kind must be box, half or random:P with 0 < P < 1 (random:0.8), got {kind!r}")
    return p


def make_mask(kind: str, height: int, width: int, seed: int) -> torch.Tensor:
    """[1, H, W] of 0 / 1 (1 = known): `box` a centred hole of 3/8 of each side (24 x 24 px at 64 px), `half` the
    right half missing, `random:P` a share P of the pixels missing, drawn from `seed`."""
    p = check_mask_kind(kind)
    m = torch.ones(1, height, width)
    if kind == "box":
        bh, bw = round(height * 3 / 8), round(width * 3 / 8)
        top, left = (height - bh) // 2, (width - bw) // 2
        m[:, top : top + bh, left : left + bw] = 0
    elif kind == "half":
        m[:, :, width // 2 :] = 0
    else:
        g = torch.Generator().manual_seed(int(seed) + 2_750_159)
        m = (torch.rand(1, height, width, generator=g) >= float(p)).float()  # type: ignore[arg-type]
    return m

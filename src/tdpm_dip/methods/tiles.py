"""Tiled inference: an image larger than a tile runs as overlapping tiles, blended back with a smooth window.

The UNet's attention is quadratic in the pixels it sees (a 3000 px image is ~560k tokens at the attention block)
and its activations grow with them: run whole, a photo takes hours and gigabytes and cannot be interrupted inside
the one network call. In tiles of a few times the model's trained size, run a batch at a time, time grows
linearly with the pixels, memory is that of one batch of tiles plus the image, and Ctrl-C lands between batches.

Tile k of image i draws its randomness from seed_i + k * TILE_SEED_STRIDE, so results still depend only on the
image's seed, whatever the batch size. Each pixel's result is the mean of the tiles covering it, weighted by a
window that is 1 inside a tile and falls smoothly (raised cosine) over `overlap` px towards its edges, where a
tile sees the least context; the weights are normalised, so they sum to one at every pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

TILE_SEED_STRIDE = 7_368_787  # seed offset between the tiles of one image (a prime, apart from observe.DRAW_STRIDE)


@dataclass(frozen=True)
class Tiling:
    """Square tiles of side `tile` (px), neighbours sharing at least `overlap` px."""

    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")

    def starts(self, length: int) -> list[int]:
        """Tile origins along a side of `length` px: evenly spread, the first at 0 and the last flush with the end,
        no two further apart than tile - overlap (one origin when the side fits in a tile)."""
        if length <= self.tile:
            return [0]
        n = math.ceil((length - self.tile) / (self.tile - self.overlap)) + 1
        return [round(k * (length - self.tile) / (n - 1)) for k in range(n)]

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, tile height, tile width) of every tile of an image, row by row."""
        th, tw = min(self.tile, height), min(self.tile, width)
        return [(y, x, th, tw) for y in self.starts(height) for x in self.starts(width)]

    def window(self, height: int, width: int) -> torch.Tensor:
        """[height, width] blending weights of one tile: 1 inside, a raised-cosine ramp over `overlap` px at each
        edge; never 0, so that a pixel only one tile covers keeps that tile's value after normalising."""

        def ramp(n: int) -> torch.Tensor:
            w = torch.ones(n, dtype=torch.float64)
            r = min(self.overlap, n // 2)
            if r > 0:
                edge = torch.sin(0.5 * math.pi * torch.arange(1, r + 1, dtype=torch.float64) / (r + 1)) ** 2
                w[:r] = edge
                w[n - r :] = edge.flip(0)
            return w

        return (ramp(height)[:, None] * ramp(width)[None, :]).float()

    def count(self, height: int, width: int) -> int:
        return len(self.starts(height)) * len(self.starts(width))


def tiled(
    fn: Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor],
    images: torch.Tensor,
    tiling: Tiling,
    batch_size: int,
    progress: bool = False,
    check: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` to `images` [N, C, H, W] tile by tile and blend the results (same shape as `images`).

    `fn(tiles, which)` gets a batch of at most `batch_size` tiles [B, C, th, tw] and, for each, (image index, tile
    index), and returns the processed tiles. Tiles of all images are batched together; the accumulators are the
    only full-size tensors made here. `check`, called before each batch, may raise to stop."""
    n, c, h, w = images.shape
    boxes = tiling.boxes(h, w)
    window = tiling.window(boxes[0][2], boxes[0][3])
    acc = torch.zeros(n, c, h, w)
    weight = torch.zeros(1, 1, h, w)
    for y, x, th, tw in boxes:
        weight[..., y : y + th, x : x + tw] += window
    todo = [(i, k) for i in range(n) for k in range(len(boxes))]
    with tqdm(total=len(todo), desc="tiles", unit="tile", leave=False, disable=not progress) as bar:
        for lo in range(0, len(todo), batch_size):
            if check is not None:
                check()
            which = todo[lo : lo + batch_size]
            crops = torch.stack([_crop(images[i], boxes[k]) for i, k in which])
            out = fn(crops, which).float().cpu()
            for (i, k), o in zip(which, out):
                y, x, th, tw = boxes[k]
                acc[i, :, y : y + th, x : x + tw] += o * window
            bar.update(len(which))
    return acc / weight


def _crop(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    y, xx, th, tw = box
    return x[..., y : y + th, xx : xx + tw]

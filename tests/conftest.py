"""Shared test fixtures: small, generic, CPU-only. Tests never touch the network.

Helpers live in plain modules beside this file (pytest puts tests/ on sys.path): stubs.py (networks), by_hand.py
(closed forms), jobs.py (running one method), cli_helpers.py (the CLI in-process)."""

from __future__ import annotations

import os

# Before diffusers / huggingface_hub are imported anywhere: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tdpm_dip.data import make_sprites
from tdpm_dip.images import save_png

if TYPE_CHECKING:
    from tdpm_dip.methods import Context


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite: the networks here are tiny, and on a busy 2-core machine
    OpenMP barriers between two threads made steps up to 100x slower than the work itself."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def sprite_dir_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make(n=8, size=16, seed=0)` -> a folder of n procedural sprite PNGs (cached per session: read only)."""
    cache: dict[tuple[int, int, int], Path] = {}

    def make(n: int = 8, size: int = 16, seed: int = 0) -> Path:
        key = (n, size, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"sprites_{n}x{size}_s{seed}")
            sprites = make_sprites(n, size, seed)
            for x, name in zip(sprites.images, sprites.names):
                save_png(x, folder / f"{name}.png")
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def sprite_dir(sprite_dir_factory: Callable[..., Path]) -> Path:
    """8 sprites of 16x16 px (shared across tests: do not write into it)."""
    return sprite_dir_factory(8, 16)


@pytest.fixture(scope="session")
def make_ctx() -> Callable[..., Context]:
    """`make_ctx(unet=None, scheduler=None, dip=None, **fields)` -> a methods.Context, the one way the tests build
    one. unet: a tiny real UNet2DModel (stubs.tiny_unet) unless given; scheduler: the 1000-step linear schedule the
    closed forms use (by_hand.SCHED); dip and any other field (batch_size, dip_plugin, generator, progress, ...):
    Context's defaults unless given."""
    from by_hand import SCHED
    from stubs import tiny_unet

    from tdpm_dip.methods import Context

    def make(unet=None, scheduler=None, dip=None, **fields) -> Context:
        if dip is not None:
            fields["dip"] = dip
        return Context(tiny_unet() if unet is None else unet, SCHED if scheduler is None else scheduler, **fields)

    return make

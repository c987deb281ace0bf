"""tdpm-dip: Truncated Diffusion with a Deep Image Prior.

    from tdpm_dip import Denoiser, Generator, Restorer

Layers, bottom to top; a module imports only from its own layer or below (tests/test_layers.py checks it):

  0  errors  defaults  registry                 no torch: the table of defaults, the list of methods
  1  config  noise  devices  outputs  images     presets, the noise-level convention, files and PNGs
     operators                                   restoration's y = A x: masks, bicubic downscaling
  2  data  models  metrics                       images in, UNets, quality metrics
  3  dip  sampling  generator                    Algorithm 2, EpsModel and Algorithm 3, G_psi
     restoration_net                             the restoration network (CCDF's feed-forward start)
  4  methods/  training/                         the registry's methods (one dispatch), Algorithm 1 and G_psi
                                                 training on one loop, the restoration network's training
  5  reporting  embedded  runtime                tables and figures, the shipped models, devices / threads /
                                                 the one place that builds a Context
  6  api                                         Denoiser, Generator, Restorer: the Python API
  7  workflows/                                  what each command does, without click
  8  cli  app  app_ui                            front ends: parse input, call a workflow or the API

docs/design.md draws the same layers and says how to add a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Denoiser", "Generator", "Restorer", "__version__"]

if TYPE_CHECKING:
    from .api import Denoiser, Generator, Restorer


def __getattr__(name: str) -> object:
    # The API loads torch and diffusers: imported on first use, so that `tdpm-dip --help` and the
    # torch-free modules (registry, defaults) stay fast to import.
    if name in ("Denoiser", "Generator", "Restorer"):
        from . import api  # deferred: torch and diffusers load on first use of the API

        return getattr(api, name)
    raise AttributeError(f"module 'tdpm_dip' has no attribute {name!r}")

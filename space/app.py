"""Hugging Face Space entry point for `tdpm-dip app` (see the README's "App" section).

The Space repository holds this file as app.py, requirements.txt and README.md from space/, beside a copy
of the project's src/. The package is imported from src/ (a Space installs requirements.txt before it
copies the repository, so the package itself cannot be pip-installed from there). TDPM_MODEL names the
DDPM (a diffusers folder in the Space, or a hub id); unset, the embedded default is served.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
for src in (here / "src", here.parent / "src"):  # the Space's root, or space/ inside this repository
    if (src / "tdpm_dip").is_dir():
        sys.path.insert(0, str(src))
        break

from tdpm_dip.app import load_models  # noqa: E402
from tdpm_dip.app_ui import launch  # noqa: E402

if __name__ == "__main__":
    # A Space routes its public address to port 7860 of the container, so it must listen on all interfaces.
    launch(load_models(os.environ.get("TDPM_MODEL")), host="0.0.0.0", port=int(os.environ.get("PORT", "7860")))

"""The `tdpm-dip` command: parse the options and call a workflow (`tdpm_dip.workflows`) or a trainer.

Only click, the registry and the table of defaults are imported at the top: each command imports what it
runs inside its own body, so `tdpm-dip --help` (and every command's --help) answers without loading torch
or diffusers. Every problem the user can fix (paths, images, models, numbers) is one line on stderr and exit
code 2; Ctrl-C is exit code 130, SIGTERM 143, with earlier outputs intact (results are staged, then moved in).

Modules, by subject (each registers its commands on the group of `common`):
  common           the group, help texts, the option groups every command shares, the thread policy
  train_generate   train (Algorithm 1), train-generator (TDPM's G_psi), generate
  denoise_restore  denoise (blind and paper protocols), restore (super-resolution, inpainting)
  bench            bench (the report's tables, and the restoration table)
  data             sprites, prepare-data, add-noise
  demo_app         demo (end to end, offline), app (the browser app)
  entry            main: exit codes, one-line errors, progress bars as lines in logs
"""

from __future__ import annotations

from .bench import bench_cmd
from .common import (
    APP_MODEL_HELP,
    CONTEXT,
    DENOISE_MODEL_HELP,
    GENERATE_MODEL_HELP,
    cli,
    compute_options,
    config_options,
    dip_options,
    echo,
    set_threads,
)
from .data import add_noise_cmd, prepare_data_cmd, sprites_cmd
from .demo_app import app_cmd, demo_cmd
from .denoise_restore import denoise, restore
from .entry import PROGRESS_LINE_SECONDS, ProgressLines, main, progress_as_lines
from .train_generate import generate, train_cmd, train_generator_cmd

__all__ = [
    "APP_MODEL_HELP",
    "CONTEXT",
    "DENOISE_MODEL_HELP",
    "GENERATE_MODEL_HELP",
    "PROGRESS_LINE_SECONDS",
    "ProgressLines",
    "add_noise_cmd",
    "app_cmd",
    "bench_cmd",
    "cli",
    "compute_options",
    "config_options",
    "demo_cmd",
    "denoise",
    "dip_options",
    "echo",
    "generate",
    "main",
    "prepare_data_cmd",
    "progress_as_lines",
    "restore",
    "set_threads",
    "sprites_cmd",
    "train_cmd",
    "train_generator_cmd",
]

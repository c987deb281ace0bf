"""The CLI reads its choices and defaults from one place: the registry and `defaults` (plain data, so that
`--help` loads no torch), which agree with the modules that compute with them."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import torch

from tdpm_dip import config, defaults, operators, registry, runtime
from tdpm_dip.cli import cli
from tdpm_dip.errors import UserError
from tdpm_dip.noise import add_noise
from tdpm_dip.workflows import demo


def params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in cli.commands[command].params if p.name}


def choices(command: str, name: str) -> list[str]:
    kind = params(command)[name].type
    assert isinstance(kind, click.Choice)
    return list(kind.choices)


def test_plain_data_choices_match_the_modules_that_use_them() -> None:
    for bad in ("poisson", ""):
        with pytest.raises(UserError, match="noise model must be one of clipped, float"):
            add_noise(torch.zeros(1, 3, 2, 2), 1.0, [0], bad)
    with pytest.raises(UserError, match="the scale must be 2 or 4"):
        operators.check_scale(3)
    with pytest.raises(UserError, match="--dtype must be one of auto, fp32, bf16, fp16"):
        runtime.pick_amp("fp64", torch.device("cpu"))
    assert set(defaults.DIP_PRESETS) <= set(config.PRESETS)
    assert defaults.DEMO_DIP_PRESET in defaults.DIP_PRESETS and defaults.DEMO_PRESET in config.PRESETS
    assert defaults.NOISE_MODEL in defaults.NOISE_MODELS and defaults.SR_SCALE in defaults.SR_SCALES


def test_protocol_operator_and_preset_choices_come_from_the_registry_and_defaults() -> None:
    assert registry.protocols("denoise") == ["paper", "blind"]
    assert registry.protocols("generate") == ["paper", "unconditional"]
    assert choices("denoise", "protocol") == registry.protocols("denoise")
    assert params("denoise")["protocol"].default == defaults.DENOISE_PROTOCOL
    assert choices("bench", "protocol") == registry.protocols("denoise")
    assert choices("restore", "task") == list(registry.OPERATORS)
    assert choices("restore", "methods") == registry.names("restore", "blind")
    for command in ("denoise", "bench"):
        assert choices(command, "noise") == list(defaults.NOISE_MODELS)
    for command in ("denoise", "restore", "generate", "bench"):
        assert choices(command, "dtype") == list(defaults.DTYPES)
    assert choices("demo", "dip_preset") == list(defaults.DIP_PRESETS)
    assert choices("bench", "tables")[: len(defaults.BENCH_TABLES)] == list(defaults.BENCH_TABLES)


def test_the_demo_options_default_to_the_demo_config() -> None:
    cfg = demo.DemoConfig(out="x")
    for name in ("n", "steps", "train_images", "sigma", "ddpm_steps", "dip_preset", "dip_iters", "blind_dip_iters"):
        assert params("demo")[name].default == getattr(cfg, name), name
    assert demo.DIP_PRESETS == defaults.DIP_PRESETS


def test_python_m_runs_the_cli() -> None:
    """`python -m tdpm_dip.cli` (how accelerate launch and torchrun start it) is `tdpm-dip`."""
    out = subprocess.run(
        [sys.executable, "-m", "tdpm_dip.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("tdpm-dip, version")


@pytest.mark.parametrize(
    "args",
    [
        ["denoise", "--input", "", "--out", "OUT"],
        ["restore", "--task", "inpaint", "--input", "IN", "--mask", " ", "--out", "OUT"],
        ["restore", "--task", "inpaint", "--input", "IN", "--mask-kind", "", "--out", "OUT"],
        ["add-noise", "--input", "IN", "--sigma", "25", "--out", ""],
        ["generate", "--model", "", "--out", "OUT"],
    ],
)
def test_an_empty_option_value_is_one_error_line(
    args: list[str], tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--input ""` (an unset shell variable) would otherwise read the current folder, and `--mask-kind ""` fall
        back to a default: one line, exit 2, nothing written (options left at an empty default, such as bench's
    --methods, are not checked: the bench tests run with them)."""
    from cli_helpers import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    code, _, err = run(args, capsys)
    assert (
        code == 2 and err.strip().startswith("error: --") and "is empty" in err and len(err.strip().splitlines()) == 1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IN"]


def test_register_checks_every_field_up_front() -> None:
    """A bad entry is refused when it is registered (not on its first run), naming each bad field; the built-in
    entries pass the same checks, and JOB_OPTIONS is Job's list of options."""
    import dataclasses

    from tdpm_dip.methods import Job

    assert all(registry.problems(m) == [] for m in registry.METHODS)
    images = {"seeds", "noisy", "clean", "reference", "observed", "operator"}
    assert set(registry.JOB_OPTIONS) == {f.name for f in dataclasses.fields(Job)} - images
    bad = registry.Method(
        "x", "denoise", "blind", "no entry", "h", "1", reads=("no_such_option",), dip="no-such-dip", operators=("zz",)
    )
    with pytest.raises(ValueError) as e:
        registry.register(bad)
    for word in ("reads 'no_such_option'", "operators 'zz'", "dip 'no-such-dip'", "entry 'no entry'"):
        assert word in str(e.value)
    assert "x" not in registry.names("denoise")


def test_an_installed_plugin_adds_its_method_to_every_command(tmp_path) -> None:
    """A package that declares an entry point in the tdpm_dip.plugins group registers its method before the CLI
    builds its choices: `denoise --help` lists it and `denoise --method` runs it; a broken plugin is one warning."""
    site = tmp_path / "site"
    (site / "halfplug-0.1.dist-info").mkdir(parents=True)
    (site / "halfplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: halfplug\nVersion: 0.1\n")
    (site / "halfplug-0.1.dist-info" / "entry_points.txt").write_text(
        "[tdpm_dip.plugins]\nhalf = halfplug\nbroken = halfplug_missing\n"
    )
    (site / "halfplug.py").write_text(
        "from tdpm_dip import registry\n"
        "from tdpm_dip.methods.blind import tweedie\n"
        "def half(ctx, job):\n"
        "    return tweedie(ctx, job)\n"
        "registry.register(registry.Method('tweedie-half', 'denoise', 'blind', 'halfplug:half', 'a plugin', '1'))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": f"{site}:{__import__('os').environ.get('PYTHONPATH', '')}"}
    env["HF_HUB_OFFLINE"] = "1"
    help_run = subprocess.run(
        [sys.executable, "-m", "tdpm_dip.cli", "denoise", "--help"], capture_output=True, text=True, env=env
    )
    assert help_run.returncode == 0 and "tweedie-half" in help_run.stdout, help_run.stderr
    assert "plugin broken (halfplug_missing) not loaded" in help_run.stderr
    from PIL import Image

    from tdpm_dip.models import build_unet, save_ddpm
    from tdpm_dip.noise import make_scheduler

    save_ddpm(build_unet("tiny", seed=0, sample_size=16), make_scheduler("linear"), tmp_path / "m")
    noisy = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noisy.numpy()).save(tmp_path / "n.png")
    args = ["denoise", "--model", tmp_path / "m", "--input", tmp_path / "n.png", "--sigma", "25", "--threads", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "tdpm_dip.cli", *map(str, args), "--method", "tweedie-half", "--out", tmp_path / "o"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0 and (tmp_path / "o" / "tweedie-half" / "n.png").is_file(), run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--seed", "99999999999999999999"],
        ["generate", "--seed", "-1"],
        ["generate", "--n", "100000000"],
        ["train", "--data", "IN", "--seed", "99999999999999999999"],
        ["train-generator", "--data", "IN", "--t-trunc", "3", "--seed", str(2**63)],
        ["denoise", "--input", "IN", "--seed", "-5"],
        ["restore", "--task", "sr", "--input", "IN", "--seed", str(2**62)],
    ],
)
def test_seeds_and_counts_out_of_range_are_one_line_before_any_folder(
    args: list[str], tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command takes seeds 0..2^62 - n (a torch generator overflows above 2^63; file names carry the seed),
    and `generate --n` is bounded (its images are held in memory): one line, exit 2, no --out made."""
    from cli_helpers import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "IN").mkdir()
    code, _, err = run([*args, "--out", "OUT"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --"), err
    assert not (tmp_path / "OUT").exists()

"""The four mutants the project requires its tests to kill, checked one by one (docs/mutation.md); the first in two
forms (inside EpsModel.eps, where every sampler gets it, and in the sampler's loop alone).

mutmut's operators do not write these exact faults (an off-by-one timestep, a dropped rescale, a crop from the wrong
corner), so each is applied here by hand to a copy of src/ and the exact tests (EXACT below) are run against it;
every one must fail. Usage: python tests/mutation/required.py [PYTEST_ARGS...]  (default: EXACT).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The tests that compare the whole path with closed forms on stub noise predictors (tests/by_hand.py), by subject;
# docs/mutation.md names which of them kill which mutant.
EXACT = [
    "tests/test_sampling.py::test_reverse_chain_equals_the_ddpm_posterior_by_hand",
    "tests/test_sampling.py::test_strided_reverse_chain_is_the_posterior_between_its_levels_by_hand",
    "tests/test_sampling.py::test_ddim_between_equals_its_closed_form",
    "tests/test_sampling.py::test_ddim_chain_from_noise_equals_its_closed_form",
    "tests/test_blind.py::test_identity_denoiser_returns_the_clamped_observation",
    "tests/test_blind.py::test_ensemble_averages_fewer_symmetries_on_large_images",
    "tests/test_blind.py::test_tweedie_with_a_linear_eps_per_image_sigma_and_declip",
    "tests/test_blind.py::test_blind_and_paper_ddpm_are_the_chain_by_hand",
    "tests/test_blind.py::test_blind_tdpm_dip_starts_each_chain_from_the_rescaled_dip_output",
    "tests/test_observe.py::test_declip_moves_only_the_pixels_on_the_bounds_outwards",
    "tests/test_native.py::test_run_native_maps_every_pixel_back_to_its_place",
    "tests/test_native.py::test_run_native_pads_an_image_smaller_than_the_networks_multiple",
]

# (name, file under src/tdpm_dip, original text, mutated text): the original must occur exactly once.
MUTANTS = [
    (
        "UNet called at ts + 1 in the reverse chain (EpsModel.eps at timestep level instead of level - 1)",
        "sampling.py",
        "return self.unet(x.to(self.unet.dtype), level - 1).sample.float()",
        "return self.unet(x.to(self.unet.dtype), level).sample.float()",
    ),
    (
        "... and the same fault in the one sampler alone (x0 and eps predicted at level + 1: the UNet at ts + 1)",
        "sampling.py",
        "x0, eps = model.x0_eps(x, hi)",
        "x0, eps = model.x0_eps(x, hi + 1)",
    ),
    (
        "declip: -1.0 + excess instead of -1.0 - excess",
        "methods/observe.py",
        "torch.where(lo, -1.0 - excess, noisy)",
        "torch.where(lo, -1.0 + excess, noisy)",
    ),
    (
        "blind tdpm-dip starts its chains from G(z) without the sqrt(abar_t / abar_T0) rescale",
        "methods/blind.py",
        "return rescale(ctx.scheduler, res.output[idx], t, t0)",
        "return res.output[idx]",
    ),
    (
        "run_native crops the bottom-right corner ([..., -h:, -w:])",
        "methods/dispatch.py",
        "res.images = res.images[..., :h, :w]",
        "res.images = res.images[..., -h:, -w:]",
    ),
]


def run(pytest_args: list[str]) -> int:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="tdpm-required-") as tmp:
        for name, rel, old, new in MUTANTS:
            src = Path(tmp) / "src"
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "weights"))
            os.symlink(ROOT / "src" / "tdpm_dip" / "weights", src / "tdpm_dip" / "weights")
            path = src / "tdpm_dip" / rel
            text = path.read_text()
            if text.count(old) != 1:
                print(f"ERROR  {name}: {rel} no longer holds exactly one {old!r}; update tests/mutation/required.py")
                failures += 1
                continue
            path.write_text(text.replace(old, new))
            env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
            where = subprocess.run(
                [sys.executable, "-c", "import tdpm_dip; print(tdpm_dip.__file__)"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert where.startswith(str(src)), where  # the mutated copy, not the installed package
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *pytest_args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
            if proc.returncode == 1 and failed:
                print(f"killed    {name}\n          by {', '.join(f.split('::')[-1] for f in failed)}")
            else:
                print(f"SURVIVED  {name} (pytest exit code {proc.returncode})\n{proc.stdout[-2000:]}")
                failures += 1
    return failures


if __name__ == "__main__":
    sys.exit(1 if run(sys.argv[1:] or EXACT) else 0)

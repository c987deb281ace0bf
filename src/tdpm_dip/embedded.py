"""The embedded default models: pretrained networks shipped inside the package, one per job.

A new user runs `generate` and `denoise` without `--model`; these resolve to the folders below, read through
the package's resources:

    denoise   ddpm-pokemon64             a 64 px Pokemon DDPM fine-tuned on the denoising levels
    generate  ddpm-sprites32 and         a 32 px sprite DDPM and its amortized TDPM generator G_psi
              tdpm-generator-sprites32

The recipes under `recipes/` rebuild them with the project's own commands, then
`python -m tdpm_dip.embedded export-ddpm RUN/model --name NAME` and `export-generator RUN/generator` write the
fp16 copies shipped here and print the hashes that `EXPECTED_SHA256` pins. Each folder has a model card
(README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .errors import UserError, check_reverse_steps
from .generator import GENERATOR_JSON, load_generator
from .models import LEVELS_FILE, ddpm_fingerprint, load_ddpm, save_ddpm, trained_levels, unet_size
from .outputs import ordinary_modes
from .restoration_net import RESTORER_DIR, RESTORER_JSON, load_restorer, save_restorer

DDPM_NAME = "ddpm-sprites32"
DENOISER_NAME = "ddpm-pokemon64"
GENERATOR_NAME = "tdpm-generator-sprites32"
DEFAULT_DDPM = {"generate": DDPM_NAME, "denoise": DENOISER_NAME}  # the shipped DDPM of each job
BUDGET_BYTES = 40 * 1024 * 1024  # everything under weights/ together: the package stays a small download

# The shipped files and their SHA-256, so that weights changed by accident fail a test
# (tests/test_embedded.py). A deliberate rebuild re-runs the export, which prints the new values.
EXPECTED_SHA256: dict[str, str] = {
    "ddpm-pokemon64/README.md": "87f68f71cf74bccda688552147b53c92f3643d00697c6dbe1e9ff74334a1bcfe",
    "ddpm-pokemon64/model_index.json": "7e17ddab859d83b3fae2b4ee01b86cf154c2195d228c10b75a3b1eca0c6c0d47",
    "ddpm-pokemon64/restorer/config.json": "2ba2102e4f4bda6dea545bfceb4acf21d277500de1f7f1d2fb3e18719516683a",
    "ddpm-pokemon64/restorer/diffusion_pytorch_model.safetensors": "96b89e8d69b62a29e932c7498e1586d7e4d4a03878da6af8bdf1e6955532fa0f",
    "ddpm-pokemon64/restorer/restorer.json": "8c9dd56e1728130fc24fc6c36e91ad76f53d29eca14933cbd506a558d65bf758",
    "ddpm-pokemon64/scheduler/scheduler_config.json": "63485cf37c9cd08f842d111273190054a6ef74620f4d480a417d1588f219f76c",
    "ddpm-pokemon64/unet/config.json": "713954850d8d1e0cace3c4ca236a4ac42afafcb54c91c3f2a0b025c939ae1896",
    "ddpm-pokemon64/unet/diffusion_pytorch_model.safetensors": "c30628a2745e38a6cedac4a6ffa9877f535643bdbe7e2b1c71845581a0aee63e",
    "ddpm-sprites32/README.md": "8ff19ebb46716c4d7cf45974bc83abe297f28606ad0c8ca68783398a4567be4e",
    "ddpm-sprites32/model_index.json": "7e17ddab859d83b3fae2b4ee01b86cf154c2195d228c10b75a3b1eca0c6c0d47",
    "ddpm-sprites32/scheduler/scheduler_config.json": "63485cf37c9cd08f842d111273190054a6ef74620f4d480a417d1588f219f76c",
    "ddpm-sprites32/trained_levels.json": "595cd0af3e5ef9376c610d37a9045c935df85315d3a78120037ad1eaeccbd01a",
    "ddpm-sprites32/unet/config.json": "262c628af72529c20cd8f576e86e9866236d30ad6c1367f44f5dc8c5f4ef3ad8",
    "ddpm-sprites32/unet/diffusion_pytorch_model.safetensors": "af1d7082670b404bac22eaf127cdcac9bd2a552b09f58d221e18920cee892f3e",
    "tdpm-generator-sprites32/README.md": "4a9b5b5f0d791511a160a454eb035be6ec5c13e3046c527a71c87ac7cdba6a92",
    "tdpm-generator-sprites32/config.json": "6af65b37374cebf6eb17504c12efee734dc7bcc2e096a9bceb5b79264d499d5c",
    "tdpm-generator-sprites32/diffusion_pytorch_model.safetensors": "c98ad392d8c743e9ba25ad17b96e5e8edc85f0e017b49b2293c0726599d45214",
    "tdpm-generator-sprites32/generator.json": "dbcb4dea8ff84136fd583b8f580840c7eae217e38bdd7356f1b9ae42d491ba2b",
}


def weights_dir() -> Path:
    return Path(str(resources.files("tdpm_dip") / "weights"))


def default_ddpm(task: str = "generate") -> Path:
    """The shipped DDPM folder of a job (diffusers layout: unet/ + scheduler/)."""
    path = weights_dir() / DEFAULT_DDPM[task]
    if not (path / "unet" / "config.json").is_file():
        raise UserError(f"the embedded default DDPM is missing from this installation ({path}); pass --model")
    return path


def default_size() -> int:
    """Image side of the embedded DDPM, read from its config (no weights loaded)."""
    return unet_size(json.loads((default_ddpm() / "unet" / "config.json").read_text()))


def default_generator() -> Path | None:
    """The shipped TDPM generator folder for `default_ddpm()`, or None when this build ships none."""
    path = weights_dir() / GENERATOR_NAME
    return path if (path / "generator.json").is_file() else None


def resolve_model(model: str | None, task: str = "generate") -> str:
    """`--model` as given, or the job's embedded default DDPM when it is omitted."""
    return str(default_ddpm(task)) if model is None else model


def resolve_generator(model: str | None, generator: str | None) -> str | None:
    """`--generator` as given; with neither `--model` nor `--generator`, the embedded generator when this
    build ships one (it belongs to the embedded DDPM only, so a user's `--model` never gets it)."""
    if generator is not None or model is not None:
        return generator
    shipped = default_generator()
    return str(shipped) if shipped is not None else None


def shipped_files() -> dict[str, Path]:
    """Every file under weights/, keyed by its path relative to it (POSIX separators)."""
    root = weights_dir()
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_ddpm(src: str | Path, dest: Path | None = None, name: str = DDPM_NAME) -> Path:
    """Copy a trained DDPM (diffusers folder, e.g. `tdpm-dip train`'s RUN/model) into the package as `name`, with
    fp16 weights: half the bytes, and loading upcasts them to the dtype the caller asks for."""
    unet, scheduler = load_ddpm(src)
    levels = trained_levels(src, scheduler) if (Path(src) / LEVELS_FILE).is_file() else None
    dest = dest or weights_dir() / name
    _name_as_shipped(unet, f"{dest.name}/unet")
    return _replace_folder(dest, lambda tmp: save_ddpm(unet.half(), scheduler, tmp, levels))


def _name_as_shipped(model: object, name: str) -> None:
    """diffusers writes the folder a model was loaded from into its config.json (`_name_or_path`); a shipped
    copy names its place in the package instead of the path on the machine that exported it."""
    model.register_to_config(_name_or_path=name)  # type: ignore[attr-defined]


def _names_only(record: dict, folders: tuple[str, ...]) -> dict:
    """A training record to ship: its `folders` fields reduced to their last names, since the paths of the machine
    that trained it mean nothing on a user's."""
    return {k: (Path(v).name if k in folders and v else v) for k, v in record.items()}


def _replace_folder(dest: Path, write: Callable[[Path], object]) -> Path:
    """Fill a temporary folder with `write`, then put it in place of `dest` (its model card, README.md, and a
    DDPM's restoration network, restorer/, trained on images alone, stay unless `write` made new ones)."""
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        write(Path(tmp))
        if (dest / "README.md").is_file() and not (Path(tmp) / "README.md").exists():
            shutil.copy2(dest / "README.md", Path(tmp) / "README.md")
        if (dest / RESTORER_DIR).is_dir() and not (Path(tmp) / RESTORER_DIR).exists():
            shutil.copytree(dest / RESTORER_DIR, Path(tmp) / RESTORER_DIR)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(tmp, dest)
    for p in [dest, *dest.rglob("*")]:  # readable by everyone, not the temporary folder's 0700
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def export_generator(
    src: str | Path, dest: Path | None = None, ddpm: str | Path | None = None, reverse_steps: int | None = None
) -> Path:
    """Copy a trained TDPM generator (`tdpm-dip train-generator`'s RUN/generator) into the package with fp16
    weights. Its generator.json keeps every field, but folders are reduced to their names: the paths of
    the machine that trained it mean nothing on a user's.

    `ddpm` pairs it with that DDPM (recorded as its ddpm and ddpm_fingerprint; the one it was trained beside
    stays as trained_with_fingerprint): a GAN generator's target, the training images noised to T_trunc, does
    not involve the DDPM, so it may serve another of the same size; a distilled one may not. `reverse_steps`
    sets the posterior steps from T_trunc that sampling takes."""
    unet, scheduler = load_ddpm(ddpm) if ddpm is not None else (None, None)
    gen = load_generator(src, unet, scheduler)
    info = _names_only(gen.info, ("data", "init"))
    if ddpm is not None:
        assert unet is not None and scheduler is not None
        fp = ddpm_fingerprint(unet, scheduler)  # load_generator refused a distilled generator of another DDPM
        info.update(ddpm=Path(ddpm).name, ddpm_fingerprint=fp, trained_with_fingerprint=info.get("ddpm_fingerprint"))
    if reverse_steps is not None:
        check_reverse_steps(reverse_steps, gen.t_trunc)
        info["reverse_steps"] = reverse_steps
    dest = dest or weights_dir() / GENERATOR_NAME
    _name_as_shipped(gen.unet, dest.name)

    def write(tmp: Path) -> None:
        gen.unet.half().save_pretrained(tmp, safe_serialization=True)
        ordinary_modes(tmp)
        (tmp / GENERATOR_JSON).write_text(json.dumps(info, indent=1) + "\n")

    return _replace_folder(dest, write)


def export_restorer(src: str | Path, name: str = DENOISER_NAME) -> Path:
    """Copy a restoration network (`tdpm-dip train-restorer`'s folder) into the shipped DDPM `name` as its
    restorer/, with fp16 weights; its record keeps every field but the paths of the machine that trained it."""
    net = load_restorer(src)
    record = json.loads((Path(src) / RESTORER_JSON).read_text())
    record = _names_only({k: v for k, v in record.items() if k != "format"}, ("data", "out"))
    dest = weights_dir() / name / RESTORER_DIR
    _name_as_shipped(net, f"{name}/{RESTORER_DIR}")
    if dest.exists():
        shutil.rmtree(dest)
    save_restorer(net.half(), dest, record)
    return dest


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tdpm_dip.embedded",
        description="Maintainers: write the shipped default models into the package.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export-ddpm", help="copy RUN/model into the package as fp16 safetensors")
    ex.add_argument("src", help="a trained DDPM folder (diffusers layout)")
    ex.add_argument(
        "--name", default=DDPM_NAME, choices=sorted(set(DEFAULT_DDPM.values())), help="which shipped DDPM it replaces"
    )
    eg = sub.add_parser("export-generator", help="copy RUN/generator into the package as fp16 safetensors")
    eg.add_argument("src", help="a trained generator folder (tdpm-dip train-generator's RUN/generator)")
    eg.add_argument("--ddpm", help="pair it with this DDPM folder (a GAN generator only; default: its own)")
    eg.add_argument("--reverse-steps", type=int, help="posterior steps from T_trunc when sampling (default: its own)")
    er = sub.add_parser("export-restorer", help="copy a restorer folder into a shipped DDPM as fp16 safetensors")
    er.add_argument("src", help="a restoration network folder (tdpm-dip train-restorer's --out)")
    er.add_argument("--name", default=DENOISER_NAME, choices=sorted(set(DEFAULT_DDPM.values())), help="into which DDPM")
    sub.add_parser("hashes", help="print the EXPECTED_SHA256 entries of the files under weights/")
    args = ap.parse_args(argv)
    if args.cmd == "export-ddpm":
        print(export_ddpm(args.src, name=args.name))
    elif args.cmd == "export-generator":
        print(export_generator(args.src, ddpm=args.ddpm, reverse_steps=args.reverse_steps))
    elif args.cmd == "export-restorer":
        print(export_restorer(args.src, name=args.name))
    files = shipped_files()
    for name, p in files.items():
        print(f'    "{name}": "{sha256(p)}",')
    print(f"# {sum(p.stat().st_size for p in files.values())} bytes in all (budget {BUDGET_BYTES})")


if __name__ == "__main__":
    _main()

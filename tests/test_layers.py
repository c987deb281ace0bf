"""The package's layers (tdpm_dip/__init__.py, docs/design.md): imports point down or sideways, never up, and
form no cycle; every import inside a function is deferred on purpose and says why; `--help` loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tdpm_dip

ROOT = Path(tdpm_dip.__file__).parent
LAYERS = [
    ["errors", "defaults", "registry"],
    ["config", "noise", "devices", "outputs", "images", "operators"],
    ["data", "models", "metrics"],
    ["dip", "sampling", "generator", "restoration_net"],
    ["methods", "training"],
    ["reporting", "embedded", "runtime"],
    ["api"],
    ["workflows"],
    ["cli", "app", "app_ui"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported tdpm_dip module, line, inside a function) for every import of the package in `path`."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".") if module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    inner = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            # `from . import x`: the module x, or (a name defined in the package's __init__) the package itself
            targets = (
                [".".join(base)]
                if node.module
                else [
                    ".".join(base + [a.name])
                    if (ROOT.joinpath(*base, a.name).is_dir() or ROOT.joinpath(*base, a.name + ".py").is_file())
                    else ".".join(base)
                    for a in node.names
                ]
            )
            found += [(t, node.lineno, id(node) in inner) for t in targets]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tdpm_dip"):
            found.append((node.module.removeprefix("tdpm_dip").lstrip("."), node.lineno, id(node) in inner))
    return found


def top(module: str) -> str:
    return module.split(".")[0] if module else ""


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. The package root (tdpm_dip/__init__.py: __version__ and the
    API's lazy exports) stands outside the layers."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        src = module_name(path)
        if src:
            edges.setdefault(src, set()).update(t for t, _, _ in imports(path) if t and t != src)
    return edges


def test_every_module_has_a_layer() -> None:
    missing = {top(m) for m in graph() if top(m) not in LAYER}
    assert not missing, f"modules without a layer: {missing}"


def test_no_import_points_up_a_layer() -> None:
    up = [(src, dst) for src, dsts in graph().items() for dst in dsts if LAYER[top(dst)] > LAYER[top(src)]]
    assert not up, up


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail(
                    "import cycle: "
                    + " -> ".join(path[path.index(nxt) :] + [node, nxt] if nxt in path else path + [node, nxt])
                )
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_imports_inside_functions_say_why() -> None:
    """Module-level imports show the dependency graph; a deferred one carries a comment that explains it."""
    silent = []
    for path in ROOT.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(f):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                        silent.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not silent, silent


@pytest.mark.parametrize("args", [["--help"], ["denoise", "--help"], ["train", "--help"], ["bench", "--help"]])
def test_help_loads_neither_torch_nor_diffusers(args: list[str]) -> None:
    code = (
        "import sys; from tdpm_dip.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"

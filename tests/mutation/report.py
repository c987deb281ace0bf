"""Summarise a mutmut run (counts per module and in total, each mutant not killed with its diff), or reset the
mutants not killed so that the next `mutmut run` retries them. Run in the mutation tree (build/mutation):

    python ../../tests/mutation/report.py [--diffs] [PATTERN...]   # the summary (PATTERNs: mutant-name globs)
    python ../../tests/mutation/report.py --retry-not-killed        # before `mutmut run` (make mutation does it)

mutmut keeps each verdict in mutants/**/*.py.meta and, run without names, tests only mutants without one; a mutant
that survived stays survived after a test is added, unless named again. Statuses are mutmut's own
(mutmut.stats.status_by_exit_code).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "timeout", "suspicious", "skipped", "no tests", "not checked", "other")


def load(patterns: list[str]) -> dict[str, dict[str, str]]:
    """{module: {mutant name: status}} for the mutants matching a pattern (all when there is none)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data["exit_code_by_key"].items():
            if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out[name.partition("__mutmut_")[0].rpartition(".")[0]][name] = status_by_exit_code[code]
    return out


def retry_not_killed() -> None:
    """Forget every verdict but "killed", so that `mutmut run` tests those mutants again."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    n = 0
    for path in walk_mutatable_files():
        if not (Path("mutants") / f"{path}.meta").is_file():
            continue
        m = SourceFileMutationData(path=path)
        m.load()
        for name, code in m.exit_code_by_key.items():
            if code is not None and status_by_exit_code[code] != "killed":
                m.exit_code_by_key[name] = None
                n += 1
        m.save()
    print(f"{n} mutants not killed before will be tested again")


def _row(label: str, c: Counter) -> str:
    n = sum(c.values())
    checked = n - c["not checked"]
    rate = f"{100 * c['killed'] / checked:.1f} %" if checked else "-"
    return f"{label:34}" + "".join(f"{c[col]:>9}" for col in COLUMNS) + f"{n:>7}{rate:>9}"


def main(argv: list[str]) -> None:
    if argv == ["--retry-not-killed"]:
        retry_not_killed()
        return
    diffs = "--diffs" in argv
    by_module = load([a for a in argv if a != "--diffs"])
    total: Counter = Counter()
    print(f"{'module':34}" + "".join(f"{c[:8]:>9}" for c in COLUMNS) + f"{'total':>7}{'killed':>9}")
    for module, mutants in sorted(by_module.items()):
        c = Counter(s if s in COLUMNS else "other" for s in mutants.values())
        total += c
        print(_row(module, c))
    print(_row("TOTAL", total))
    bad = [(n, s) for m in by_module.values() for n, s in sorted(m.items()) if s not in ("killed", "not checked")]
    if bad:
        print(f"\nnot killed ({len(bad)}):")
        for name, status in bad:
            print(f"  {status:12} {name}")
            if diffs:
                from mutmut.mutation.diff_apply import get_diff_for_mutant

                print("    " + "\n    ".join(get_diff_for_mutant(name).splitlines()[2:]))


if __name__ == "__main__":
    main(sys.argv[1:])

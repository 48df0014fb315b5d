"""The mutation score of the fast suite over `workflow/` and `service/`, from a finished mutmut run.

    make mutation        # runs mutmut in .mutation/, then this: writes bench/results/mutation.md

Score = (killed + timed out + listed as equivalent) / all mutants. A surviving mutant is either killed
by a test or listed in `tests/mutation_equivalents.toml` with the reason it cannot change behaviour;
this exits 1 below the target, or when a listed mutant no longer survives (the list is kept exact).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

from _common import RESULTS, ROOT, machine

TARGET = 0.95
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.toml"
CAUGHT = {"killed", "timeout"}


def statuses(workdir: Path) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            found[name] = status
    return found


def main() -> int:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".mutation").resolve()
    found = statuses(workdir)
    equivalents: dict[str, str] = tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", {})
    counts = Counter(found.values())
    survivors = sorted(name for name, status in found.items() if status not in CAUGHT)
    unexplained = [name for name in survivors if name not in equivalents]
    stale = sorted(name for name in equivalents if found.get(name) in CAUGHT or name not in found)
    caught = sum(counts[s] for s in CAUGHT) + len(set(survivors) & set(equivalents))
    score = caught / len(found) if found else 0.0
    by_module = Counter(name.split(".x")[0] for name in unexplained)

    lines = [
        "# Mutation score: the fast suite over workflow/ and service/",
        "",
        f"Machine: {machine()}",
        "Command: `make mutation` (mutmut over `functions/batch_api/workflow/` and `service/`; tests: unit, the",
        "contract suite on the memory and local adapters, and the bad-input catalogue)",
        "",
        f"**Score {score:.1%}** (target {TARGET:.0%}): {len(found)} mutants; "
        + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        + f"; {len(set(survivors) & set(equivalents))} of the survivors listed as equivalent "
        f"(`tests/mutation_equivalents.toml`, with reasons).",
        "",
    ]
    if unexplained:
        lines += ["Survivors not yet killed or explained, by module:", ""]
        lines += [f"- `{module}`: {n}" for module, n in by_module.most_common()]
        lines.append("")
    (RESULTS / "mutation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    for name in unexplained:
        print(f"  survived: {name}")
    for name in stale:
        print(f"  listed as equivalent, but caught now (or gone): {name}")
    return 0 if score >= TARGET and not stale else 1


if __name__ == "__main__":
    sys.exit(main())

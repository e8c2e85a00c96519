"""Per-module mutation scores from mutmut's results in ./mutants (run by tools/mutation.sh).

Prints the Markdown table docs/testing.md carries: mutants, killed, survived, other (no tests,
suspicious) and the score, killed / mutants, where a timeout or a crash counts as killed. Mutants
that were not run (models/ira_cnn.py outside IRAHead's gradient) are not counted.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "segfault"}


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/: run tools/mutation.sh first", file=sys.stderr)
        return 1
    print("| module | mutants | killed | survived | other | score |")
    print("|---|---:|---:|---:|---:|---:|")
    total = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"].values()
        c = Counter(status_by_exit_code[v] for v in codes if v is not None)  # None: not run
        if not c:
            continue
        n, killed, survived = sum(c.values()), sum(c[s] for s in KILLED), c["survived"]
        total.update(n=n, killed=killed, survived=survived)
        module = meta.relative_to(root).as_posix().removesuffix(".meta")
        print(f"| {module} | {n} | {killed} | {survived} | {n - killed - survived} | {100 * killed / n:.1f} % |")
    n, killed, survived = total["n"], total["killed"], total["survived"]
    print(f"| all | {n} | {killed} | {survived} | {n - killed - survived} | {100 * killed / n:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

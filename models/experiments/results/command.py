"""``valve-model results <table>``: plan the runs the table needs, run what is not cached, then rewrite the
table's section of the doc and ``RUNS/<table>.json``. The whole story: the package's docstring.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

from models.experiments.results.doc import machine, preamble, write_section
from models.experiments.results.protocol import (
    DEFAULT_DATA_ROOT,
    TABLES,
    ResultsError,
    ResultsOptions,
    dataset_names,
    needs,
)
from models.experiments.results.runs import Executor, load_metrics, plan_steps, tail, train_seconds
from models.experiments.results.tables import BUILDERS

PROG = "valve-model results"


def results(s: ResultsOptions, out=None) -> int:
    """Run what the table needs, then rewrite its section and RUNS/<table>.json. Returns an exit code."""
    out = out or sys.stdout
    t_start = time.perf_counter()
    info = machine()

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    if s.epochs is not None:
        say("=" * 78)
        say(f"SMOKE RUN: --epochs {s.epochs} overrides the protocol ("
            + ", ".join(f"{ds} {s.proto(ds)['protocol_epochs']} epochs" for ds in s.datasets)
            + "). The numbers are NOT results.")
        say("=" * 78)
    chains = needs(s)
    runs = [r for r, _ in chains]
    if s.dry_run:
        for run, methods in chains:
            for step in plan_steps(s, run, methods):
                what = {"done": "cached", "resume": "resume", "new": "run", "conflict": "CONFLICT"}[step.state]
                say(f"{what:8} {step.label}  ({step.detail})")
                if step.state in ("new", "resume"):
                    say(f"         {shlex.join(['valve-model', *step.args])}")
                elif step.state == "conflict":
                    say(f"         remove {s.run_dir(run)} or choose another --runs")
        return 0

    executor = Executor(s.jobs, out)
    planned = [plan_steps(s, run, methods) for run, methods in chains]
    executor.total = sum(1 for steps in planned for x in steps if x.state != "done")
    cached = sum(1 for steps in planned for x in steps if x.state == "done")
    say(f"{s.table}: {len(runs)} runs; {executor.total} steps to run, {cached} cached; {s.jobs} job(s) at once")
    try:
        outcomes = executor.run_all(s, chains)
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted; run the same command again to continue (finished runs are kept, "
            "interrupted trainings resume)")
        return 130
    failed = [o for o in outcomes if not o.ok and not o.blocked]
    if failed:
        for o in failed:
            if o.step.state == "conflict":
                say(f"FAILED: {o.step.label}: {o.step.detail}; remove that run directory or choose another --runs")
            else:
                say(f"FAILED: {o.step.label} (exit {o.code}); log: {o.step.log}\n{tail(o.step.log)}")
        blocked = [o for o in outcomes if o.blocked]
        for o in blocked:
            say(f"not run: {o.step.label} (after {o.blocked})")
        say(f"{PROG}: {len(failed)} step(s) failed, {len(blocked)} not run; the section of {s.doc} is unchanged")
        return 1

    try:
        body, numbers = BUILDERS[s.table](s)
    except (ResultsError, KeyError, OSError) as exc:
        say(f"{PROG}: error: cannot build {s.table}: {exc!r}")
        return 1
    ran = [o for o in outcomes if not o.skipped]
    evals = {(r, m) for r, methods in chains for m in methods}
    timing = {
        "train_seconds": sum(train_seconds(s, r) for r in runs), "train_runs": len(runs),
        "eval_seconds": sum(float(load_metrics(s, r, m).get("seconds") or 0.0) for r, m in evals),
        "eval_reports": len(evals),
        "ran_train": sum(1 for o in ran if o.step.kind == "train"),
        "ran_eval": sum(1 for o in ran if o.step.kind == "evaluate"),
        "ran_seconds": {o.step.label: round(o.seconds, 1) for o in ran},
        "elapsed": time.perf_counter() - t_start,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    text = "\n".join(preamble(s, info, timing, runs) + body)
    write_section(s.doc, s.table, text)
    s.runs.mkdir(parents=True, exist_ok=True)
    json_path = s.runs / (f"{s.table}.json" if s.epochs is None else f"{s.table}-e{s.epochs}.json")
    payload = {"table": s.table, "command": s.command, "smoke": s.epochs is not None, "seeds": s.seeds,
               "split_seed": 0, "protocol": {ds: s.proto(ds) for ds in s.datasets}, "machine": info,
               "timing": timing, "runs": {r.label: str(s.run_dir(r)) for r in runs}, "datasets": numbers}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"wrote the {s.table} section of {s.doc} and {json_path} ({timing['elapsed']:.0f} s)")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, not {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate what one table of docs/results.md needs (cached), then "
                               "rewrite that table's section and RUNS/<table>.json.",
        epilog="Quick smoke run: --datasets kolektorsdd --seeds 0 --epochs 1 --runs /tmp/results-smoke "
               "--doc /tmp/results-smoke/results.md")
    p.add_argument("table", choices=TABLES, help="table3: classification with IAM; table6: attention ablation; "
                   "table4: saliency segmentation (CAM, Grad-CAM, Grad-CAM++); figures: correct/wrong overlays")
    p.add_argument("--runs", default="runs/results", help="where the runs go (default runs/results)")
    p.add_argument("--doc", default="docs/results.md", help="the Markdown file to update (default docs/results.md)")
    p.add_argument("--datasets", help=f"comma-separated, from {', '.join(dataset_names())} (default all)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="training seeds (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2, help="trainings/evaluations at once (default 2)")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs (smoke runs; not results)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help=f"default {DEFAULT_DATA_ROOT}")
    p.add_argument("--dry-run", action="store_true", help="print what would run and what is cached, then stop")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    known = dataset_names()
    datasets = known if not args.datasets else [x.strip() for x in args.datasets.split(",") if x.strip()]
    unknown = [d for d in datasets if d not in known]
    if unknown or not datasets:
        print(f"{PROG}: error: unknown --datasets {', '.join(unknown) or '(none)'}: choose from "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        print(f"{PROG}: error: --jobs and --epochs must be at least 1", file=sys.stderr)
        return 2
    s = ResultsOptions(table=args.table, runs=Path(args.runs).resolve(), doc=Path(args.doc).resolve(),
                       datasets=datasets, seeds=args.seeds, jobs=args.jobs, epochs=args.epochs,
                       data_root=Path(args.data_root), dry_run=args.dry_run, argv=argv)
    return results(s)

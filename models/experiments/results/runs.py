"""The runs behind the tables: whether each training and evaluation is cached, the steps still to run, and
the subprocesses that run them (``python -m models.cli train|evaluate``, at most ``jobs`` at once).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from models.experiments.results.protocol import REPO, ResultsError, ResultsOptions, Run

# ---------------------------------------------------------------------------------------------
# cache states


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                out.append(json.loads(line))
    return out


def config_diffs(cfg: dict, run: Run, proto: dict, data_path: Path) -> list[str]:
    """How a run's config.json differs from what the protocol asks (epochs not included)."""
    t, d = cfg.get("train", {}), cfg.get("data", {})
    want = {"preset": proto["preset"], "attention": run.attention, "input_size": run.input_size,
            "batch_size": proto["batch_size"], "lr": proto["lr"], "val_fraction": proto["val_fraction"],
            "seed": run.seed, "balance": proto["balance"], "augment": proto["augment"]}
    diffs = [f"{k} {t.get(k)!r} (protocol: {v!r})" for k, v in want.items() if t.get(k) != v]
    if d.get("format") != proto["train_format"]:
        diffs.append(f"format {d.get('format')!r} (protocol: {proto['train_format']!r})")
    if d.get("path") != str(data_path):
        diffs.append(f"data {d.get('path')!r} (protocol: {str(data_path)!r})")
    return diffs


def train_state(run_dir: Path, run: Run, proto: dict, data_path: Path) -> tuple[str, str]:
    """("done" | "resume" | "new" | "conflict", detail) of a run directory."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return "new", "no run yet"
    cfg = read_json(cfg_path)
    if cfg is None:
        return "conflict", f"{cfg_path} is unreadable"
    diffs = config_diffs(cfg, run, proto, data_path)
    if diffs:
        return "conflict", f"{run_dir} was trained with other settings: " + "; ".join(diffs)
    done = max((int(r.get("epoch", 0)) for r in read_log(run_dir / "log.jsonl")), default=0)
    planned = cfg.get("train", {}).get("epochs")
    if done > run.epochs or (done == run.epochs and planned != run.epochs):
        return "conflict", f"{run_dir} holds {done} epochs of a run planned for {planned}, the protocol wants {run.epochs}"
    if done == run.epochs and (run_dir / "model.safetensors").is_file():
        return "done", f"{done} epochs"
    if done >= 1 and (run_dir / "train_state.pt").is_file() and (run_dir / "last.safetensors").is_file():
        return "resume", f"at epoch {done} of {run.epochs}"
    return "new", "restart (nothing to resume)"


def report_dir(run_dir: Path, method: str) -> Path:
    return run_dir / f"eval-{method}"


def eval_state(run_dir: Path, method: str, proto: dict) -> tuple[str, str]:
    """("done" | "new", detail): done when metrics.json is newer than the weights, same method and format."""
    rep, weights = report_dir(run_dir, method), run_dir / "model.safetensors"
    m = rep / "metrics.json"
    if not (m.is_file() and (rep / "saliency_grid.png").is_file() and weights.is_file()):
        return "new", "no report"
    if m.stat().st_mtime_ns <= weights.stat().st_mtime_ns:
        return "new", "weights newer than the report"
    metrics = read_json(m)
    if metrics is None or metrics.get("saliency") != method or metrics.get("data", {}).get("format") != proto[
            "test_format"]:
        return "new", "report of another method or format"
    return "done", "cached"


# ---------------------------------------------------------------------------------------------
# steps and their execution


@dataclass
class Step:
    kind: str  # "train" or "evaluate"
    label: str
    args: list[str]  # after `python -m models.cli`
    log: Path
    state: str = "new"
    detail: str = ""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "models.cli", *self.args]


@dataclass
class Outcome:
    step: Step
    ok: bool
    code: int | None
    seconds: float
    skipped: bool = False  # not run: cached
    blocked: str = ""  # not run because an earlier step failed


def plan_steps(s: ResultsOptions, run: Run, methods: Sequence[str]) -> list[Step]:
    """The steps of one run (cached ones included, with state "done")."""
    proto, data = s.proto(run.dataset), s.data_path(run.dataset)
    rd = s.run_dir(run)
    state, detail = train_state(rd, run, proto, data)
    common = ["--epochs", str(run.epochs), "--threads", str(proto["threads"])]
    if state == "resume":
        args = ["train", "--out", str(rd), "--resume", *common]
    else:
        args = ["train", "--format", proto["train_format"], "--data", str(data), "--out", str(rd),
                "--preset", proto["preset"], "--attention", run.attention, "--input-size", str(run.input_size),
                "--seed", str(run.seed), "--val-fraction", str(proto["val_fraction"]),
                "--batch-size", str(proto["batch_size"]), "--lr", str(proto["lr"]), *common]
        if proto["balance"]:
            args.append("--balance")
        if not proto["augment"]:
            args.append("--no-augment")
        # the directory holds at least train.log; "new" means no config.json or nothing to resume, and
        # --force removes only the files a run writes (a conflicting run never gets here)
        args.append("--force")
    steps = [Step("train", f"train {run.label}", args, rd / "train.log", state, detail)]
    for method in methods:
        est, edetail = eval_state(rd, method, proto) if state == "done" else ("new", "after training")
        steps.append(Step("evaluate", f"evaluate {run.label} {method}",
                          ["evaluate", "--run", str(rd), "--format", proto["test_format"], "--data", str(data),
                           "--saliency", method, "--out", str(report_dir(rd, method)),
                           "--threads", str(proto["threads"])],
                          rd / f"eval-{method}.log", est, edetail))
    return steps


class Executor:
    """Runs the steps of several runs, at most ``jobs`` subprocesses at once; steps of one run in order."""

    def __init__(self, jobs: int, out=None):
        self.jobs = jobs
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.cancelled = threading.Event()
        self.started = 0
        self.total = 0

    def say(self, msg: str) -> None:
        with self.lock:
            print(msg, file=self.out, flush=True)

    def env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
        return env

    def run_step(self, step: Step, threads: int) -> Outcome:
        step.log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            self.started += 1
            n = self.started
        self.say(f"[{n}/{self.total}] {step.label}: {'resuming ' + step.detail if step.state == 'resume' else 'started'}"
                 f" (log {step.log})")
        t0 = time.perf_counter()
        with step.log.open("a") as log:
            log.write(f"\n===== {dt.datetime.now().isoformat(timespec='seconds')} {shlex.join(step.command)}\n")
            log.flush()
            proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, env=self.env(threads))
            with self.lock:
                self.procs[proc.pid] = proc
            try:
                code = proc.wait()
            finally:
                with self.lock:
                    self.procs.pop(proc.pid, None)
        seconds = time.perf_counter() - t0
        ok = code == 0
        self.say(f"[{n}/{self.total}] {step.label}: {'done' if ok else f'FAILED (exit {code})'} in {seconds:.0f} s")
        return Outcome(step, ok, code, seconds)

    def run_chain(self, s: ResultsOptions, run: Run, methods: Sequence[str]) -> list[Outcome]:
        """Lock the run (another `results` process may work on it), re-plan, run what is not cached."""
        lock_path = s.runs / run.dataset / f".{run.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        outcomes: list[Outcome] = []
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            threads = s.proto(run.dataset)["threads"]
            steps = plan_steps(s, run, methods)
            for i, step in enumerate(steps):
                if step.state == "done":
                    outcomes.append(Outcome(step, True, 0, 0.0, skipped=True))
                    continue
                if step.state == "conflict":
                    outcomes.append(Outcome(step, False, None, 0.0))
                    outcomes += [Outcome(x, False, None, 0.0, blocked=step.label) for x in steps[i + 1:]]
                    break
                if self.cancelled.is_set():
                    outcomes += [Outcome(x, False, None, 0.0, blocked="interrupted") for x in steps[i:]]
                    break
                if step.kind == "evaluate" and step.detail == "after training":
                    step.state, step.detail = eval_state(s.run_dir(run), step.args[step.args.index("--saliency") + 1],
                                                         s.proto(run.dataset))
                    if step.state == "done":
                        outcomes.append(Outcome(step, True, 0, 0.0, skipped=True))
                        continue
                o = self.run_step(step, threads)
                outcomes.append(o)
                if not o.ok:
                    outcomes += [Outcome(x, False, None, 0.0, blocked=step.label) for x in steps[i + 1:]]
                    break
        return outcomes

    def run_all(self, s: ResultsOptions, chains: list[tuple[Run, Sequence[str]]]) -> list[Outcome]:
        results: list[Outcome] = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(self.run_chain, s, run, methods) for run, methods in chains]
            try:
                for f in futures:
                    results += f.result()
            except KeyboardInterrupt:
                self.cancelled.set()
                with self.lock:
                    procs = list(self.procs.values())
                for p in procs:  # only the subprocesses this command started
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
                raise
        return results


def tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def load_metrics(s: ResultsOptions, run: Run, method: str) -> dict:
    m = read_json(report_dir(s.run_dir(run), method) / "metrics.json")
    if m is None:
        raise ResultsError(f"no metrics in {report_dir(s.run_dir(run), method)}")
    return m


def train_seconds(s: ResultsOptions, run: Run) -> float:
    return float(sum(r.get("seconds") or 0.0 for r in read_log(s.run_dir(run) / "log.jsonl")))

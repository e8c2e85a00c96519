"""Why the compact IRA-CNN learns Magnetic-tile slower per step, and costs more per step, than a plain CNN.

A probe, not the training recipe (that is ``valve-model train``): side-by-side candidates trained for
N class-balanced steps on the Magnetic-tile training part of the paper split (:func:`models.real_data.
paper_split`, seed 0, ratio 0.4), inputs by the project's input policy (``models.images.read_image``:
letterbox to S x S, S = 192), scored by balanced accuracy (mean per-class recall) on the test part,
in eval mode and in eval mode after recomputing the BatchNorm statistics. Every candidate of a seed sees
the same batches (same init seed, same draws) so that the comparison is paired. Guide:
docs/trainability.md.

    python -m models.experiments.trainability train  --candidates plain,ira-gap --seeds 0 --steps 400
    python -m models.experiments.trainability timing --threads 2
    python -m models.experiments.trainability report --results runs/trainability --json docs/trainability.json

Batches: each of the B draws picks a class uniformly, then an image of it uniformly (with replacement),
then a random horizontal and vertical flip. Optimiser: Adam, lr 1e-3 (the paper's), optional schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.images import read_image
from models.ira_cnn import PIXEL_MEAN, PIXEL_STD, IRAHead, build_model, count_parameters, preset_config
from models.real_data import DATASETS, paper_split

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "magnetic-tile"
DEFAULT_RESULTS = Path("runs/trainability")
DEFAULT_CACHE = Path("cache/trainability")


# ---------------------------------------------------------------------------------------------
# data


def load_arrays(data: Path, size: int, cache: Path | None) -> dict:
    """Train and test images (N, 1, S, S) uint8 with labels, of the default paper split; cached as .npz."""
    path = None if cache is None else Path(cache) / f"magnetic-tile-split0-{size}.npz"
    if path is not None and path.is_file():
        z = np.load(path, allow_pickle=False)
        return {k: z[k] for k in z.files} | {"classes": [str(c) for c in z["classes"]]}
    full = DATASETS["magnetic-tile"](Path(data))
    train, test = paper_split(full, 0, 0.4)
    out = {}
    for part, samples in (("train", train), ("test", test)):
        out[f"x_{part}"] = np.stack([read_image(s.path, size) for s in samples])[:, None]
        out[f"y_{part}"] = np.array([s.label for s in samples], dtype=np.int64)
    out["classes"] = np.array(full.classes)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
    return out | {"classes": list(full.classes)}


class BalancedBatches:
    """Seeded class-balanced batches with random flips: batch i of seed s is the same for every model."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, seed: int, flips: bool = True) -> None:
        self.x, self.y, self.batch, self.flips = torch.from_numpy(x), y, batch, flips
        self.by_class = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
        self.rng = np.random.default_rng([seed, 7])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.rng.integers(len(self.by_class), size=self.batch)
        idx = np.array([self.by_class[c][self.rng.integers(len(self.by_class[c]))] for c in cls])
        x = self.x[idx].clone()
        if self.flips:
            h, v = self.rng.random(self.batch) < 0.5, self.rng.random(self.batch) < 0.5
            x[torch.from_numpy(h)] = x[torch.from_numpy(h)].flip(-1)
            x[torch.from_numpy(v)] = x[torch.from_numpy(v)].flip(-2)
        return x, torch.from_numpy(self.y[idx])


# ---------------------------------------------------------------------------------------------
# models


class PlainCNN(nn.Module):
    """The lead's baseline: 4 stages of (3x3 conv-BN-ReLU) x 2 + 2x2 max-pool, 8-16-32-64, GMP, FC K (74 k)."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (8, 16, 32, 64), ira_head: bool = False) -> None:
        super().__init__()
        layers, c = [], 1
        for w in widths:
            for c_in in (c, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        self.ira_head = IRAHead(c, 12, 64, num_classes, "gap", 0.3) if ira_head else None
        if self.ira_head is not None:  # the IRA-CNN's head initialisation
            for m in self.ira_head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.ira_head.fc3.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(torch.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
        f = self.body(x)
        if self.ira_head is not None:
            return self.ira_head(f)
        return self.fc(torch.flatten(f, 2).amax(dim=2))


class LinearGMPHead(nn.Module):
    """Diagnostic: the plain CNN's head (GMP -> one Linear) on the IRA-CNN's features."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(f, 2).amax(dim=2))


@dataclass(frozen=True)
class Candidate:
    """One model + recipe: ``arch`` plain or ira; the IRA-CNN config overrides; schedule; precision."""

    name: str
    arch: str = "ira"
    head_pool: str = "gap"
    width: float = 0.125
    schedule: str = "none"  # none | cosine (linear warm-up 5 %, cosine to 0)
    bf16: bool = False  # torch.autocast("cpu", bfloat16) in the training step
    channels_last: bool = False
    attention: str = "iam"
    dropout: float = 0.3  # the compact preset's head dropout
    describe: str = ""

    def build(self, num_classes: int) -> nn.Module:
        if self.arch == "plain":
            return PlainCNN(num_classes, ira_head=self.head_pool == "ira-head")
        cfg = preset_config("compact", self.attention, width=self.width, head_pool=self.head_pool,
                            dropout=self.dropout, classes=tuple(f"c{i}" for i in range(num_classes)))
        model = build_model(cfg)
        if self.head_pool == "gmp" and self.arch == "ira-linear":
            model.classifier = LinearGMPHead(cfg.block_channels[-1], num_classes)
        return model


CANDIDATES = {c.name: c for c in [
    Candidate("plain", arch="plain", describe="8-16-32-64 double-conv CNN, pool after each stage, GMP head"),
    Candidate("ira-gap", describe="compact IRA-CNN as is (width 0.125, GAP head)"),
    Candidate("ira-gmp", head_pool="gmp", describe="compact, global max pool head"),
    Candidate("ira-mix", head_pool="mix", describe="compact, sigmoid(a) GMP + (1-sigmoid(a)) GAP head"),
    Candidate("ira-flatten", head_pool="flatten", describe="compact, the paper's flatten head (24*24*32 -> 64)"),
    Candidate("plain-irahead", arch="plain", head_pool="ira-head",
              describe="diagnostic: the plain CNN with the IRA-CNN's head (GAP, FC 64-64-K, dropout 0.3)"),
    Candidate("ira-gmp-linear", arch="ira-linear", head_pool="gmp",
              describe="diagnostic: the IRA-CNN's features with the plain CNN's head (GMP -> Linear K)"),
    Candidate("ira-gap-noattn", attention="none", describe="diagnostic: GAP head, no attention (not the paper)"),
    Candidate("ira-gap-d0", dropout=0.0, describe="compact GAP head without dropout"),
    Candidate("ira-gap-cos", schedule="cosine", describe="compact GAP head, warm-up + cosine LR"),
    Candidate("ira-gmp-cos", head_pool="gmp", schedule="cosine", describe="GMP head, warm-up + cosine LR"),
    Candidate("ira-mix-cos", head_pool="mix", schedule="cosine", describe="mix head, warm-up + cosine LR"),
    Candidate("ira-w25-gmp", head_pool="gmp", width=0.25, describe="width 0.25 (8, 16/32/64), GMP head"),
    Candidate("ira-w25-gap", width=0.25, describe="width 0.25, GAP head"),
    Candidate("ira-gmp-bf16", head_pool="gmp", bf16=True, describe="GMP head, bf16 autocast training"),
    Candidate("ira-gmp-cl", head_pool="gmp", channels_last=True, describe="GMP head, channels_last"),
    Candidate("ira-gap-bf16", bf16=True, describe="GAP head, bf16 autocast training"),
    Candidate("ira-gap-cl", channels_last=True, describe="GAP head, channels_last"),
    Candidate("ira-gap-cl-bf16", channels_last=True, bf16=True, describe="GAP head, channels_last + bf16"),
    Candidate("plain-bf16", arch="plain", bf16=True, describe="plain CNN, bf16 autocast"),
]}


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "none":
        return 1.0
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, channels_last: bool = False, batch: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append(model(xb).argmax(dim=1).numpy())
    return np.concatenate(out)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    recalls = [float((pred[y == c] == c).mean()) for c in range(num_classes) if (y == c).any()]
    return float(np.mean(recalls)), recalls


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: BalancedBatches, n_batches: int, channels_last: bool) -> nn.Module:
    """A copy whose BatchNorm running statistics are the exact average over ``n_batches`` balanced
    training batches (momentum None = cumulative mean), the weights untouched."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    for _ in range(n_batches):
        x, _ = batches.next()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        m(x)
    return m.eval()


def test_subset(y: np.ndarray, good: int, seed: int = 0) -> np.ndarray:
    """All defect test images and ``good`` of the (952 * 0.6) good ones: balanced accuracy is a mean of
    per-class recalls, so fewer good images change its noise, not its expectation. 0 = all."""
    idx = np.arange(len(y))
    if good <= 0:
        return idx
    g = idx[y == 0]
    keep = np.sort(np.random.default_rng(seed).choice(g, size=min(good, len(g)), replace=False))
    return np.sort(np.concatenate([idx[y != 0], keep]))


# ---------------------------------------------------------------------------------------------
# training


def train_one(cand: Candidate, arrays: dict, steps: int, seed: int, batch: int, lr: float,
              eval_at: Sequence[int], test_good: int, recal_batches: int) -> dict:
    k = len(arrays["classes"])
    torch.manual_seed(seed)
    model = cand.build(k)
    if cand.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = BalancedBatches(arrays["x_train"], arrays["y_train"], batch, seed)
    sub = test_subset(arrays["y_test"], test_good)
    x_test, y_test = arrays["x_test"][sub], arrays["y_test"][sub]
    loss_fn = nn.CrossEntropyLoss()
    losses, step_times, evals = [], [], []
    t_train = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(cand.schedule, step, steps)
        x, y = batches.next()
        t0 = time.perf_counter()
        if cand.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model.train()
        with autocast(cand.bf16):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        t_train += dt
        step_times.append(dt)
        losses.append(loss.item())
        if step + 1 in eval_at or step + 1 == steps:
            ev = {"step": step + 1, "train_loss_last50": float(np.mean(losses[-50:]))}
            acc, rec = balanced_accuracy(y_test, predict(model, x_test, cand.channels_last), k)
            ev |= {"bal_acc_eval": acc, "recalls_eval": rec}
            recal = recalibrate_bn(model, BalancedBatches(arrays["x_train"], arrays["y_train"], batch, 10_000 + seed,
                                                         flips=False), recal_batches, cand.channels_last)
            acc2, rec2 = balanced_accuracy(y_test, predict(recal, x_test, cand.channels_last), k)
            ev |= {"bal_acc_recal": acc2, "recalls_recal": rec2}
            if hasattr(getattr(model, "classifier", None), "alpha"):
                ev["head_gmp_weight"] = float(torch.sigmoid(model.classifier.alpha))
            evals.append(ev)
            print(f"  {cand.name} seed {seed} step {step + 1}: loss {ev['train_loss_last50']:.3f} "
                  f"bal.acc eval {acc:.3f} recal {acc2:.3f}", flush=True)
    return {"candidate": cand.name, "describe": cand.describe, "seed": seed, "steps": steps, "batch": batch,
            "lr": lr, "schedule": cand.schedule, "bf16": cand.bf16, "channels_last": cand.channels_last,
            "params": count_parameters(model), "threads": torch.get_num_threads(),
            "s_per_step": t_train / steps, "s_per_step_median": float(np.median(step_times[5:] or step_times)),
            "train_seconds": t_train, "n_test": int(len(sub)), "test_good": test_good,
            "recal_batches": recal_batches, "evals": evals, "final": evals[-1], "machine": machine()}


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------------------------
# per-block timing


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, PlainCNN):
        stages, cur, i = [], [], 0
        for m in model.body:
            cur.append(m)
            if isinstance(m, nn.MaxPool2d):
                stages.append((f"stage{i + 1}", nn.Sequential(*cur)))
                cur, i = [], i + 1
        return stages + [("head", _PlainHead(model.fc))]
    parts = [("stem", model.stem)]
    for b in ("block1", "block2", "block3"):
        blk = getattr(model, b)
        parts += [(f"{b}.proj", blk.proj), (f"{b}.res1", blk.res1), (f"{b}.res2", blk.res2)]
        if isinstance(blk.attn, nn.Identity):
            parts.append((f"{b}.attn", blk.attn))
        else:
            parts += [(f"{b}.attn.channel", blk.attn.channel),
                      (f"{b}.attn.spatial", _SpatialResidual(blk.attn.spatial))]
        parts.append((f"{b}.pool", blk.pool))
    return parts + [("head", model.classifier)]


class _PlainHead(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(f, 2).amax(dim=2))


class _SpatialResidual(nn.Module):
    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.gate(m) * m + m


def time_parts(model: nn.Module, batch: int, size: int, reps: int, bf16: bool, channels_last: bool) -> dict:
    """Forward+backward milliseconds of each part on its real input (train mode), and of a whole
    training step (forward, loss, backward, Adam): the minimum of ``reps`` (the machine is shared; the
    minimum is the cost without interference)."""
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    for _ in range(2):  # warm-up: first-touch allocations and kernel selection are not the model's cost
        with autocast(bf16):
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    h = (x.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    out = {}
    for name, part in _parts(model):
        inp = h.detach().requires_grad_(name not in ("stem", "stage1"))
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            with autocast(bf16):
                o = part(inp)
            o.float().sum().backward()
            ts.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out[name] = 1000 * float(np.min(ts[1:]))
        with torch.no_grad(), autocast(bf16):
            h = part(h).float()
        if channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randint(0, 6, (batch,))
    xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        with autocast(bf16):
            loss = nn.functional.cross_entropy(model(xs).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t0)
    out["step_total"] = 1000 * float(np.min(ts[1:]))
    return out


def timing(candidates: Sequence[str], threads_list: Sequence[int], batch: int, size: int, reps: int) -> list[dict]:
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for name in candidates:
            cand = CANDIDATES[name]
            torch.manual_seed(0)
            model = cand.build(6)
            ms = time_parts(model, batch, size, reps, cand.bf16, cand.channels_last)
            rows.append({"candidate": name, "threads": threads, "batch": batch, "size": size, "bf16": cand.bf16,
                         "channels_last": cand.channels_last, "params": count_parameters(model), "ms": ms,
                         "machine": machine()})
            parts = sum(v for k, v in ms.items() if k != "step_total")
            print(f"{name:14s} threads {threads}: step {ms['step_total']:7.0f} ms (parts sum {parts:.0f})", flush=True)
            for k, v in ms.items():
                if k != "step_total":
                    print(f"    {k:20s} {v:8.1f} ms  {100 * v / parts:5.1f} %")
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def load_results(folder: Path) -> tuple[list[dict], list[dict]]:
    runs, timings = [], []
    for p in sorted(Path(folder).glob("*.json")):
        obj = json.loads(p.read_text())
        (timings if p.name.startswith("timing") else runs).extend(obj if isinstance(obj, list) else [obj])
    return runs, timings


def table(runs: list[dict]) -> str:
    """One row per (candidate, evaluated step, run length), seeds pooled: a constant-LR run's step-150
    evaluation is the same trajectory as a 150-step run of the same seed (the evaluation touches a copy
    and runs after the step), so both land in one row; a scheduled run's intermediate point does not."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in runs:
        for ev in r["evals"]:
            if ev["step"] != r["steps"] and r["schedule"] != "none":
                continue
            groups.setdefault((r["candidate"], ev["step"]), []).append((r, ev))
    lines = ["| model | params | steps | seeds | s/step | train loss (last 50) | bal. acc eval | "
             "bal. acc after BN recal |", "|---|---:|---:|---|---:|---|---|---|"]
    for (name, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = sorted(rs, key=lambda t: t[0]["seed"])
        seeds = ",".join(str(r["seed"]) for r, _ in rs)
        sps = ", ".join(f"{r['s_per_step']:.2f}" for r, _ in rs)
        lines.append(f"| {name} | {rs[0][0]['params']:,} | {step} | {seeds} | {sps} | "
                     f"{_ms([e['train_loss_last50'] for _, e in rs])} | {_ms([e['bal_acc_eval'] for _, e in rs])} | "
                     f"{_ms([e['bal_acc_recal'] for _, e in rs])} |")
    return "\n".join(lines)


def timing_table(timings: list[dict]) -> str:
    lines = []
    for t in timings:
        if "ms" not in t:  # a thread-layout row (timing-threads.json)
            lines.append(f"{t['candidate']} {t['mode']}: step {t['step_ms_median']} ms median, {t['step_ms_min']} min")
            continue
        ms = t["ms"]
        parts = sum(v for k, v in ms.items() if k != "step_total")
        lines.append(f"{t['candidate']} threads {t['threads']}: step {ms['step_total']:.0f} ms")
        lines += [f"  {k:20s} {v:8.1f} ms {100 * v / parts:5.1f} %" for k, v in ms.items() if k != "step_total"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.experiments.trainability", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train candidates side by side (one after another in this process)")
    t.add_argument("--candidates", default="plain,ira-gap,ira-gmp", help=f"comma list of {', '.join(CANDIDATES)}")
    t.add_argument("--seeds", default="0", help="comma list of seeds (model init and batch draws)")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--size", type=int, default=192)
    t.add_argument("--eval-at", default="", help="extra steps at which to evaluate, comma list")
    t.add_argument("--test-good", type=int, default=200,
                   help="good test images to score (all defect ones always); 0 = all 571")
    t.add_argument("--recal-batches", type=int, default=30, help="balanced train batches for BN recalibration")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--data", default=str(DEFAULT_DATA), help="the Magnetic-tile root")
    t.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the decoded arrays are cached ('' = none)")
    t.add_argument("--results", default=str(DEFAULT_RESULTS), help="folder for one JSON per run")
    m = sub.add_parser("timing", help="per-block forward+backward time")
    m.add_argument("--candidates", default="plain,ira-gap,ira-gmp-cl,ira-gmp-bf16,ira-w25-gmp")
    m.add_argument("--threads", default="2", help="comma list, e.g. 1,2")
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--size", type=int, default=192)
    m.add_argument("--reps", type=int, default=5)
    m.add_argument("--results", default=str(DEFAULT_RESULTS))
    m.add_argument("--tag", default="", help="suffix of the timing JSON file name")
    st = sub.add_parser("steptime", help="whole training steps of one candidate: min and median ms (run two at "
                                         "once with --threads 1 to measure 2 processes x 1 thread)")
    st.add_argument("--candidate", default="ira-gap")
    st.add_argument("--threads", type=int, default=2)
    st.add_argument("--steps", type=int, default=8)
    st.add_argument("--batch", type=int, default=16)
    st.add_argument("--size", type=int, default=192)
    r = sub.add_parser("report", help="merge the run JSONs, print the tables, write one JSON")
    r.add_argument("--results", default=str(DEFAULT_RESULTS))
    r.add_argument("--json", default="", help="write the merged results here (e.g. docs/trainability.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    results = Path(getattr(args, "results", DEFAULT_RESULTS))
    if args.command == "report":
        runs, timings = load_results(results)
        print(table(runs))
        print()
        print(timing_table(timings))
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "timing": timings}, indent=1) + "\n")
            print(f"wrote {args.json}")
        return 0
    if args.command == "steptime":
        torch.set_num_threads(args.threads)
        cand = CANDIDATES[args.candidate]
        torch.manual_seed(0)
        model = cand.build(6).train()
        if cand.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)
        if cand.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 6, (args.batch,))
        ts = []
        for _ in range(args.steps + 2):  # the first two are warm-up
            t0 = time.perf_counter()
            with autocast(cand.bf16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        ts = ts[2:]
        print(f"{args.candidate} threads {args.threads}: min {1000 * min(ts):.0f} ms, "
              f"median {1000 * float(np.median(ts)):.0f} ms per step")
        return 0
    results.mkdir(parents=True, exist_ok=True)
    if args.command == "timing":
        names = [c for c in args.candidates.split(",") if c]
        rows = timing(names, [int(t) for t in args.threads.split(",")], args.batch, args.size, args.reps)
        tag = args.tag or "-".join(args.threads.split(","))
        (results / f"timing-{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    torch.set_num_threads(args.threads)
    names = [c for c in args.candidates.split(",") if c]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        print(f"unknown candidate(s) {', '.join(unknown)}: choose from {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    arrays = load_arrays(Path(args.data), args.size, Path(args.cache) if args.cache else None)
    print(f"data: {len(arrays['y_train'])} train, {len(arrays['y_test'])} test images at {args.size} px "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    eval_at = [int(s) for s in args.eval_at.split(",") if s]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in names:
            res = train_one(CANDIDATES[name], arrays, args.steps, seed, args.batch, args.lr, eval_at,
                            args.test_good, args.recal_batches)
            path = results / f"{name}-s{seed}-n{args.steps}-t{args.threads}.json"
            path.write_text(json.dumps(res, indent=1) + "\n")
            f = res["final"]
            print(f"{name:14s} seed {seed}: {res['params']:>9,} params {res['s_per_step']:.3f} s/step "
                  f"bal.acc eval {f['bal_acc_eval']:.3f} recal {f['bal_acc_recal']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

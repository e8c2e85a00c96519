"""A training run's directory: the files a run writes, the checks before anything in it changes (``--resume``
continues the saved options, ``--force`` removes only the run's own files), the log and JSON written atomically,
and the RNG state a resume restores (``models.train``'s docstring lists the files)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import LAST_NAME, WEIGHTS_NAME
from models.recipe import TrainConfig, TrainError

STATE_NAME = "train_state.pt"
EMA_NAME = "ema.safetensors"  # the running weight average (--ema), for an exact resume
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"
SPLIT_NAME = "split.json"
CURVES_NAME = "curves.png"
#: what a run writes; ``--force`` removes exactly these (and their .tmp leftovers), nothing else
RUN_FILES = (CONFIG_NAME, SPLIT_NAME, LOG_NAME, LAST_NAME, WEIGHTS_NAME, STATE_NAME, CURVES_NAME, EMA_NAME)
STATE_FORMAT = 1
#: what runs written before an option existed did (a resume of such a run keeps it)
LEGACY_OPTIONS = {"schedule": "constant", "bn_recal": 0, "epoch_size": None, "channels": None, "stem_init": "drawn",
                  "rot90": False, "brightness": 10.0, "contrast": 0.1, "ema": 0.0,
                  "bn_draws": "natural", "mil": 0, "mil_warmup": 0}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def check_run_dir(out: Path, config: TrainConfig) -> dict | None:
    """Check the run directory (no changes yet); return the saved config.json on resume, else None."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: give a directory for the run")
    if config.resume:
        if not (out / STATE_NAME).is_file() or not (out / CONFIG_NAME).is_file():
            raise TrainError(f"nothing to resume in {out}: it holds no {STATE_NAME} and {CONFIG_NAME}; "
                             "start a new run without --resume")
        try:
            return json.loads((out / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"cannot read {out / CONFIG_NAME} ({exc}): the run cannot be resumed") from None
    if out.exists() and any(out.iterdir()) and not config.force:
        raise TrainError(f"run directory {out} is not empty: pass --resume to continue that run, "
                         "--force to overwrite it, or choose a new --out")
    return None


def clean_run_dir(out: Path, config: TrainConfig) -> None:
    """Create the run directory; with --force remove the files of an earlier run (only those)."""
    if config.force and not config.resume and out.is_dir():
        for name in RUN_FILES:
            for p in (out / name, out / (name + ".tmp")):
                if p.is_file():
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def check_resume_options(config: TrainConfig, saved: dict) -> None:
    train = saved.get("train", {})
    stored = {**LEGACY_OPTIONS, **train, "format": saved.get("data", {}).get("format")}
    diffs = []
    for name in TrainConfig.LOCKED:
        mine, theirs = _jsonable(getattr(config, name)), _jsonable(stored.get(name))
        if mine != theirs:
            diffs.append(f"{name} {mine!r} (the run used {theirs!r})")
    if diffs:
        raise TrainError("--resume continues the saved configuration, but these options differ: "
                         + "; ".join(diffs) + ". Drop those options, or start a new run")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def rng_state() -> dict:
    keys = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys[1].astype(np.int64)), "pos": int(keys[2]),
                  "has_gauss": int(keys[3]), "cached_gaussian": float(keys[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

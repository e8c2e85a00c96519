"""``valve-model train``: train IRA-CNN on a dataset, with checkpoints, a log and exact resume.

The paper's recipe by default: cross-entropy, Adam (lr 1e-3, betas 0.9/0.999), batch 32,
100 epochs. Training augmentation (``models.data.Augment``): random horizontal and vertical flips
and a small brightness/contrast jitter. A stratified, seeded share of the data
(``--val-fraction``, 0.2) is held out for validation (grouped: see ``models.data`` for groups; a
group counts for the rarest class it holds, so groups with defects are spread over both sides).

What the paper leaves open, measured on the public datasets (docs/results.md, docs/trainability.md)
and on by default, each recorded in config.json and switchable off:

* class-balanced sampling (``--no-balance`` for the plain shuffle): every class drawn equally often;
  defect slices are a few per cent of a line's slices;
* a cosine learning-rate schedule from ``--lr`` to ``--lr`` / 100 over the epochs
  (``--schedule constant`` for the paper's fixed rate);
* BatchNorm recalibration (``--bn-recal N``, default 256, 0 = off): before each validation the BN running
  statistics are recomputed over up to N training images without augmentation (a cumulative
  average, not the lagging momentum average), so eval-mode predictions match train mode; the weights
  saved are the recalibrated ones. The images go through in a fixed shuffled order, so that each batch
  mixes the classes as a training batch does (before 2026-12-02 they went class by class, and the
  running variance missed the variance between the classes). ``--bn-draws`` says which images:
  ``natural`` (default), a seeded permutation of the training side with its class mix; ``balanced``,
  drawn as class-balanced sampling draws its batches (the statistics the weights trained with). At the end ``bn_check`` in config.json compares, on up to
  BN_CHECK_IMAGES (1024) training images that include those, the accuracy with batch statistics
  (train-mode BN, dropout off) and with the running statistics (eval mode): the gap must be within
  1 point (``running_minus_batch_points`` keeps its sign: above 0, eval mode is the better one);
* speed (docs/trainability.md): the model in channels_last memory format and the training forward
  under bfloat16 autocast where the CPU has bf16 instructions (avx512_bf16 / amx_bf16) or the GPU
  supports it (``--precision auto``, the default; ``fp32`` to turn it off): 40 % less time per step
  on this project's CPU with the same training loss; validation, BN statistics, evaluation and export
  stay in float32;
* weights chosen on the validation side's **balanced** accuracy (mean recall over classes; ties:
  lower validation loss, then the earlier epoch), not plain accuracy, which a model calling
  everything good scores high on imbalanced data.

Off by default: ``--ema D`` validates and keeps an exponential
moving average of the weights (decay D per optimizer step, warmed up as min(D, (1 + n) / (10 + n))), with its
own recalibrated BN statistics; the model itself trains exactly as without it (last.safetensors and the training
losses are the same), so a run with and one without it differ only in which weights are scored and kept.
``--mil K`` trains from image labels by multiple-instance selection (models.mil): after ``--mil-warmup`` epochs
(2 by default) on every slice with its image's label, each epoch trains on the K slices of each defective image the
model scores highest and every slice of the good images, and validation scores the validation images' verdicts (the
daemon's any-slice rule) instead of their slices. The BN recalibration and the final BN check read the training
slices with their folders' (image) labels as without it.

The run directory::

    config.json         {"model": ModelConfig, "train": hyperparameters, versions, command line,
                         "data": format, path, classes, counts per class for train/val, split seed}
    split.json          the relative paths of the training and validation images
    log.jsonl           one JSON object per epoch: epoch, train_loss, train_acc, val_loss,
                        val_acc, lr, seconds (val_* null without a validation set; with --ema
                        the average's)
    last.safetensors    the weights after the latest epoch
    model.safetensors   the weights with the best validation accuracy (ties: lower validation
                        loss, then the earlier epoch); the last epoch's without a validation set
    train_state.pt      optimizer state, epoch, best metric, RNG states, with --ema the average's
                        update count (torch.load weights_only)
    ema.safetensors     with --ema: the weight average after the latest epoch (model.safetensors is the best
                        epoch's average)
    curves.png          loss and accuracy per epoch

Determinism (CPU): the model is initialised after seeding python, numpy and torch; the shuffling
of epoch e uses a generator seeded from (seed, e) and the augmentation of image i in epoch e a
generator seeded from (seed, e, i); dropout draws from torch's global RNG, whose state is
checkpointed. ``--resume`` therefore continues exactly: N epochs, or k epochs and a resume to N,
give the same weights (same thread count and torch build).

A non-empty run directory is refused unless ``--resume`` (continue it; options left out come
from its config.json, ``--epochs`` may be raised, the other hyperparameters must not change, and
config.json gets a "resumed" entry) or ``--force`` (start over: removes only the files listed
above, after the data has been read successfully).

Python API: ``train(TrainConfig(data=..., out=..., epochs=...)) -> RunResult``.

The options and what follows from them alone (the schedule, the sampling weights, the seeds) are
``models.recipe``; the run directory's files, checks and RNG state ``models.run_dir``; this module is
the device, one epoch, the BatchNorm statistics, the loop and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler
from tqdm import tqdm

from models.attention import ATTENTION_KINDS
from models.checkpoint import (
    LAST_NAME,
    WEIGHTS_NAME,
    load_train_state,
    read_metadata,
    save_train_state,
    save_weights,
)
from models.data import FORMATS, Augment, ImageDataset, load_samples, split_samples
from models.errors import DataError
from models.images import INPUT_POLICY
from models.ira_cnn import (
    HEAD_POOLS,
    IRACNN,
    PRESETS,
    STEM_INITS,
    ModelConfig,
    build_model,
    count_parameters,
    init_stem,
)
from models.mil import MIL_WARMUP, bag_validation, make_bags, mask_holds_defect, select_instances
from models.recipe import (
    BN_DRAWS,
    LR_FLOOR,
    PRECISIONS,
    SCHEDULES,
    RunResult,
    TrainConfig,
    TrainError,
    _validate,
    balanced_weights,
    epoch_seed,
    lr_at,
    model_config_for,
    seed_everything,
)
from models.run_dir import (
    CONFIG_NAME,
    CURVES_NAME,
    EMA_NAME,
    LEGACY_OPTIONS,
    LOG_NAME,
    RUN_FILES,
    SPLIT_NAME,
    STATE_FORMAT,
    STATE_NAME,
    check_resume_options,
    check_run_dir,
    clean_run_dir,
    read_log,
    rng_state,
    set_rng_state,
    write_json,
)
from models.samples import SampleSet
from service.sim.synth import NOVEL_LABEL

#: with the names of models.recipe and models.run_dir that callers import from here
__all__ = [
    "CONFIG_NAME", "CURVES_NAME", "EMA_NAME", "LEGACY_OPTIONS", "LOG_NAME", "LR_FLOOR", "PRECISIONS", "PROG", "RUN_FILES",
    "SCHEDULES", "SPLIT_NAME", "STATE_FORMAT", "STATE_NAME", "RunResult", "TrainConfig", "TrainError",
    "balanced_accuracy", "balanced_draws", "balanced_weights", "bn_check", "build_parser", "check_resume_options", "check_run_dir",
    "clean_run_dir", "config_from_args", "cpu_has_bf16", "epoch_seed", "fill_resumed_options", "lr_at", "main", "model_config_for",
    "read_log", "recalibrate_bn", "resolve_device", "resolve_precision", "rng_state", "run_epoch",
    "seed_everything", "set_rng_state", "train", "write_json",
]

PROG = "valve-model train"


# ---------------------------------------------------------------------------------------------
# the device, one epoch, BatchNorm statistics


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}, but this torch build sees no CUDA device "
                             f"(torch {torch.__version__}): use --device cpu")
        return torch.device(name)
    raise TrainError(f"unknown --device {name!r}: use cpu or cuda")


def cpu_has_bf16() -> bool:
    """The CPU executes bfloat16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the device runs it natively, else fp32; bf16 on a device without it is an error."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if name == "auto":
        return "bf16" if native else "fp32"
    if name == "bf16" and not native:
        raise TrainError(f"--precision bf16, but this {device.type} has no native bfloat16 (CPU flags avx512_bf16 "
                         "or amx_bf16): use --precision fp32 or auto")
    return name


def run_epoch(model: IRACNN, loader: DataLoader, loss_fn: nn.Module, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None, bar: tqdm | None = None,
              per_class: dict | None = None, bf16: bool = False,
              after_step: Callable[[], None] | None = None) -> tuple[float, float]:
    """One pass; trains when an optimizer is given (``after_step`` is called after each optimizer step).
    Returns (mean loss, accuracy).

    ``per_class``, when given, is filled with {label: [correct, total]} (for the balanced accuracy).
    """
    training = optimizer is not None
    model.train(training)
    loss_sum, correct, n = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and training):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if training:
                if not torch.isfinite(loss):
                    raise TrainError(f"the training loss became {loss.item()}: lower --lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
            k = int(y.numel())
            loss_sum += float(loss.item()) * k
            hit = logits.argmax(dim=1) == y
            correct += int(hit.sum().item())
            n += k
            if per_class is not None:
                for label, ok in zip(y.tolist(), hit.tolist(), strict=True):
                    c = per_class.setdefault(int(label), [0, 0])
                    c[0] += int(ok)
                    c[1] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.3f}")
    return loss_sum / max(n, 1), correct / max(n, 1)


#: the warm-up of the weight average: update n uses decay min(--ema, (1 + n) / (EMA_WARMUP + n)), so the first
#: steps do not average in the initialisation for hundreds of steps (at --ema 0.99 it reaches 0.99 after ~890 updates)
EMA_WARMUP = 10


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based) of a weight average with nominal ``decay``."""
    return min(decay, (1 + updates) / (EMA_WARMUP + updates))


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, parameter by parameter; the buffers (BatchNorm running
    statistics) are copied: the averaged weights get their own by recalibration before they are used."""
    for a, p in zip(average.parameters(), model.parameters(), strict=True):
        a.lerp_(p.detach(), 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers(), strict=True):
        a.copy_(b)


def balanced_accuracy(per_class: dict) -> float | None:
    """Mean recall over the classes present: {label: [correct, total]} -> float."""
    rec = [c / t for c, t in per_class.values() if t]
    return float(np.mean(rec)) if rec else None


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate_bn(model: IRACNN, dataset: ImageDataset, device: torch.device, batch_size: int,
                   indices: Sequence[int]) -> None:
    """Recompute every BatchNorm layer's running mean/var over ``dataset[indices]`` (cumulative average).

    The running statistics Adam's last steps left behind lag the weights (momentum 0.1 averages over
    the last ~10 batches of changing weights); recomputing them with the final weights makes eval mode
    see what train mode saw. Dropout is off meanwhile; parameters are untouched.

    The images are batched in a fixed shuffled order (the same whatever the order of ``indices``), as
    :func:`bn_check` batches them: the running variance is the average of the batches' variances, and a
    batch of one class (indices in class order, as a dataset lists them) has no between-class variance,
    so class-ordered batches left the variance too small (before 2026-12-02; tools/bn_draws.py).
    """
    if not len(indices):
        return
    recalibrate_bn_in_order(model, dataset, device, batch_size, np.random.default_rng(0).permutation(sorted(indices)).tolist())


def recalibrate_bn_in_order(model: IRACNN, dataset: ImageDataset, device: torch.device, batch_size: int,
                            order: Sequence[int]) -> None:
    """:func:`recalibrate_bn` over ``dataset[order]`` batched in the order given (tools/bn_draws.py replays the
    class-ordered batches of before 2026-12-02 with it)."""
    bns = _bn_layers(model)
    if not bns or not len(order):
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.eval()
    for m in bns:
        m.train()
    loader = DataLoader(torch.utils.data.Subset(dataset, list(order)), batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()


def balanced_draws(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` indices into ``labels`` drawn as class-balanced sampling draws: a class uniformly, then one of its
    images, with replacement; seeded, and the first k of n draws are the k draws (the check extends the
    recalibration's images)."""
    rng = np.random.default_rng([seed, 11])
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    keys = sorted(by_class)
    out = []
    for _ in range(n):
        members = by_class[keys[int(rng.integers(len(keys)))]]
        out.append(members[int(rng.integers(len(members)))])
    return out


def bn_check(model: IRACNN, dataset: ImageDataset, device: torch.device, batch_size: int,
             indices: Sequence[int]) -> dict:
    """Accuracy on ``dataset[indices]`` with batch statistics (BN in train mode, momentum 0 so nothing is
    updated; dropout off) and with the running statistics (eval mode); their gap in points.

    The images are batched in a fixed shuffled order (the same whatever the order of ``indices``): training
    batches mix the classes, and a batch of one class (indices in class order, as a dataset lists them)
    would normalise the class away and measure nothing about the running statistics."""
    bns = _bn_layers(model)
    order = np.random.default_rng(0).permutation(sorted(indices)).tolist()
    loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size, shuffle=False)
    hits = {"batch": 0, "running": 0}
    n = 0
    momenta = [m.momentum for m in bns]
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            model.eval()
            hits["running"] += int((model(x).argmax(1) == y).sum())
            for m in bns:
                m.train()
                m.momentum = 0.0
            hits["batch"] += int((model(x).argmax(1) == y).sum())
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom
            n += int(y.numel())
    model.eval()
    train_acc, eval_acc = hits["batch"] / max(n, 1), hits["running"] / max(n, 1)
    return {"images": n, "batch_stats_acc": train_acc, "running_stats_acc": eval_acc,
            "gap_points": round(100.0 * abs(train_acc - eval_acc), 2),
            "running_minus_batch_points": round(100.0 * (eval_acc - train_acc), 2),
            "within_1_point": abs(train_acc - eval_acc) <= 0.01}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# training


#: after this many epochs a training loss still at the chance level is reported (a stalled initialisation)
STALL_EPOCHS = 3
#: training images the final BN check reads (the recalibration's first, then more of the same seeded order)
BN_CHECK_IMAGES = 1024


def chance_loss(train_counts: dict[str, int], balanced: bool) -> float:
    """The cross-entropy of predicting the draws' class frequencies: ln K for class-balanced draws, the
    entropy of the training counts otherwise. A training loss still near it has not left the chance level."""
    n = [c for c in train_counts.values() if c > 0]
    if balanced:
        return math.log(len(n))
    total = sum(n)
    return -sum(c / total * math.log(c / total) for c in n)


def improves(record: dict, best: dict) -> bool:
    """The weight-selection rule: an epoch's ``record`` replaces the ``best`` so far when its validation
    balanced accuracy is higher, or equal with a lower validation loss (so among equals the earlier epoch
    stays). Without validation every epoch replaces the last. Bests saved before val_bal_acc existed are
    compared by their val_acc."""
    val_bal = record.get("val_bal_acc")
    best_bal = best.get("val_bal_acc", best.get("val_acc"))
    return val_bal is None or best_bal is None or val_bal > best_bal or (
        val_bal == best_bal and record["val_loss"] < best["val_loss"])


def best_logged_epoch(rows: list[dict]) -> int | None:
    """The epoch whose weights a run kept, replayed from its log rows by :func:`improves`: for runs stopped
    before they wrote their own record of it (a time budget's kill)."""
    best: dict = {"epoch": None, "val_bal_acc": None, "val_loss": None}
    for row in rows:
        if improves(row, best):
            best = row
    return best["epoch"]


def train(config: TrainConfig) -> RunResult:
    """Train (or resume) a run; see the module docstring. Raises DataError/TrainError on user errors."""
    _validate(config)
    device = resolve_device(config.device)
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, Path(config.out), device)
    finally:
        if config.threads:
            torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, out: Path, device: torch.device) -> RunResult:
    data: SampleSet = load_samples(config.data, config.format)
    if NOVEL_LABEL in data.classes:  # build-dataset's held-out novel defects (synth dent, stain, chip)
        raise DataError(f"{data.root} has a '{NOVEL_LABEL}' folder: novel-defect slices are held out to test an "
                        f"unknown-defect score and never train a model; move {Path(data.root) / NOVEL_LABEL} out of "
                        "the dataset, or build the training set from frames rendered without novel in --mix")
    saved = check_run_dir(out, config)
    if saved is not None:
        check_resume_options(config, saved)
    train_s, val_s = split_samples(data, config.val_fraction, config.seed)
    if not train_s:
        raise DataError(f"no training images in {data.root}")
    split = {"seed": config.seed, "val_fraction": config.val_fraction,
             "train": [data.relpath(s) for s in train_s], "val": [data.relpath(s) for s in val_s]}
    counts = {"train": data.counts(train_s), "val": data.counts(val_s)}

    if saved is not None:
        mcfg = ModelConfig.from_dict(saved["model"])
        if tuple(mcfg.classes) != data.classes:
            raise DataError(f"the data at {data.root} has classes {', '.join(data.classes)}, but the run "
                            f"was trained on {', '.join(mcfg.classes)}: resume with the run's data")
        old_split = json.loads((out / SPLIT_NAME).read_text()) if (out / SPLIT_NAME).is_file() else None
        if old_split is not None and (old_split["train"], old_split["val"]) != (split["train"], split["val"]):
            raise DataError(f"the data at {data.root} differs from the run's ({out / SPLIT_NAME} lists other "
                            "images): resume with the run's data unchanged, or start a new run")
    else:
        mcfg = model_config_for(config, data.classes)

    augment = (Augment(brightness=config.brightness, contrast=config.contrast, rot90=config.rot90)
               if config.augment else None)
    # decoding every image now reports an unreadable file before anything in --out changes
    train_ds = ImageDataset(train_s, mcfg.input_size, augment, seed=config.seed)
    plain_ds = ImageDataset(train_s, mcfg.input_size, None, preload=False)  # the training images, unaugmented
    plain_ds.images = train_ds.images
    # the final check reads more images than the recalibration: on 256 one image is 0.39 points, and the batch
    # statistics' own noise alone moved a run's gap by 1 point (tools/bn_gap.py, docs/results.md)
    n_check = max(config.bn_recal, BN_CHECK_IMAGES)
    if config.bn_draws == "balanced":  # as the training batches are drawn (tools/bn_draws.py, docs/results.md)
        bn_order = np.asarray(balanced_draws([s.label for s in train_s], n_check, config.seed), dtype=np.int64)
    else:
        bn_order = np.random.default_rng([config.seed, 7]).permutation(len(train_s))
    recal_idx = sorted(bn_order[:config.bn_recal].tolist())
    check_idx = sorted(bn_order[:n_check].tolist())
    val_ds = ImageDataset(val_s, mcfg.input_size) if val_s else None
    # --mil: the slices grouped by source image (models.mil); refused before anything in --out changes
    bags = make_bags(train_s, data.classes) if config.mil else None
    val_bags = make_bags(val_s, data.classes) if config.mil and val_s else None
    clean_run_dir(out, config)

    seed_everything(config.seed)
    precision = resolve_precision(config.precision, device)
    model = build_model(mcfg)
    init_stem(model, config.stem_init)  # a resumed run loads its weights over it below
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    loss_fn = nn.CrossEntropyLoss()

    start_epoch = 1
    best: dict = {"epoch": None, "val_bal_acc": None, "val_loss": None}
    history: list[dict] = []
    log_path = out / LOG_NAME
    ema_updates = 0
    if saved is not None:
        state = load_train_state(out / STATE_NAME)
        done = int(state["epoch"])
        last_meta = read_metadata(out / LAST_NAME) if (out / LAST_NAME).is_file() else {}
        if last_meta.get("epoch") != str(done):
            raise TrainError(f"{out / LAST_NAME} (epoch {last_meta.get('epoch')}) does not match {STATE_NAME} "
                             f"(epoch {done}); the run was interrupted while saving. Start a new run, "
                             "or copy a consistent pair back")
        model.load_state_dict(load_file(str(out / LAST_NAME), device=str(device)), strict=True)
        if config.ema:
            ema_meta = read_metadata(out / EMA_NAME) if (out / EMA_NAME).is_file() else {}
            if ema_meta.get("epoch") != str(done):
                raise TrainError(f"{out / EMA_NAME} (epoch {ema_meta.get('epoch')}) does not match {STATE_NAME} "
                                 f"(epoch {done}); the run was interrupted while saving. Start a new run, "
                                 "or copy a consistent set back")
            if "ema_updates" not in state:
                raise TrainError(f"{out / STATE_NAME} holds no count of the weight average's updates, though the "
                                 "run trained with --ema: it was not written by this valve-model. Start a new run")
            ema_updates = int(state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        best = dict(state["best"])
        start_epoch = done + 1
        history = [h for h in read_log(log_path) if h["epoch"] <= done]  # drop lines past the checkpoint
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        if done < config.epochs:  # a resume that trains nothing (already at --epochs) is not recorded
            saved["train"]["epochs"] = config.epochs
            saved.setdefault("resumed", []).append(
                {"from_epoch": done, "epochs": config.epochs, "device": str(device),
                 "threads": torch.get_num_threads(), "workers": config.workers, "command": config.command})
            write_json(out / CONFIG_NAME, saved)
    else:
        run_config = {
            "model": mcfg.to_dict(),
            "train": {
                "preset": config.preset, "attention": config.attention, "width": config.width,
                "channels": None if config.channels is None else list(config.channels),
                "head_width": config.head_width, "head_pool": config.head_pool, "input_size": config.input_size,
                "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": "adam",
                "lr": config.lr, "betas": list(config.betas), "eps": 1e-8, "weight_decay": 0.0,
                "loss": "cross_entropy", "val_fraction": config.val_fraction, "seed": config.seed,
                "augment": config.augment, "augmentation": augment.to_dict() if augment else None,
                "rot90": config.rot90, "brightness": config.brightness, "contrast": config.contrast,
                "balance": config.balance, "schedule": config.schedule, "stem_init": config.stem_init,
                "stem_signs": "both (a one-sign draw of the stem's first conv has its second half flipped)",
                "lr_schedule": (f"cosine from lr to lr * {LR_FLOOR} over the epochs (per epoch)"
                                if config.schedule == "cosine" else "constant"),
                "bn_recal": config.bn_recal, "bn_draws": config.bn_draws, "epoch_size": config.epoch_size, "ema": config.ema,
                "mil": config.mil, "mil_warmup": config.mil_warmup,
                "labels_used": ((f"every slice with its image's label for the first {config.mil_warmup} epoch(s), then "
                                 if config.mil_warmup else "")
                                + f"multiple-instance (models.mil): each epoch the {config.mil} slice(s) of each "
                                "defective image the model scores highest for the image's class, and every slice of "
                                "the good images; validation on image verdicts (the daemon's any-slice rule)"
                                if config.mil else "every slice with the label of its class folder"),
                "weights_kept": (f"an exponential average of the weights (decay {config.ema:g} per step, warm-up "
                                 f"min(decay, (1 + n) / ({EMA_WARMUP} + n)) at update n), validated and kept; "
                                 "last.safetensors is the trained model itself"
                                 if config.ema else "the trained model's"),
                "precision": precision, "precision_option": config.precision,
                "memory_format": "channels_last",
                "bn_recalibration": (f"BN running statistics recomputed over {len(recal_idx)} training images "
                                     + ("drawn class-balanced as the training batches are " if config.bn_draws
                                        == "balanced" else "")
                                     + "(no augmentation, batched in a fixed shuffled order) before each validation "
                                     "and save" if config.bn_recal
                                     else "off (momentum 0.1 running averages)"),
                "sampling": ("class-balanced: each draw picks a class uniformly, then an image of it "
                             f"(with replacement); an epoch is {config.epoch_size or 'len(train)'} draws"
                             + (" among the epoch's selected slices" if config.mil else ""))
                            if config.balance else
                            "each training image once per epoch, shuffled",
                "best_metric": ("val_bal_acc, the mean recall over classes (ties: lower val_loss, then earlier epoch)"
                                + (", of the validation images' verdicts" if config.mil else "")),
                "device": str(device), "threads": torch.get_num_threads(), "workers": config.workers,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "parameters": count_parameters(model), "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "command": config.command,
            },
            "data": {"format": config.format, "path": str(Path(config.data).resolve()),
                     "classes": list(data.classes), "counts": counts, "split_seed": config.seed,
                     "val_fraction": config.val_fraction, "grouped_split": True,
                     "input_policy": INPUT_POLICY},
        }
        write_json(out / CONFIG_NAME, run_config)
        write_json(out / SPLIT_NAME, split)
        log_path.write_text("")

    # --ema: an exponential average of the weights is what validation scores and the run keeps; the model itself
    # trains exactly as without it (the average draws no random numbers), last.safetensors holds the model
    average = None
    if config.ema:
        average = copy.deepcopy(model)
        if saved is not None:
            average.load_state_dict(load_file(str(out / EMA_NAME), device=str(device)), strict=True)

    def update_average() -> None:
        nonlocal ema_updates
        ema_update(average, model, ema_decay(config.ema, ema_updates))
        ema_updates += 1

    scored = average if average is not None else model  # the weights validation scores and the run keeps
    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    pin = device.type == "cuda"
    say = tqdm.write if show_bar else (lambda s: print(s, file=sys.stderr, flush=True))
    if start_epoch == 1:
        say(f"training {mcfg.preset}/{mcfg.attention} ({count_parameters(model):,} parameters) on "
            f"{len(train_s)} images, validating on {len(val_s)}; classes {', '.join(data.classes)}; {device}")
    elif start_epoch <= config.epochs:
        say(f"resuming {out} at epoch {start_epoch} of {config.epochs}")
    else:
        say(f"{out} has already trained {start_epoch - 1} epochs (--epochs {config.epochs}): nothing to do")

    chance = chance_loss(counts["train"], config.balance)  # the stall warning's level
    has_defect = mask_holds_defect(train_s) if bags is not None else None  # masks only for the log's mil_hit
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, epoch)
        train_ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        mil_record: dict = {}
        drawn = list(range(len(train_s)))  # the indices this epoch draws from
        if bags is not None and epoch > config.mil_warmup:
            if epoch == 1:  # fresh weights: statistics for them first (a resumed run saved recalibrated ones)
                with torch.random.fork_rng(devices=[]):
                    recalibrate_bn(model, plain_ds, device, config.batch_size, recal_idx)
            drawn, mil_record = select_instances(model, plain_ds, bags, config.mil, device, has_defect)
            mil_record.pop("selected_by_bag")
        if config.balance:
            weights = torch.zeros(len(train_s), dtype=torch.double)
            weights[drawn] = balanced_weights([train_s[i].label for i in drawn])
            sampler = WeightedRandomSampler(weights, config.epoch_size or len(drawn), replacement=True, generator=gen)
            loader = DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler,
                                num_workers=config.workers, pin_memory=pin)
        elif bags is not None:
            loader = DataLoader(train_ds, batch_size=config.batch_size, num_workers=config.workers, pin_memory=pin,
                                sampler=SubsetRandomSampler(drawn, generator=gen))
        else:
            loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, generator=gen,
                                num_workers=config.workers, pin_memory=pin)
        bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{config.epochs}", file=sys.stderr,
                   leave=False, dynamic_ncols=True) if show_bar else None
        try:
            train_loss, train_acc = run_epoch(model, loader, loss_fn, device, optimizer, bar,
                                              bf16=precision == "bf16",
                                              after_step=update_average if average is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if config.bn_recal:  # the model and its average each get their own statistics (last.safetensors as without it)
            recalibrate_bn(model, plain_ds, device, config.batch_size, recal_idx)
            if average is not None:
                with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG,
                    recalibrate_bn(average, plain_ds, device, config.batch_size, recal_idx)  # which dropout uses
        val_loss = val_acc = val_bal = None
        if val_bags is not None:  # --mil: the validation images' verdicts (models.mil.bag_validation)
            val_loss, val_acc, per_class = bag_validation(scored, val_ds, val_bags, device)
            val_bal = balanced_accuracy(per_class)
        elif val_ds is not None:
            vloader = DataLoader(val_ds, batch_size=config.batch_size, shuffle=False,
                                 num_workers=config.workers, pin_memory=pin)
            per_class: dict = {}
            val_loss, val_acc = run_epoch(scored, vloader, loss_fn, device, per_class=per_class)
            val_bal = balanced_accuracy(per_class)
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                  "val_acc": val_acc, "val_bal_acc": val_bal, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - t0, 3), **mil_record}

        improved = improves(record, best)
        save_weights(out / LAST_NAME, model, {"epoch": str(epoch)})
        if average is not None:
            save_weights(out / EMA_NAME, average, {"epoch": str(epoch)})
        if improved:
            best = {"epoch": epoch, "val_bal_acc": val_bal, "val_acc": val_acc, "val_loss": val_loss}
            save_weights(out / WEIGHTS_NAME, scored,
                         {"epoch": str(epoch), "val_acc": "" if val_acc is None else repr(val_acc),
                          "val_bal_acc": "" if val_bal is None else repr(val_bal)})
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        history.append(record)
        # the commit point: a resume starts after the last epoch whose state was saved
        save_train_state(out / STATE_NAME, {"format": STATE_FORMAT, "epoch": epoch,
                                            "optimizer": optimizer.state_dict(), "best": best,
                                            "rng": rng_state(), "model_config": mcfg.to_dict(),
                                            **({"ema_updates": ema_updates} if average is not None else {})})
        say(f"epoch {epoch}/{config.epochs}  lr {record['lr']:.2e}  train_loss {_fmt(train_loss)}  "
            f"train_acc {_fmt(train_acc, 3)}  val_loss {_fmt(val_loss)}  val_acc {_fmt(val_acc, 3)}  "
            f"val_bal_acc {_fmt(val_bal, 3)}  {record['seconds']:.1f}s"
            + (f"  mil_hit {_fmt(record['mil_hit'], 3)}" if record.get("mil_hit") is not None else "")
            + ("  *" if improved and val_bal is not None else ""))
        if epoch == STALL_EPOCHS and config.epochs > STALL_EPOCHS and train_loss >= 0.95 * chance:
            say(f"warning: after {epoch} epochs the training loss {train_loss:.3f} is still at the chance level "
                f"({chance:.3f}, what predicting the class frequencies gives): this initialisation may have "
                "stalled (on KolektorSDD, width 0.125 stalled for seed 0 and learned for seeds 1 and 2; "
                "docs/results.md). Let it run, or start over with another --seed or a wider block 1 "
                "(--channels 4,16,16,32)")

    if history and start_epoch <= config.epochs and (out / WEIGHTS_NAME).is_file():
        # the BN check of the weights that ship (the best epoch's, recalibrated when they were saved)
        model.load_state_dict(load_file(str(out / WEIGHTS_NAME), device=str(device)), strict=True)
        check = bn_check(model, plain_ds, device, config.batch_size, check_idx)
        saved_cfg = json.loads((out / CONFIG_NAME).read_text())
        saved_cfg["bn_check"] = {**check, "weights": WEIGHTS_NAME, "epoch": best["epoch"]}
        write_json(out / CONFIG_NAME, saved_cfg)
        say(f"BN check on {check['images']} training images: batch statistics {check['batch_stats_acc']:.3f}, "
            f"running statistics {check['running_stats_acc']:.3f} ({check['gap_points']} points)")

    if history:
        from models.figures import plot_training_curves

        plot_training_curves(history, out / CURVES_NAME)
    done_epochs = history[-1]["epoch"] if history else start_epoch - 1
    if best["epoch"] is not None and best.get("val_bal_acc") is not None:
        say(f"best epoch {best['epoch']}: val_bal_acc {best['val_bal_acc']:.3f} (val_acc {best['val_acc']:.3f}); "
            f"weights {out / WEIGHTS_NAME}")
    else:
        say(f"weights {out / WEIGHTS_NAME}")
    return RunResult(run_dir=out, weights=out / WEIGHTS_NAME, model_config=mcfg, history=history,
                     epochs=done_epochs, best_epoch=best["epoch"], best_val_acc=best.get("val_acc"),
                     counts=counts)


# ---------------------------------------------------------------------------------------------
# command line


def parse_channels(text: str) -> tuple[int, ...]:
    """``--channels 4,16,16,32`` -> (4, 16, 16, 32); anything else is refused with the expected form."""
    try:
        ch = tuple(int(v) for v in text.split(","))
    except ValueError:
        ch = ()
    if len(ch) != 4 or min(ch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not four positive whole numbers: give the stem's and the "
                                         "three blocks' channels, e.g. 4,16,16,32")
    return ch


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(
        prog=PROG, description="Train IRA-CNN (paper recipe: cross-entropy, Adam lr 1e-3, batch 32, 100 epochs).",
        epilog="With --resume, options left out are taken from the run's config.json.")
    p.add_argument("--data", help="dataset root (required unless --resume)")
    p.add_argument("--format", choices=sorted(FORMATS), help=f"dataset format (default {d.format})")
    p.add_argument("--preset", choices=PRESETS, help=f"model preset (default {d.preset})")
    p.add_argument("--attention", choices=ATTENTION_KINDS, help=f"attention variant (default {d.attention})")
    p.add_argument("--epochs", type=int, help=f"total epochs (default {d.epochs}); raise it to extend a run")
    p.add_argument("--seed", type=int, help=f"seed for init, split, shuffling, augmentation (default {d.seed})")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--val-fraction", type=float, help=f"validation share per class (default {d.val_fraction})")
    p.add_argument("--width", type=float, help="override the preset's channel width multiplier")
    p.add_argument("--channels", type=parse_channels, metavar="STEM,B1,B2,B3",
                   help="explicit channels of the stem and the three blocks instead of --width's, e.g. 4,16,16,32")
    p.add_argument("--head-width", type=int, help="override the preset's hidden FC units")
    p.add_argument("--head-pool", choices=HEAD_POOLS,
                   help="override the preset's pooling of the last feature map (flatten, gap, gmp, mix)")
    p.add_argument("--input-size", type=int, help="override the input side S (multiple of 8; default 192)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train without flips and brightness/contrast jitter")
    p.add_argument("--rot90", action=argparse.BooleanOptionalAction, default=None,
                   help="augment with transposes too, so every 90-degree rotation (all 8 symmetries of the square): "
                        "for textures with no preferred direction (default off: a valve's slices have one)")
    p.add_argument("--brightness", type=float,
                   help=f"brightness jitter: uniform in +-B gray levels (default {d.brightness})")
    p.add_argument("--contrast", type=float,
                   help=f"contrast jitter: factor uniform in 1 +- C around the image mean (default {d.contrast})")
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced sampling (each class drawn equally often, with replacement; the "
                        "default): for imbalanced data such as defect slices; --no-balance: plain shuffle")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default {d.schedule}: "
                                                          f"cosine from --lr to --lr * {LR_FLOOR})")
    p.add_argument("--stem-init", choices=STEM_INITS,
                   help=f"how the stem's second 1x1 conv starts (default {d.stem_init}: the identity, so that the "
                        f"stem passes on dark and bright alike; drawn: Kaiming normal like every other conv, as "
                        f"before 2026-11-30; either way the first conv starts with both signs)")
    p.add_argument("--epoch-size", type=int, help="draws per epoch of the class-balanced sampling (default: "
                                                  "the number of training images)")
    p.add_argument("--ema", type=float,
                   help="validate and keep an exponential moving average of the weights with this decay per step "
                        f"(default {d.ema:g} = off; 0.99 averages over about 100 steps); the model trains as without it")
    p.add_argument("--bn-recal", type=int, help=f"training images to recompute BatchNorm statistics over "
                                                f"before each validation (default {d.bn_recal}; 0 = off)")
    p.add_argument("--bn-draws", choices=BN_DRAWS,
                   help=f"which training images the BN recalibration and the final BN check read (default "
                        f"{d.bn_draws}): natural, a seeded permutation of the training side with its class mix; "
                        "balanced, drawn as class-balanced sampling draws the training batches")
    p.add_argument("--mil", type=int, metavar="K",
                   help=f"multiple-instance training from image labels (default {d.mil} = off): each epoch trains "
                        "on the K slices of each defective image the model scores highest for its class and on every "
                        "slice of the good images, and validates on image verdicts; an image's slices are the files "
                        "whose stems share the part before the last '__' (models.mil)")
    p.add_argument("--mil-warmup", type=int, metavar="E",
                   help=f"with --mil: train the first E epochs on every slice with its image's label before the "
                        f"selection starts (default {MIL_WARMUP} with --mil), so that the first selection reads a model that has "
                        "seen the defects rather than its initialisation")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="training forward in bfloat16 autocast: auto (default: where the CPU/GPU runs bf16 "
                        "natively), bf16, or fp32")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--force", action="store_true", help="overwrite the run files in a non-empty --out")
    return p


def fill_resumed_options(given: dict, saved: dict) -> None:
    """Add to ``given`` the locked options (and epochs) it leaves out, as the run in ``saved`` (its config.json)
    was trained: a resume continues the run it resumes (LEGACY_OPTIONS for options newer than the run)."""
    t = {**LEGACY_OPTIONS, **saved.get("train", {})}
    for n in TrainConfig.LOCKED + ("epochs",):
        if n not in given and n in t:
            given[n] = tuple(t[n]) if n in ("betas", "channels") and t[n] is not None else t[n]


def config_from_args(args: argparse.Namespace, argv: list[str]) -> TrainConfig:
    names = ("data", "format", "preset", "attention", "epochs", "seed", "batch_size", "lr", "val_fraction",
             "width", "channels", "head_width", "head_pool", "input_size", "augment", "rot90", "brightness",
             "contrast", "balance",
             "schedule", "stem_init", "bn_recal", "bn_draws",
             "epoch_size", "ema", "precision", "mil", "mil_warmup")
    # options left out are None here: a new run takes TrainConfig's defaults, a resumed run the saved values
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.resume:
        path = Path(args.out) / CONFIG_NAME
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise TrainError(f"nothing to resume in {args.out}: it holds no readable {CONFIG_NAME}; "
                             "start a new run without --resume") from None
        fill_resumed_options(given, saved)
        given.setdefault("format", saved.get("data", {}).get("format", "folders"))
        given.setdefault("data", saved.get("data", {}).get("path"))
    elif given.get("mil") and "mil_warmup" not in given:  # a new --mil run: the warm-up unless told otherwise
        given["mil_warmup"] = MIL_WARMUP
    if not given.get("data"):
        raise TrainError("--data is required: the dataset root folder")
    return TrainConfig(out=args.out, threads=args.threads, workers=args.workers, device=args.device,
                       resume=args.resume, force=args.force, command=["valve-model", "train", *argv], **given)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        result = train(config_from_args(args, argv))
    except (DataError, TrainError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with: valve-model train --out {args.out} --resume", file=sys.stderr)
        return 130
    if result.best_val_acc is not None and not math.isnan(result.best_val_acc):
        print(json.dumps({"run": str(result.run_dir), "epochs": result.epochs, "best_epoch": result.best_epoch,
                          "best_val_acc": result.best_val_acc}))
    else:
        print(json.dumps({"run": str(result.run_dir), "epochs": result.epochs}))
    return 0

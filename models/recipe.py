"""The training recipe as data: ``TrainConfig`` (every option of ``valve-model train`` and its default, the
paper's recipe with the compact preset), ``RunResult``, ``TrainError``, the checks of the options, and the
functions of them the loop calls: the model config, the learning rate of an epoch, the class-balanced sampling
weights and the seeds (``models.train``'s docstring has the recipe and why)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from models.data import FORMATS
from models.errors import ValveModelError
from models.ira_cnn import STEM_INITS, ModelConfig, preset_config

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
#: which training images the BN recalibration and the final BN check read: ``natural``, a seeded permutation of the
#: training side as it lies (its class mix); ``balanced``, drawn as class-balanced sampling draws its batches
BN_DRAWS = ("natural", "balanced")
#: the cosine schedule ends at lr * LR_FLOOR
LR_FLOOR = 0.01


class TrainError(ValveModelError, ValueError):
    """A user error about the run: its directory, resume, options or the device."""


@dataclass
class TrainConfig:
    """Everything ``train`` needs. Defaults are the paper's recipe with the compact preset.

    ``width``, ``channels``, ``head_width``, ``head_pool`` and ``input_size`` override the preset when set. ``threads`` sets
    torch's intra-op threads for the duration of the call. ``progress`` None: a tqdm bar when
    stderr is a terminal, else one line per epoch.
    """

    data: str | Path
    out: str | Path
    format: str = "folders"
    preset: str = "compact"
    attention: str = "iam"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    val_fraction: float = 0.2
    seed: int = 0
    width: float | None = None
    channels: tuple[int, ...] | None = None
    head_width: int | None = None
    head_pool: str | None = None
    input_size: int | None = None
    augment: bool = True
    rot90: bool = False
    brightness: float = 10.0
    contrast: float = 0.1
    balance: bool = True
    schedule: str = "cosine"
    stem_init: str = "identity"
    bn_recal: int = 256
    bn_draws: str = "natural"
    mil: int = 0
    mil_warmup: int = 0
    epoch_size: int | None = None
    ema: float = 0.0
    precision: str = "auto"
    threads: int | None = None
    workers: int = 0
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    progress: bool | None = None
    command: list[str] | None = None

    #: options a resumed run must share with the run it continues
    LOCKED: ClassVar[tuple[str, ...]] = ("format", "preset", "attention", "batch_size", "lr", "betas",
                                         "val_fraction", "seed", "width", "channels", "head_width", "head_pool",
                                         "input_size", "augment", "rot90", "brightness", "contrast", "balance",
                                         "schedule", "stem_init", "bn_recal", "bn_draws", "epoch_size", "ema", "mil",
                                         "mil_warmup")


@dataclass
class RunResult:
    """What ``train`` produced."""

    run_dir: Path
    weights: Path
    model_config: ModelConfig
    history: list[dict]
    epochs: int
    best_epoch: int | None
    best_val_acc: float | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _validate(config: TrainConfig) -> None:
    if config.epochs < 1:
        raise TrainError(f"--epochs must be at least 1, not {config.epochs}")
    if config.batch_size < 1:
        raise TrainError(f"--batch-size must be at least 1, not {config.batch_size}")
    if not config.lr > 0:
        raise TrainError(f"--lr must be positive, not {config.lr}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise TrainError(f"--val-fraction must be in [0, 1), not {config.val_fraction}")
    if config.seed < 0:
        raise TrainError(f"--seed must be 0 or more, not {config.seed}")
    if config.workers < 0:
        raise TrainError(f"--workers must be 0 or more, not {config.workers}")
    if config.threads is not None and config.threads < 1:
        raise TrainError(f"--threads must be at least 1, not {config.threads}")
    if config.format not in FORMATS:
        raise TrainError(f"unknown --format {config.format!r}: choose one of {', '.join(sorted(FORMATS))}")
    if config.schedule not in SCHEDULES:
        raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {config.schedule!r}")
    if config.stem_init not in STEM_INITS:
        raise TrainError(f"--stem-init must be one of {', '.join(STEM_INITS)}, not {config.stem_init!r}")
    if config.epoch_size is not None and config.epoch_size < 1:
        raise TrainError(f"--epoch-size must be at least 1 draw, not {config.epoch_size}")
    if config.epoch_size is not None and not config.balance:
        raise TrainError("--epoch-size sets the draws of class-balanced sampling; drop --no-balance or --epoch-size")
    if not 0.0 <= config.brightness <= 255.0:
        raise TrainError(f"--brightness is the jitter's range in gray levels, 0 to 255, not {config.brightness}")
    if not 0.0 <= config.contrast < 1.0:
        raise TrainError(f"--contrast is the jitter's relative range, in [0, 1), not {config.contrast}")
    if (config.rot90 or config.brightness != TrainConfig.brightness or config.contrast != TrainConfig.contrast) \
            and not config.augment:
        raise TrainError("--rot90, --brightness and --contrast set the augmentation that --no-augment turns off: "
                         "drop one or the other")
    if not 0.0 <= config.ema < 1.0:
        raise TrainError(f"--ema is the weight average's decay per step, in [0, 1) (0 = off), not {config.ema}")
    if config.ema and not config.bn_recal:
        raise TrainError("--ema validates and saves averaged weights, whose BatchNorm statistics must be recomputed "
                         "for them: keep --bn-recal above 0 (the default 256), or drop --ema")
    if config.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, not {config.precision!r}")
    if config.bn_draws not in BN_DRAWS:
        raise TrainError(f"--bn-draws must be one of {', '.join(BN_DRAWS)}, not {config.bn_draws!r}")
    if config.bn_draws == "balanced" and not config.balance:
        raise TrainError("--bn-draws balanced draws the BN images as class-balanced sampling draws its batches; "
                         "with --no-balance the training batches are plain shuffles: drop --bn-draws balanced")
    if config.mil < 0:
        raise TrainError(f"--mil is the slices kept per defective image, 1 or more (0 = off), not {config.mil}")
    if config.mil_warmup < 0:
        raise TrainError(f"--mil-warmup is a number of epochs, 0 or more, not {config.mil_warmup}")
    if config.mil_warmup and not config.mil:
        raise TrainError("--mil-warmup sets the epochs before --mil starts selecting slices: give --mil K too, or "
                         "drop --mil-warmup")
    if config.mil and not config.bn_recal:
        raise TrainError("--mil scores each image's slices in eval mode before every epoch, with BatchNorm "
                         "statistics recomputed for the current weights: keep --bn-recal above 0 (the default 256), "
                         "or drop --mil")
    if config.bn_recal < 0:
        raise TrainError(f"--bn-recal must be 0 (off) or a number of training images, not {config.bn_recal}")
    if config.width is not None and config.channels is not None:
        raise TrainError("--width and --channels both set the model's channels: give one (--channels wins over "
                         "every stage, so a --width beside it would be recorded but not used)")
    if config.resume and config.force:
        raise TrainError("--resume and --force contradict each other: --resume continues the run, "
                         "--force starts it over")


def model_config_for(config: TrainConfig, classes: tuple[str, ...]) -> ModelConfig:
    overrides = {k: v for k, v in (("width", config.width), ("channels", config.channels),
                                   ("head_width", config.head_width),
                                   ("head_pool", config.head_pool), ("input_size", config.input_size)) if v is not None}
    try:
        return preset_config(config.preset, config.attention, classes=classes, **overrides)
    except ValueError as exc:
        raise TrainError(f"invalid model options: {exc}") from None


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of an epoch (1-based): constant, or cosine from lr to lr * LR_FLOOR.

    A function of the epoch alone, so a resumed run continues the same schedule (raising --epochs on
    resume stretches the rest of it).
    """
    if config.schedule == "constant" or config.epochs <= 1:
        return config.lr
    t = (epoch - 1) / (config.epochs - 1)
    return config.lr * (LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t)))


def balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights 1 / (count of its class): every class is drawn equally often."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch, independent of every other epoch."""
    return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)

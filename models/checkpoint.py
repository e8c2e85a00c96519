"""Weights on disk without pickle: safetensors with the model config in its metadata.

A run directory holds ``model.safetensors`` (the weights to use) and usually
``last.safetensors`` (the latest epoch, for resuming). Each file carries the model config as
JSON in the safetensors metadata under ``model_config``, so a single file is enough to rebuild
the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.ira_cnn import IRACNN, ModelConfig, build_model

WEIGHTS_NAME = "model.safetensors"
LAST_NAME = "last.safetensors"


def save_weights(path: str | Path, model: IRACNN, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict and config to ``path`` (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model_config": json.dumps(model.config.to_dict()), "format": "valve-inspect/ira-cnn/1"}
    meta.update(metadata or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def resolve_weights(path: str | Path) -> Path:
    """A run directory or a weights file -> the weights file to load."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, LAST_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no {WEIGHTS_NAME} or {LAST_NAME}: pass a run directory written by "
            "'valve-model train' or a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory or a .safetensors file")
    return path


def load(path: str | Path, map_location: str = "cpu") -> IRACNN:
    """Rebuild a trained IRA-CNN from a run directory or checkpoint, in eval mode. No pickle."""
    weights = resolve_weights(path)
    meta = read_metadata(weights)
    if "model_config" not in meta:
        raise ValueError(f"{weights} has no model_config metadata: it was not written by valve-model")
    config = ModelConfig.from_dict(json.loads(meta["model_config"]))
    model = build_model(config)
    state = load_file(str(weights), device=map_location)
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    return model.eval()


def save_train_state(path: str | Path, state: dict) -> None:
    """Optimizer/epoch state for resume. Loaded with weights_only=True (no arbitrary pickle)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)

"""IronCore checkpoints: a folder with the model's weights and the config that shapes them.

Layout of a checkpoint folder::

    model.safetensors    # full (TP-gathered) weights under IronCore's parameter names
    model_config.yaml    # the ModelConfig, so the folder is self-describing

Folders are written to a temporary sibling and renamed into place, so a
crash never leaves something that looks like a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ironcore.config.base import to_dict
from ironcore.config.loader import load_model_config
from ironcore.errors import CheckpointError
from ironcore.models.transformer import TransformerModel

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder holding an IronCore checkpoint."""
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / MODEL_CONFIG).is_file()


def save_model(model: TransformerModel, path: str | Path) -> Path:
    """Write ``model`` atomically as an IronCore checkpoint folder at ``path`` (replacing one there)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "ironcore"})
        (tmp / MODEL_CONFIG).write_text(yaml.safe_dump(to_dict(model.config), sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TransformerModel:
    """The TransformerModel stored in the IronCore checkpoint folder ``path``."""
    folder = Path(path)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder}: not an IronCore checkpoint (expected {WEIGHTS} and {MODEL_CONFIG})")
    cfg = load_model_config(folder / MODEL_CONFIG)
    with torch.device("meta"):
        model = TransformerModel(cfg)
    state = load_file(folder / WEIGHTS, device=str(device))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS}: missing tensors {missing}, unexpected tensors {unexpected}")
    model.load_state_dict(state, strict=True, assign=True)
    if model.rope is not None:
        model.rope.reset_parameters(device)
    return model

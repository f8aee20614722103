"""IronCore's own checkpoint folders: the model's weights and the config that shapes them.

Layout of a checkpoint folder::

    model.safetensors    # full (TP-gathered) weights under IronCore's parameter names
    model_config.yaml    # the ModelConfig, so the folder is self-describing
    tokenizer.json       # the tokenizer of the training data (+ tokenizer_config.json, chat_template.jinja)
    generation_config.json   # HF generation defaults (end tokens, sampling), when the model came with them
    optimizer.pt         # training checkpoints: optimizer state keyed by parameter name
    trainer_state.json   # step, consumed samples, tokens, skipped steps
    rng.pt               # RNG states (python, numpy, torch, cuda) of every rank

A training run keeps them as ``checkpoints/step_NNNNNNN/`` plus a ``latest``
file naming the newest; the folder is written to a temporary sibling and
renamed into place, and ``latest`` is replaced atomically after that, so a
crash at any moment leaves ``latest`` on a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from ironcore.config.base import to_dict
from ironcore.config.loader import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.data.tokenizer import definition_files
from ironcore.errors import CheckpointError
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_state_dict

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RNG = "rng.pt"
LATEST = "latest"
GENERATION_CONFIG = "generation_config.json"


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder holding an IronCore checkpoint."""
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / MODEL_CONFIG).is_file()


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then rename the folder to ``path`` (replacing one there)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_model_files(folder: Path, state: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """The two files that make ``folder`` a loadable model (full, TP=1 tensors)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, folder / WEIGHTS, metadata={"format": "ironcore"})
    (folder / MODEL_CONFIG).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def copy_tokenizer(source: str | Path, folder: Path) -> None:
    """Copy the tokenizer's files (tokenizer.json, its config, chat templates) from ``source`` into ``folder``,
    byte for byte, so that the folder can tokenize and render chats on its own."""
    source = Path(source)
    for path in definition_files(source):
        target = folder / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def copy_generation_config(source: str | Path, folder: Path) -> None:
    """Copy ``generation_config.json`` (end tokens, sampling defaults) from ``source`` into ``folder``, if any."""
    if (Path(source) / GENERATION_CONFIG).is_file():
        shutil.copy2(Path(source) / GENERATION_CONFIG, folder / GENERATION_CONFIG)


def save_model(model: TransformerModel, path: str | Path) -> Path:
    """Write ``model`` (at any TP size: every rank calls, rank 0 writes) as an IronCore checkpoint folder."""
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return Path(path)
    return write_atomically(path, lambda tmp: write_model_files(tmp, state, model.config))


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via ``latest``)."""
    folder = Path(path)
    for candidate in (folder, folder / "checkpoints"):
        pointer = candidate / LATEST
        if pointer.is_file():
            return candidate / pointer.read_text().strip()
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder}: not an IronCore checkpoint (expected {WEIGHTS} and {MODEL_CONFIG})")
    return folder


def read_model(folder: Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full state dict) of a checkpoint folder (see :func:`resolve` for run folders)."""
    return load_model_config(folder / MODEL_CONFIG), load_file(folder / WEIGHTS, device=str(device))


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step_{step:07d}"


def update_latest(checkpoints: Path, folder: Path) -> None:
    """Point ``latest`` at ``folder``: written to a temporary file, then renamed (atomic)."""
    tmp = checkpoints / f".{LATEST}.tmp"
    tmp.write_text(folder.name + "\n")
    os.replace(tmp, checkpoints / LATEST)


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step folders (never the one ``latest`` names)."""
    if keep <= 0:
        return
    latest = (checkpoints / LATEST).read_text().strip() if (checkpoints / LATEST).is_file() else None
    steps = sorted(p for p in checkpoints.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)

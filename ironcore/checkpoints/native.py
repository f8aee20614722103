"""IronCore's own checkpoint folders: the model's weights and the config that shapes them.

Layout of a checkpoint folder::

    model.safetensors    # full (TP-gathered) weights under IronCore's parameter names
    model_config.yaml    # the ModelConfig, so the folder is self-describing
    tokenizer.json       # the tokenizer of the training data (+ tokenizer_config.json, chat_template.jinja)
    generation_config.json   # HF generation defaults (end tokens, sampling), when the model came with them
    optimizer.pt         # training checkpoints: optimizer state keyed by parameter name
    trainer_state.json   # step, consumed samples, tokens, skipped steps
    rng.pt               # RNG states (python, numpy, torch, cuda) of every rank
    objective.pt         # the objective's own state of every rank, when it keeps one (GRPO with num_iterations > 1)

A training run keeps them as ``checkpoints/step_NNNNNNN/`` plus a ``latest``
file naming the newest and a ``healthy`` file naming the newest whose next
step was finite (the one to go back to after non-finite steps); the folder
is written to a temporary sibling and renamed into place, and the pointers
are replaced atomically after that, so a crash at any moment leaves them on
complete checkpoints. Pruning never removes the checkpoints they name.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ironcore.config.base import to_dict
from ironcore.config.loader import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.data.tokenizer import definition_files
from ironcore.errors import CheckpointError, ConfigError
from ironcore.files import build_folder, describe_os_error, remove_stale_temps, write_text_atomically
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_state_dict

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.yaml"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RNG = "rng.pt"
OBJECTIVE = "objective.pt"
LATEST = "latest"
HEALTHY = "healthy"
GENERATION_CONFIG = "generation_config.json"


def is_checkpoint_source(path: str | Path) -> bool:
    """Does ``path`` look like a checkpoint folder, a ``checkpoints/`` folder or a run folder? (Whether it is a
    complete one, :func:`resolve` says.)"""
    path = Path(path)
    return any((path / name).exists() for name in (LATEST, f"checkpoints/{LATEST}", WEIGHTS, MODEL_CONFIG))


def _weights_error(path: Path, err: Exception) -> CheckpointError:
    reason = describe_os_error(err) if isinstance(err, OSError) else f"{err}: truncated, or not a safetensors file"
    return CheckpointError(f"{path}: cannot read weights ({reason})")


def _check_readable(path: Path) -> None:
    """Open ``path`` once from Python: safetensors reports a permission error as "no such file"."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"{describe_os_error(err, path)} (weights)") from None


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or unreadable file is one line naming it."""
    _check_readable(path)
    try:
        return load_file(path, device=str(device))
    except (OSError, SafetensorError) as err:
        raise _weights_error(path, err) from None


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` (tensors read one at a time) with the errors of :func:`read_safetensors`."""
    _check_readable(path)
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (OSError, SafetensorError) as err:
        raise _weights_error(path, err) from None


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
    return build_folder(path, lambda tmp: write_model_files(tmp, state, model.config))


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via ``latest``)."""
    folder = Path(path)
    if not is_checkpoint_source(folder):
        raise CheckpointError(f"{folder}: not an IronCore checkpoint (expected {WEIGHTS} and {MODEL_CONFIG})")
    for candidate in (folder, folder / "checkpoints"):
        pointer = candidate / LATEST
        if pointer.is_file():
            folder = candidate / pointer.read_text().strip()
            if not folder.is_dir():
                raise CheckpointError(f"{pointer} names {folder.name}, which is missing")
            break
    for name in (MODEL_CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            what = "is a folder" if (folder / name).exists() else "missing"
            raise CheckpointError(f"{folder / name}: {what} (an incomplete checkpoint)")
    return folder


def read_model(folder: Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full state dict) of a checkpoint folder (see :func:`resolve` for run folders).

    A missing, truncated or corrupt file is a CheckpointError naming it.
    """
    if not (folder / MODEL_CONFIG).is_file():
        what = "is a folder" if (folder / MODEL_CONFIG).exists() else "missing"
        raise CheckpointError(f"{folder / MODEL_CONFIG}: {what} (an incomplete checkpoint)")
    try:
        config = load_model_config(folder / MODEL_CONFIG)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return config, read_safetensors(folder / WEIGHTS, device)


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step_{step:07d}"


def update_latest(checkpoints: Path, folder: Path) -> None:
    """Point ``latest`` at ``folder`` (atomically)."""
    write_text_atomically(checkpoints / LATEST, folder.name + "\n")


def mark_healthy(checkpoints: Path, folder: Path) -> None:
    """Point ``healthy`` at ``folder`` (atomically): a step after it was finite."""
    write_text_atomically(checkpoints / HEALTHY, folder.name + "\n")


def pointed(checkpoints: Path, name: str = LATEST) -> Path | None:
    """The checkpoint folder a pointer file (``latest``, ``healthy``) names, if both exist."""
    pointer = checkpoints / name
    if not pointer.is_file():
        return None
    folder = checkpoints / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step folders, never one that ``latest`` or ``healthy`` names, and the
    temporaries of saves that were killed."""
    remove_stale_temps(checkpoints)
    if keep <= 0:
        return
    protected = {pointed(checkpoints, LATEST), pointed(checkpoints, HEALTHY)}
    steps = sorted(p for p in checkpoints.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old not in protected:
            shutil.rmtree(old, ignore_errors=True)

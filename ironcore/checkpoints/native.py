"""IronCore's own checkpoint folders: the model's weights and the config that shapes them.

Layout of a checkpoint folder::

    model.safetensors    # full (TP-gathered) weights under IronCore's parameter names
    shards/              # or, in a sharded checkpoint: every rank's pieces of the weights and optimizer state
                         # (torch.distributed.checkpoint; :mod:`ironcore.checkpoints.sharded`), in place of
                         # model.safetensors and optimizer.pt
    model_config.yaml    # the ModelConfig, so the folder is self-describing
    tokenizer.json       # the tokenizer of the training data (+ tokenizer_config.json, chat_template.jinja)
    generation_config.json   # HF generation defaults (end tokens, sampling), when the model came with them
    hf_token_ids.json    # bos/eos/pad ids of the HF config.json the weights came from (kept for an export)
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

import hashlib
import json
import logging
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

# One implementation of the pointer logic, torch-free for data/tokenizer.py; these names stay native's too.
from ironcore.checkpoints.pointers import (  # noqa: F401
    LATEST,
    MODEL_CONFIG,
    SHARDS,
    WEIGHTS,
    is_checkpoint_source,
    is_sharded,
    is_step_name,
    newest_first,
    resolve,
    weights_path,
)
from ironcore.config.base import to_dict
from ironcore.config.loader import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.data.preprocessing.tokenizer import definition_files
from ironcore.errors import CheckpointError, ConfigError
from ironcore.files import (
    build_folder,
    describe_os_error,
    read_json,
    remove_stale_temps,
    write_text_atomically,
)
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_state_dict

OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
RNG = "rng.pt"
OBJECTIVE = "objective.pt"
HEALTHY = "healthy"
GENERATION_CONFIG = "generation_config.json"
HF_TOKEN_IDS = "hf_token_ids.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
ADAPTER_BASE = "adapter_base.json"  # a LoRA checkpoint's base: {"base": source, "fingerprint": ...}
MODEL_PREFIX = "model/"  # a sharded checkpoint's weights: "model/<name>" in shards/ (optimizer: OPTIMIZER_PREFIX)
OPTIMIZER_PREFIX = "optimizer/"

log = logging.getLogger(__name__)


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


def write_model_files(folder: Path, state: Mapping[str, torch.Tensor] | None, config: ModelConfig,
                      base: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """The files that make ``folder`` a loadable model (full, TP=1 tensors). With LoRA (``config.lora``)
    ``state`` holds the adapters (and modules trained in full) only, and ``base`` says which weights they sit
    on (:func:`base_record`). ``state`` None: the weights are in the folder's ``shards/`` (a sharded
    checkpoint), the rest is written."""
    if state is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, folder / WEIGHTS, metadata={"format": "ironcore"})
    (folder / MODEL_CONFIG).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    if config.lora is not None:
        if base is None:
            raise ValueError("a LoRA checkpoint needs the record of its base")
        (folder / ADAPTER_BASE).write_text(json.dumps(dict(base), indent=2) + "\n")


def base_record(source: str | Path | None, weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """What a LoRA checkpoint records of its base: the source as given, its absolute path, and a fingerprint
    of the weights (names, shapes and a few values of each), so that loading onto other weights is refused."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().reshape(-1)
        digest.update(f"{name}{tuple(weights[name].shape)}".encode())
        sample = torch.cat([tensor[:8], tensor[-8:]]).to("cpu", torch.float32)
        digest.update(sample.numpy().tobytes())
    where = "" if source is None else str(source)
    absolute = str(Path(where).resolve()) if where and Path(where).exists() else where
    return {"base": where, "base_path": absolute, "fingerprint": digest.hexdigest()[:16]}


def read_base_record(folder: Path) -> dict[str, str]:
    """A LoRA checkpoint's :func:`base_record`; CheckpointError naming the file when it is missing."""
    return read_json(folder / ADAPTER_BASE, "LoRA base record", CheckpointError)


def check_base(folder: Path, fingerprint: str, base: str) -> None:
    """One line when the base weights with ``fingerprint`` (from ``base``) are not those the adapters of the LoRA
    checkpoint ``folder`` were trained on."""
    record = read_base_record(folder)
    if record.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder / ADAPTER_BASE}: the adapters were trained on {record.get('base')!r} "
                              f"(fingerprint {record.get('fingerprint')}), the base {base!r} is other weights "
                              f"(fingerprint {fingerprint})")


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


def copy_model_metadata(source: str | Path, folder: Path) -> None:
    """What ``folder``, holding the weights of ``source`` (an HF folder or an IronCore checkpoint), keeps of it
    besides the weights and tokenizer: its ``generation_config.json`` and its HF token ids
    (:func:`recorded_token_ids`), so that an export says what the imported folder said."""
    copy_generation_config(source, folder)
    ids = recorded_token_ids(source)
    if ids:
        (folder / HF_TOKEN_IDS).write_text(json.dumps(ids, indent=2) + "\n")


def recorded_token_ids(folder: str | Path) -> dict[str, Any]:
    """The ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (those it has, null included) of an HF folder's
    ``config.json``, or of an IronCore checkpoint's record of them (:data:`HF_TOKEN_IDS`); empty without."""
    for path in (Path(folder) / HF_TOKEN_IDS, Path(folder) / "config.json"):
        if path.is_file():
            data = read_json(path, "HF token ids" if path.name == HF_TOKEN_IDS else "HF model config", CheckpointError)
            return {key: data[key] for key in TOKEN_ID_KEYS if key in data}
    return {}


def save_model(model: TransformerModel, path: str | Path) -> Path:
    """Write ``model`` (at any TP size: every rank calls, rank 0 writes) as an IronCore checkpoint folder."""
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return Path(path)
    return build_folder(path, lambda tmp: write_model_files(tmp, state, model.config))


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
    if is_sharded(folder):  # consolidated here
        from ironcore.checkpoints import sharded  # torch.distributed.checkpoint: 1 s to import

        return config, sharded.read_full(folder, MODEL_PREFIX, device=device)
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
    named = pointer.read_text(errors="replace").strip()
    folder = checkpoints / named
    return folder if is_step_name(named) and folder.is_dir() else None


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

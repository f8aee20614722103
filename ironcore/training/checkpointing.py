"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is an IronCore checkpoint folder
(:mod:`ironcore.checkpoints.native`: full weights + model config, loadable
on its own) plus the optimizer state keyed by parameter name, the trainer's
counters (:class:`TrainState`), the RNG states of every rank, the resolved
run config, the data's tokenizer (with its chat templates) and the starting
model's ``generation_config.json`` when it had one. Tensors are stored full (TP=1), so a run
saved at one TP/DP layout resumes at another; a resized world reuses the
saved RNG states cyclically.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ironcore.checkpoints import native
from ironcore.config import Config, dump_config
from ironcore.parallel.sharding import (
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
)


@dataclasses.dataclass
class TrainState:
    """The trainer's counters: with the weights, optimizer and RNGs, all a resumed run needs."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    consumed_samples: int = 0  # global samples drawn from the training data
    tokens: int = 0  # trained (loss-mask) tokens seen
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient


def save_checkpoint(
    checkpoints: Path,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    tokenizer_dir: str | Path,
    generation_source: Path | None = None,
) -> Path:
    """Write ``checkpoints/step_NNNNNNN`` atomically, then move ``latest`` to it, then prune old ones.

    Collective: every rank takes part in gathering the full (TP=1) tensors
    and its RNG state; rank 0 writes. A step already saved is not written twice.
    """
    folder = native.step_dir(checkpoints, state.step)
    if (checkpoints / native.LATEST).is_file() and native.resolve(checkpoints) == folder:
        return folder
    weights = full_state_dict(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    rngs = _gather_objects(rng_states())
    if not dist.is_initialized() or dist.get_rank() == 0:

        def write(tmp: Path) -> None:
            native.write_model_files(tmp, weights, config.model)
            torch.save(optimizer_state, tmp / native.OPTIMIZER)
            torch.save(rngs, tmp / native.RNG)
            (tmp / native.TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
            (tmp / "config.yaml").write_text(dump_config(config))
            native.copy_tokenizer(tokenizer_dir, tmp)
            if generation_source is not None:
                native.copy_generation_config(generation_source, tmp)

        native.write_atomically(folder, write)
        native.update_latest(checkpoints, folder)
        native.prune(checkpoints, config.trainer.keep_last_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_checkpoint(
    checkpoints: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, rank: int
) -> tuple[Path, TrainState] | None:
    """Load ``latest`` into ``model`` and ``optimizer`` and this rank's RNGs; None when there is none."""
    if not (checkpoints / native.LATEST).is_file():
        return None
    folder = native.resolve(checkpoints)
    load_full_state_dict(model, native.read_model(folder, device)[1])
    optimizer_state = torch.load(folder / native.OPTIMIZER, map_location=device, weights_only=True)
    load_full_optimizer_state(model, optimizer, optimizer_state)
    state = TrainState(**json.loads((folder / native.TRAINER_STATE).read_text()))
    rngs = torch.load(folder / native.RNG, weights_only=False)
    set_rng_states(rngs[rank % len(rngs)])
    return folder, state


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (just ``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

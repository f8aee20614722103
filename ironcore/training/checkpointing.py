"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is an IronCore checkpoint folder
(:mod:`ironcore.checkpoints.native`: full weights + model config, loadable
on its own; or, sharded, every rank's pieces of the weights and optimizer state in ``shards/``) plus the
optimizer state keyed by parameter name, the trainer's
counters (:class:`TrainState`), the RNG states of every rank, the resolved
run config, the data's tokenizer (with its chat templates) and the starting
model's ``generation_config.json`` and HF token ids when it had them. Tensors are stored full
(TP=1), or sharded as pieces placed in full tensors, so a run saved at one TP/DP layout resumes at another;
a resized world reuses the saved RNG states cyclically.

Nothing read back can run code: the optimizer and RNG files hold tensors,
numbers and strings only and are loaded with ``weights_only=True``. A
checkpoint that does not load (a truncated file, a foreign optimizer) is
named in the warning, and the newest older one that loads is used instead.

The optimizer's part goes through the trainer's optimizer interface
(``full_state_dict``, ``master_weights``), so any implementation checkpoints
the same way. Which checkpoints are healthy (followed by finite steps: kept
by pruning, gone back to after non-finite steps) is :class:`CheckpointHealth`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ironcore.checkpoints import native
from ironcore.config import Config, dump_config
from ironcore.errors import CheckpointError, ConfigError, UserError, first_line
from ironcore.files import OutputError, build_folder, describe_os_error, read_json, read_yaml
from ironcore.models.lora import trainable_names
from ironcore.parallel import state as parallel_state
from ironcore.parallel.sharding import full_shapes, full_state_dict, load_full_state_dict, param_shaped
from ironcore.training.optimizer import TrainingOptimizer

log = logging.getLogger("ironcore.train")
GROUPS = f"{native.OPTIMIZER_PREFIX}param_groups"  # a sharded checkpoint's optimizer hyperparameters


@dataclasses.dataclass
class TrainState:
    """The trainer's counters: with the weights, optimizer and RNGs, all a resumed run needs."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    consumed_samples: int = 0  # global samples drawn from the training data
    tokens: int = 0  # trained (loss-mask) tokens seen
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    stopped_early: bool = False  # operation.stop_metric ended the run here: a resume trains no further


class CheckpointHealth:
    """Which of this run's checkpoints are healthy: pruning keeps the newest healthy one, and after non-finite
    steps ``latest`` goes back to it.

    A checkpoint is healthy once ``healthy_after_steps`` finite steps followed it (or the run ended after it
    with a finite step); non-finite steps cancel the count of those saved before them. Only a state whose last
    step was finite is saved at all (:attr:`last_step_finite`).
    """

    def __init__(self, checkpoints: Path, healthy_after_steps: int, is_main: bool) -> None:
        self.checkpoints, self.healthy_after_steps, self.is_main = checkpoints, healthy_after_steps, is_main
        self.last_step_finite = True
        self.saved_step: int | None = None  # the step this process last saved
        self._pending: dict[Path, int] = {}  # checkpoints not yet known healthy -> finite steps since

    def saved(self, folder: Path, step: int) -> None:
        """A checkpoint of ``step`` was written: the finite steps after it will tell."""
        self.saved_step = step
        self._pending[folder] = 0

    def resumed(self, folder: Path) -> None:
        """The run resumed from ``folder``: unless it is known healthy, the steps after it will tell."""
        if folder != native.pointed(self.checkpoints, native.HEALTHY):
            self._pending[folder] = 0

    def step_done(self, finite: bool) -> None:
        """Count a step: a finite one for the checkpoints before it, a non-finite one against them."""
        self.last_step_finite = finite
        if finite:
            self._confirm(final=False)
        else:
            self._pending.clear()  # what was saved just before non-finite steps is not healthy

    def run_done(self) -> None:
        """The run ended: no step follows the last one, so its own finite loss is the evidence."""
        if self.last_step_finite:
            self._confirm(final=True)

    def _confirm(self, final: bool) -> None:
        confirmed = None
        for folder in list(self._pending):
            self._pending[folder] += 1
            if final or self._pending[folder] >= self.healthy_after_steps:
                confirmed = folder
                del self._pending[folder]
        if confirmed is not None and confirmed.is_dir() and self.is_main:  # a pruned one stays unconfirmed
            native.mark_healthy(self.checkpoints, confirmed)

    def back_to_healthy(self) -> str:
        """After non-finite steps: point ``latest`` back at the newest healthy checkpoint; say where to resume."""
        healthy = native.pointed(self.checkpoints, native.HEALTHY)
        if healthy is None:
            return "no checkpoint of this run is known healthy: start again, e.g. with a lower learning rate"
        if self.is_main:
            native.update_latest(self.checkpoints, healthy)
        return (f"{healthy} is the newest healthy checkpoint and `latest` again: rerun (with a lower learning "
                "rate?) to resume from it")


def save_checkpoint(
    checkpoints: Path,
    *,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: TrainingOptimizer,
    config: Config,
    tokenizer_dir: str | Path,
    generation_source: Path | None = None,
    objective_state: dict[str, Any] | None = None,
    base: Mapping[str, str] | None = None,
) -> Path:
    """Write ``checkpoints/step_NNNNNNN`` atomically, then move ``latest`` to it, then prune old ones.

    Collective: every rank takes part in gathering the full (TP=1) tensors
    and its RNG state; rank 0 writes (replacing a folder of the same step). With
    ``trainer.checkpoint_format`` sharded every rank writes its own pieces into rank 0's temporary folder
    instead (:mod:`ironcore.checkpoints.sharded`), and nothing is gathered.
    A full disk is one line naming the folder; ``latest`` then still names
    the previous, complete checkpoint. ``base``: a LoRA run's base record (``native.base_record``).
    """
    folder = native.step_dir(checkpoints, state.step)
    # With low-precision parameters the weights are the optimizer's fp32 master weights; with LoRA only the
    # adapters (and modules trained in full) are saved, beside the record of the base they need.
    only = trainable_names(model) if config.model.lora is not None else None
    shards = weights = optimizer_state = None
    if config.trainer.sharded_checkpoints:  # every rank's own pieces, nothing gathered
        from ironcore.checkpoints import sharded  # torch.distributed.checkpoint: 1 s to import

        try:
            shards = _shards(model, optimizer, only)
        except NotImplementedError:  # an optimizer of your own without a per-parameter state: a full checkpoint
            log.warning("the optimizer keeps no per-parameter state (local_state_dict): writing a full checkpoint")
    if shards is None:
        weights = full_state_dict(model, optimizer.master_weights(), only=only)
        optimizer_state = optimizer.full_state_dict()
    rngs = _gather_objects(rng_states())
    objective_states = _gather_objects(objective_state or {})
    main = not dist.is_initialized() or dist.get_rank() == 0
    if not main and shards is not None:  # into rank 0's temporary folder
        sharded.write_shards(_broadcast_path(None), shards)
    if main:

        def write(tmp: Path) -> None:
            if shards is not None:
                sharded.write_shards(_broadcast_path(tmp), shards)
            native.write_model_files(tmp, weights, config.model, base)
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / native.OPTIMIZER)
            torch.save(rngs, tmp / native.RNG)
            if any(objective_states):
                torch.save(objective_states, tmp / native.OBJECTIVE)
            (tmp / native.TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
            (tmp / "config.yaml").write_text(dump_config(config))
            native.copy_tokenizer(tokenizer_dir, tmp)
            if generation_source is not None:  # its generation_config.json and HF token ids, for an export
                native.copy_model_metadata(generation_source, tmp)

        try:
            build_folder(folder, write)
        except (OutputError, RuntimeError) as err:  # torch.save reports a full disk as "unexpected pos ..."
            full = "no space left" in str(err) or shutil.disk_usage(checkpoints).free < 2**26
            reason = "no space left on device" if full else first_line(err)
            previous = native.pointed(checkpoints)
            raise OutputError(f"{folder}: cannot write the checkpoint: {reason}; "
                              + (f"{previous} is the last complete one" if previous else "no earlier checkpoint"))\
                from None
        native.update_latest(checkpoints, folder)
        native.prune(checkpoints, config.trainer.keep_last_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _shards(model: torch.nn.Module, optimizer: TrainingOptimizer, only: list[str] | None) -> dict[str, Any]:
    """What a sharded checkpoint holds of this rank: its pieces of the weights (``only`` those names) and of
    the optimizer's state, the optimizer's scalars and parameter groups (:mod:`ironcore.checkpoints.sharded`)."""
    from ironcore.checkpoints import sharded  # torch.distributed.checkpoint: 1 s to import

    make, params = sharded.piece_maker(model), dict(model.named_parameters())
    out: dict[str, Any] = {f"{native.MODEL_PREFIX}{name}": make(name, tensor)
                           for name, tensor in model.state_dict().items() if only is None or name in only}  # fmt: skip
    local = optimizer.local_state_dict()
    for name, values in local["state"].items():
        for key, value in values.items():
            if value is not None:
                out[f"{native.OPTIMIZER_PREFIX}{name}/{key}"] = (
                    make(name, value) if param_shaped(value, params[name]) else value)  # fmt: skip
    out[GROUPS] = local["param_groups"]
    return out


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0's ``path`` on every rank (rank 0 passes it, the others None)."""
    box = [None if path is None else str(path)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def load_checkpoint(
    checkpoints: Path, *, model: torch.nn.Module, optimizer: TrainingOptimizer, device: torch.device, rank: int,
    base: Mapping[str, str] | None = None,
) -> tuple[Path, TrainState] | None:
    """Load the newest checkpoint that loads (``latest`` first) into ``model``, ``optimizer`` and this rank's
    RNGs; None when there is none. Each one that fails is named in a warning, and so is a ``latest`` pointer
    that is empty or names no folder (the step folders before it are then tried, newest first); if none
    loads, the first error is raised. ``base``: a LoRA run's base record, which the checkpoint's must match (its
    adapters load onto the base already in ``model``)."""
    candidates, problem = native.newest_first(checkpoints)
    if problem is not None:
        pointer = checkpoints / native.LATEST
        named = pointer.read_text(errors="replace").strip()
        log.warning("cannot resume from %s: %s %s", named if native.is_step_name(named) else "latest", pointer,
                    problem)
        if not candidates:
            if any(p.is_dir() for p in checkpoints.glob("step_*")):
                raise CheckpointError(f"{pointer}: {problem}, and no checkpoint before it is left to resume from: "
                                      "point it at a step_* folder, or remove it to start afresh")
            log.warning("%s: no checkpoint to resume from: starting afresh", checkpoints)
            return None
    if not candidates:
        return None
    first_error: CheckpointError | None = None
    for folder in candidates:
        try:
            state = _load(folder, model, optimizer, device, rank, base)
        except CheckpointError as err:
            first_error = first_error or err
            log.warning("cannot resume from %s: %s", folder.name, err)
            continue
        if folder != candidates[0] or problem is not None:
            log.warning("resuming from %s, the newest checkpoint that loads", folder)
        _warn_if_other_layout(folder, rank)
        return folder, state
    assert first_error is not None
    raise first_error


def resume_folder(checkpoints: Path) -> Path | None:
    """The checkpoint folder a resume tries first (``latest``, or the newest step folder before it when
    ``latest`` names none); None when there is nothing to resume from."""
    return next(iter(native.newest_first(checkpoints)[0]), None)


def _warn_if_other_layout(folder: Path, rank: int) -> None:
    """Say once (rank 0) that the checkpoint was written at another data-parallel size: the weights, optimizer
    and data position resume exactly, but what the ranks draw at random can differ (GRPO's rollouts)."""
    if rank != 0:
        return
    try:
        saved_world = len(_safe_load(folder / native.RNG, torch.device("cpu")))
        trainer = read_yaml(folder / "config.yaml", "training config", CheckpointError).get("trainer") or {}
        saved_dp = max(saved_world // max(int(trainer.get("tensor_model_parallel_size") or 1), 1), 1)
    except (UserError, TypeError, ValueError, AttributeError):  # an older or hand-made checkpoint: nothing to say
        return
    if saved_dp != parallel_state.dp_size():
        log.warning("%s was saved at data-parallel size %d, this run has %d: the ranks' random states are reused "
                    "cyclically, and GRPO draws other rollouts than a run at the saved size would (docs/rl.md)",
                    folder.name, saved_dp, parallel_state.dp_size())


def _load(folder: Path, model: torch.nn.Module, optimizer: TrainingOptimizer, device: torch.device,
          rank: int, base: Mapping[str, str] | None = None) -> TrainState:
    """One checkpoint into the model, optimizer and RNGs; CheckpointError naming the file that does not load."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing")
    absent: list[str] = []
    if base is not None:  # LoRA: the adapters, onto the base the run stands on (the one they were trained on)
        native.check_base(folder, base["fingerprint"], base["base"])
        trained = set(trainable_names(model))
        absent = [name for name in model.state_dict() if name not in trained]
    if native.is_sharded(folder):
        _load_shards(folder, model, optimizer, absent)
    else:
        try:
            optimizer.load_master_weights(load_full_state_dict(model, native.read_model(folder, device)[1], absent))
        except CheckpointError as err:
            raise CheckpointError(f"{folder / native.WEIGHTS}: {err}" if str(folder) not in str(err) else str(err)) \
                from None
        optimizer_state = _safe_load(folder / native.OPTIMIZER, device)
        groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
        _check_groups(folder / native.OPTIMIZER, groups, optimizer)
        _fits(folder / native.OPTIMIZER, optimizer.load_full_state_dict, optimizer_state)
    path = folder / native.TRAINER_STATE
    try:
        state = TrainState(**read_json(path, "trainer state", CheckpointError))
    except TypeError as err:
        raise CheckpointError(f"{path}: not a trainer state ({first_line(err)})") from None
    rng_file = folder / native.RNG
    rngs = _safe_load(rng_file, torch.device("cpu"))
    try:
        set_rng_states(rngs[rank % len(rngs)])
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{rng_file}: not RNG states ({first_line(err)})") from None
    return state


def _check_groups(path: Path, groups: Any, optimizer: TrainingOptimizer) -> None:
    """A saved optimizer's parameter groups must have this run's hyperparameters (torch would load them and fail
    at the first step)."""
    if not groups or not isinstance(groups, list) or not isinstance(groups[0], dict):
        raise CheckpointError(f"{path}: not an optimizer state")
    missing = sorted(set(optimizer.defaults) - set(groups[0]))
    if missing:
        raise ConfigError(f"{path}: was written by another optimizer than this run's (it has no "
                          f"{', '.join(missing)}): was optim.optimizer changed?")


def _fits(path: Path, load: Any, state: dict[str, Any]) -> None:
    """``load(state)``, a state that does not fit the optimizer said in one line naming ``path``."""
    try:
        load(state)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise ConfigError(f"{path}: does not fit the optimizer of this run: was optim.optimizer changed? "
                          f"({first_line(err)})") from None


def _load_shards(folder: Path, model: torch.nn.Module, optimizer: TrainingOptimizer, absent: list[str]) -> None:
    """A sharded checkpoint into the model and optimizer, at this run's layout. An optimizer with a per-parameter
    state (ddp, fsdp) reads only its own pieces, in place; the flat-buffer ones read full tensors, as from a full
    checkpoint."""
    from ironcore.checkpoints import sharded  # torch.distributed.checkpoint: 1 s to import

    path, saved = folder / native.SHARDS, sharded.saved_tensors(folder)
    names = {k[len(native.MODEL_PREFIX):] for k in saved if k.startswith(native.MODEL_PREFIX)}
    wanted = [n for n in model.state_dict() if n not in absent or n in names]
    missing, unexpected = sorted(set(wanted) - names), sorted(names - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        optimizer.local_state_dict()
    except NotImplementedError:  # flat buffers: full tensors, through the full checkpoint's path
        full = sharded.read_full(folder)  # weights and optimizer state, every tensor in one read
        weights = {k.removeprefix(native.MODEL_PREFIX): t for k, t in full.items() if k.startswith(native.MODEL_PREFIX)}
        optimizer.load_master_weights(load_full_state_dict(model, weights, absent))
        state: dict[str, Any] = {"state": {}, "param_groups": _read_groups(folder)}
        _check_groups(path, state["param_groups"], optimizer)
        for key, tensor in full.items():
            if key.startswith(native.OPTIMIZER_PREFIX):
                name, _, entry = key.removeprefix(native.OPTIMIZER_PREFIX).rpartition("/")
                state["state"].setdefault(name, {})[entry] = tensor
        _fits(path, optimizer.load_full_state_dict, state)
        return
    make, own = sharded.piece_maker(model), model.state_dict()
    read = sharded.read_shards(folder, {GROUPS: None, **{f"{native.MODEL_PREFIX}{n}": make(n, own[n]) for n in wanted}})
    groups = read[GROUPS]  # the weights were read into the model in place
    _check_groups(path, groups, optimizer)
    # The optimizer's state exists after its first step only: zeros in this layout first, then read into them.
    params, shapes = dict(model.named_parameters()), full_shapes(model)
    skeleton: dict[str, Any] = {"state": {}, "param_groups": groups}
    for key, md in saved.items():
        if key.startswith(native.OPTIMIZER_PREFIX):
            name, _, entry = key[len(native.OPTIMIZER_PREFIX):].rpartition("/")
            if name not in params:
                raise CheckpointError(f"{path}: optimizer state of {name}, which the model does not have")
            shaped = md.size == shapes[name] and len(md.size) > 0
            skeleton["state"].setdefault(name, {})[entry] = (
                torch.zeros_like(params[name], dtype=md.properties.dtype) if shaped
                else torch.zeros(md.size, dtype=md.properties.dtype))  # fmt: skip
    _fits(path, optimizer.load_local_state_dict, skeleton)
    into = {f"{native.OPTIMIZER_PREFIX}{name}/{key}": make(name, v) if param_shaped(v, params[name]) else v
            for name, values in optimizer.local_state_dict()["state"].items()
            for key, v in values.items() if isinstance(v, torch.Tensor)}  # fmt: skip
    sharded.read_shards(folder, into)


def _read_groups(folder: Path) -> Any:
    """A sharded checkpoint's optimizer parameter groups, read by this process alone (without running code)."""
    from ironcore.checkpoints import sharded  # torch.distributed.checkpoint: 1 s to import

    return sharded.read_shards(folder, {GROUPS: None}, alone=True)[GROUPS]


def load_objective_state(folder: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's entry of the checkpoint's objective state; empty when it saved none or was written by
    another number of ranks (the objective then starts its state afresh, which it is told in a warning)."""
    path = folder / native.OBJECTIVE
    if not path.is_file():
        return {}
    states = _safe_load(path, torch.device("cpu"))
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise CheckpointError(f"{path}: not an objective state")
    if len(states) != world_size:
        log.warning("%s was saved by %d ranks, this run has %d: the objective's state starts afresh",
                    path, len(states), world_size)
        return {}
    return states[rank]


def _safe_load(path: Path, device: torch.device) -> Any:
    """``torch.load`` that can only build tensors, numbers, strings and containers (never runs code)."""
    try:
        with open(path, "rb"):  # missing, a folder, no permission: said plainly, before torch words it
            pass
    except OSError as err:
        raise CheckpointError(describe_os_error(err, path)) from None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refusing to load it: it is not only tensors and numbers (damaged, written "
                              f"by an older IronCore, or tampered with): {_unpickling_reason(err)}") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: cannot read it (truncated or damaged: {first_line(err)})") from None


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only message that says what was refused ("Unsupported global: …")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith("Unsupported")]
    return lines[0] if lines else first_line(err)


def rng_states() -> dict[str, Any]:
    """This process's random states as tensors, numbers and strings only (safe to load, see :func:`_safe_load`)."""
    version, mt, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
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

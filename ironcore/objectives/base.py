"""The interface between the training loop and a training objective.

The trainer owns what every objective shares: the loop, gradient
accumulation, gradient synchronisation and clipping, the optimizer and its
schedule, checkpoints and resume, signals, logging and tracking. An
:class:`Objective` owns the rest:

* what a sample is (``sequences_per_sample``: 2 for a preference pair) and
  which data it reads (``task_types``);
* the forward and backward passes of one global batch (this rank's
  micro-batches), normalised over the *whole* global batch (all micro-batches,
  all data-parallel ranks), so that gradient accumulation and the DP layout
  change nothing; the trainer then sums gradients over DP ranks;
* the metrics it logs (``loss`` always; others under their own names,
  e.g. TRL's ``rewards/margins``), and what it adds to the console line;
* how it scores a validation split;
* any state of its own (DPO's frozen or precomputed reference), including
  what it does to the data set before training (:meth:`Objective.prepare`).

Metrics are plain floats. Names without a ``/`` are tracked in MLflow as
``train/NAME`` (validation: ``val_NAME`` -> ``val/NAME``); names with a
``/`` are tracked as they are (validation: ``val/NAME``).

An objective of your own is a subclass in any importable module, named in
the config as ``trainer.objective: my_package.my_module:MyObjective``
(see ``docs/objectives.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch

from ironcore.checkpoints.load import load_weights
from ironcore.config.training import Config
from ironcore.data.samples.batches import MicroBatch
from ironcore.errors import UserError
from ironcore.models.lora import AdaptersOff
from ironcore.models.transformer import TransformerModel
from ironcore.parallel import comm, state
from ironcore.parallel.fsdp import shard_model, uses_fsdp
from ironcore.parallel.sharding import load_full_state_dict

# The model's forward pass: (input_ids, position_ids, attention_mask, parallel_output=...) -> logits.
Forward = Callable[..., torch.Tensor]


@dataclasses.dataclass
class ObjectiveContext:
    """What an objective may use of the run it is part of."""

    config: Config  # the whole resolved run config
    device: torch.device
    autocast: AbstractContextManager  # every forward pass runs inside it (bf16 autocast, or nothing)
    data_dir: Path  # the preprocessed data set (its shards, metadata.json, caches)
    metadata: dict[str, Any]  # that data set's metadata.json
    seq_len: int  # positions per sequence (the data config's max_seq_length; rl: the prompt budget)
    model: torch.nn.Module  # the policy being trained, for objectives that sample from it (GRPO's rollouts)
    step: Callable[[], int]  # the optimizer step being computed (0-based): seeds per-step draws, resumably


@dataclasses.dataclass
class StepResult:
    """What one global batch's backward pass reports."""

    metrics: dict[str, float]  # "loss" and whatever else the objective logs
    tokens: int  # trained tokens of the global batch, all DP ranks (the token count)
    processed: int | None = None  # positions the step's forward passes ran, all DP ranks (tok/s, MFU);
    # None: train_batch_size x seq_len x sequences_per_sample (the padded batch)


@dataclasses.dataclass(frozen=True)
class MemoryShape:
    """How one micro-batch of an objective's step differs from a language model's, for the memory planner
    (``ironcore.training.memory.plan_memory``): it cannot run the objective, so the objective says."""

    rows_per_sample: int = 1  # sequences the forward pass runs per sample (DPO's pair: 2; GRPO: num_generations)
    new_tokens: int = 0  # positions a rollout adds to each row's seq_len (GRPO: max_completion_length)
    reference: bool = False  # a frozen copy of the weights is held beside the policy (not with LoRA: adapters off)
    kv_cache: bool = False  # rollouts decode with a KV cache (on a GPU the decode arena keeps it between steps)


class Objective(ABC):
    """A training objective: subclass it and implement :meth:`backward` and :meth:`evaluate`."""

    sequences_per_sample: ClassVar[int] = 1  # sequences of max_seq_length tokens in one sample
    task_types: ClassVar[tuple[str, ...] | None] = None  # data it can read (ironcore.data.preprocessing.tasks); None: any
    Options: ClassVar[type | None] = None  # a dataclass: trainer.objective_options is checked against it
    score_head: ClassVar[bool] = False  # True: trains a reward model (model.score_head), not a language model
    # True: backward() runs one forward pass with gradients per micro-batch, each followed by its backward pass,
    # so the trainer may start the gradient reduction during the last one (trainer.overlap_grad_reduce).
    one_backward_per_micro_batch: ClassVar[bool] = False

    def __init__(self, context: ObjectiveContext, options: Any = None) -> None:
        self.context = context
        self.config = context.config
        self.device = context.device
        self.autocast = context.autocast
        self.options = options

    def prepare(self, datasets: dict[str, torch.utils.data.Dataset]) -> dict[str, torch.utils.data.Dataset]:
        """The splits (``train``, and ``valid`` when there is one) as this objective wants them served.

        Called once, on every rank, before the first step; the default serves them as they are.
        """
        return datasets

    @abstractmethod
    def backward(self, forward: Forward, micro_batches: list[MicroBatch]) -> StepResult:
        """Forward and backward passes over this rank's micro-batches of one global batch.

        Gradients must come out normalised for the whole global batch (see
        the module doc); the metrics are those of the whole global batch.
        """

    @abstractmethod
    def evaluate(self, forward: Forward, batches: Iterable[list[MicroBatch]]) -> dict[str, float]:
        """Validation metrics over ``batches`` (each: this rank's share of a global batch), named ``val_*``."""

    def log_fields(self, metrics: dict[str, float]) -> str:
        """What this objective adds to the console line of a step (e.g. ``" | acc 0.75"``)."""
        return ""

    def memory_shape(self) -> MemoryShape:
        """What the memory planner should plan for (see :class:`MemoryShape`); by default
        ``sequences_per_sample`` rows per sample and nothing else."""
        return MemoryShape(rows_per_sample=self.sequences_per_sample)

    def state_dict(self) -> dict[str, Any]:
        """This rank's state that a resumed run needs (tensors, numbers, strings; saved in checkpoints as
        ``objective.pt``, one entry per rank), e.g. GRPO's rollouts still to be trained on; none by default."""
        return {}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave, on resume (only from a checkpoint of the same world size)."""
        return None

    def artifacts(self) -> list[Path]:
        """Files this objective wrote since the last call (e.g. GRPO's sample and completion tables), which the
        trainer logs to MLflow after each log line and evaluation, in a folder named like the file's; none by
        default."""
        return []


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the data-parallel ranks (in place; a no-op in one process)."""
    return comm.all_reduce(values, state.dp_group())


def frozen_reference(context: ObjectiveContext) -> torch.nn.Module:
    """A frozen copy of the run's starting weights (DPO's and GRPO's reference), also when the policy resumes.

    That is ``init.init_from`` when set, else the seed's initialisation
    (rebuilt under a forked RNG so the policy's random streams are untouched), sharded like the policy under
    FSDP. With LoRA it is the policy itself with its adapters switched off: the frozen base, no second copy.
    """
    cfg = context.config
    if cfg.model.lora is not None:
        return AdaptersOff(context.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init.seed)
        reference = TransformerModel(cfg.model)
    if cfg.init.init_from:
        try:
            load_full_state_dict(reference, load_weights(cfg.init.init_from))
        except UserError as err:
            raise UserError(f"init.init_from {cfg.init.init_from}: {err}") from None
    reference = reference.requires_grad_(False).eval().to(context.device)
    if uses_fsdp(cfg.trainer):  # sharded like the policy: no rank holds the whole frozen copy
        shard_model(reference, cfg.trainer)
        logging.getLogger("ironcore.train").info("reference model: sharded like the policy (FSDP)")
    return reference

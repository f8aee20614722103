"""The optimizer as the training loop sees it: one interface, whatever shards, casts or reduces underneath.

The trainer steps every optimizer the same way (Megatron-core's ``MegatronOptimizer``, torchtitan's
``OptimizersContainer``), so a new one (FSDP, Muon) plugs in without touching the loop::

    optimizer.arm()                        # before the step's last forward pass with gradients
    ... the objective's forward and backward passes ...
    optimizer.finish_grad_sync()           # TP sums and the DP reduction (or waiting for overlapped ones)
    norm = optimizer.grad_norm().item()    # the global norm of the reduced gradient (collective)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step(clip_factor(norm, max_norm))   # gradients times the clipping factor
    optimizer.zero_grad()

Checkpoints hold the model's weights (``master_weights()`` in place of the parameters when the
optimizer keeps more precise copies) and ``full_state_dict()``: the state keyed by parameter name in
full (TP=1) shapes, so a run resumes with another implementation or layout. A sharded checkpoint
(:mod:`ironcore.checkpoints.sharded`) takes ``local_state_dict()`` instead: each rank's own pieces.

Built in: :class:`DataParallelOptimizer` (a torch optimizer, gradients all-reduced over DP) and two on
flat buffers (:mod:`~ironcore.training.distributed_optimizer`): ``DistributedOptimizer`` (ZeRO-1 sharding,
overlapped reduction, optionally bf16 parameters) and ``MixedPrecisionOptimizer`` (bf16 parameters with
fp32 main gradients and master weights, unsharded). ``optim.implementation`` names one of
your own (:func:`~ironcore.training.optim.build_training_optimizer`).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
from torch import nn

from ironcore.parallel.grad import finalize_grads, grad_norm
from ironcore.parallel.sharding import (
    full_optimizer_state,
    load_full_optimizer_state,
    load_named_optimizer_state,
    named_optimizer_state,
)


class TrainingOptimizer(Protocol):
    """What the trainer and its checkpoints ask of an optimizer (see the module doc for the order)."""

    param_groups: list[dict[str, Any]]  # the trainer sets each group's "lr" before a step
    defaults: dict[str, Any]  # the hyperparameters every group holds: a checkpoint's groups must have them

    def arm(self) -> None:
        """The next backward pass is the step's last (objectives with one per micro-batch): an optimizer that
        reduces gradients during the backward pass starts then; others do nothing."""

    def finish_grad_sync(self) -> None:
        """After the step's backward passes: make the gradients those of the whole global batch."""

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the whole model's reduced gradient, the same on every rank (collective)."""

    def step(self, scale: float = 1.0) -> None:
        """Update the parameters from the gradients times ``scale`` (the clipping factor)."""

    def zero_grad(self) -> None:
        """Drop the step's gradients before the next one accumulates."""

    def full_state_dict(self) -> dict[str, Any]:
        """The state for a checkpoint: keyed by parameter name, full (TP=1) shapes (collective)."""

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`full_state_dict` wrote, at any TP/DP layout."""

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's state for a sharded checkpoint, without communication: keyed by parameter name, tensors of
        the parameter's shape in the parameter's own layout (TP-local; an FSDP shard). Raises
        NotImplementedError when its state is not kept per parameter (the run then writes full checkpoints)."""

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`local_state_dict` gives, in this run's layout (a sharded checkpoint reads into it)."""

    def master_weights(self) -> dict[str, torch.Tensor]:
        """Weights by parameter name that a checkpoint stores instead of the parameters (more precise copies,
        TP-local shapes; collective), or {} when the parameters are the weights."""

    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's weights (TP-local shapes) into the master weights, if any."""

    def memory_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What it holds beyond the parameters: gradient buffers (besides ``.grad``) and state tensors, for the
        memory log (:func:`~ironcore.training.memory.measured_state_bytes`)."""

    def report(self) -> str | None:
        """A line for the log after the first step (e.g. how its communication went), or None."""


# The methods a TrainingOptimizer defines, in the protocol's order (checked when optim.implementation names one).
METHODS = tuple(name for name, value in vars(TrainingOptimizer).items() if callable(value) and name[0] != "_")


class DataParallelOptimizer:
    """Plain data parallelism: a torch optimizer over the whole model on every rank, gradients all-reduced."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.inner, self.model = optimizer, model

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The torch optimizer's groups (read each time: its ``load_state_dict`` replaces the list)."""
        return self.inner.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def arm(self) -> None:
        """Nothing: the all-reduce runs after the backward pass."""

    def finish_grad_sync(self) -> None:
        """TP sums, then one bucketed DP all-reduce (a sum: losses are normalised over the global batch)."""
        finalize_grads(self.model, dp_reduction="sum")

    def grad_norm(self) -> torch.Tensor:
        """The global norm, split tensors counted over TP ranks and replicated ones once."""
        return grad_norm(self.model)

    def step(self, scale: float = 1.0) -> None:
        """The torch optimizer's step on the gradients times ``scale`` (:func:`scaled_step`)."""
        scaled_step(self.inner, scale)

    def zero_grad(self) -> None:
        """Set the gradients to None (the next backward pass allocates them)."""
        self.inner.zero_grad(set_to_none=True)

    def full_state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state, keyed by parameter name and gathered over TP."""
        return full_optimizer_state(self.model, self.inner)

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full state, split to this TP rank's parameters."""
        load_full_optimizer_state(self.model, self.inner, state)

    def local_state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state keyed by parameter name, as this rank holds it."""
        return named_optimizer_state(self.model, self.inner)

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state keyed by parameter name in this rank's layout."""
        load_named_optimizer_state(self.model, self.inner, state)

    def master_weights(self) -> dict[str, torch.Tensor]:
        """{}: the parameters are the weights."""
        return {}

    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Nothing: the parameters hold the weights already."""

    def memory_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """No buffers of its own; the torch optimizer's state tensors."""
        return [], state_tensors(self.inner)

    def report(self) -> str | None:
        """Nothing to add."""
        return None


@functools.singledispatch
def as_training_optimizer(optimizer: TrainingOptimizer, model: nn.Module) -> TrainingOptimizer:
    """``optimizer`` as the trainer's interface: an implementation is itself, a bare torch optimizer becomes
    :class:`DataParallelOptimizer` (for scripts and tests that build a torch optimizer themselves)."""
    return optimizer


@as_training_optimizer.register
def _(optimizer: torch.optim.Optimizer, model: nn.Module) -> TrainingOptimizer:
    return DataParallelOptimizer(optimizer, model)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of a torch optimizer's state (moments, device-side step counts), for the memory log."""
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def scaled_step(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """``optimizer.step()`` on its gradients times ``factor`` (the clipping factor; 1 costs nothing): the one
    spelling of it for plain training and for the distributed optimizer's shards, so that both do the same
    arithmetic.

    A fused optimizer (``fused=True``, torch's ``_step_supports_amp_scaling``) divides each gradient by its
    ``grad_scale`` attribute inside its one kernel -- the hook ``torch.amp.GradScaler`` uses -- saving a
    separate read and write of every gradient (on CPU the kernel also leaves the scaled gradients in
    ``.grad``). Others get the factor multiplied in first.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]  # a shard's group may be empty
    if factor == 1.0 or not params:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32, device=params[0].device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
        optimizer.step()

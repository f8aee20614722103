"""Optimizer construction and the learning-rate schedule.

Weight decay is decoupled (AdamW) and applies only to matrices of linear
layers: norms, biases and embeddings (tokens and positions) are not decayed,
as in GPT-3/Megatron practice, since shrinking them towards zero only removes
capacity without regularising anything useful. ``optimizer: adam`` is an
alias of adamw; ``muon`` gives the transformer blocks' matrices to
torch.optim.Muon (:mod:`ironcore.training.muon`); ``module:Class`` is any
torch optimizer, built on the same groups with ``optim.optimizer_options``.
:func:`parameter_rule` is the one place that decides, per parameter, decay
or not and Muon or not.

The trainer gets a :class:`~ironcore.training.optimizer.TrainingOptimizer`
(:func:`build_training_optimizer`): the built-in one the config asks for, or
``optim.implementation``'s ``module:Class``. :func:`reduce_gradients` and
:func:`step_with_scaled_grads` are the same steps as functions, for scripts
and tests that hold a bare torch optimizer.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from ironcore.config.base import did_you_mean, named_object
from ironcore.config.training import SCHEDULES, Config, OperationConfig, OptimConfig
from ironcore.errors import ConfigError
from ironcore.parallel.fsdp import shard_model, uses_fsdp
from ironcore.parallel.layers import VocabParallelEmbedding
from ironcore.training.distributed_optimizer import (
    DistributedOptimizer,
    FlatBufferOptimizer,
    MixedPrecisionOptimizer,
)
from ironcore.training.fsdp import FSDPOptimizer
from ironcore.training.muon import MuonWithAdamW, parameter_splits
from ironcore.training.optimizer import METHODS, TrainingOptimizer, as_training_optimizer, scaled_step

KEY = "optim.implementation"


def parameter_rule(name: str, param: torch.Tensor, embeddings: set[int]) -> tuple[bool, bool]:
    """(decayed, Muon's) for the parameter ``name``: decay only matrices that are not embeddings (``embeddings``:
    their ids); Muon only for the hidden matrices, the 2-D weights inside the transformer blocks (``layers.``):
    not the embeddings or the output head, which map tokens rather than hidden states, nor norms and biases."""
    decayed = param.dim() >= 2 and id(param) not in embeddings
    return decayed, decayed and param.dim() == 2 and name.startswith("layers.")


def parameter_groups(model: nn.Module, weight_decay: float, muon_weight_decay: float | None = None) -> list[dict]:
    """Decayed weights and everything else (norms, biases, embeddings); with ``muon_weight_decay`` the hidden
    matrices first, in a group of their own marked ``"muon": True`` (:func:`parameter_rule`)."""
    muon, decay, no_decay = [], [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, VocabParallelEmbedding))}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed, hidden = parameter_rule(name, param, embeddings)
        (muon if hidden and muon_weight_decay is not None else decay if decayed else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if muon_weight_decay is None:
        return groups
    return [{"params": muon, "weight_decay": muon_weight_decay, "muon": True}, *groups]


def build_optimizer(model: nn.Module, cfg: OptimConfig, distributed: bool = False, overlap: bool = False,
                    precision: str = "fp32") -> torch.optim.Optimizer | FlatBufferOptimizer:  # fmt: skip
    """AdamW (the fused single-kernel implementation: ~4x faster than the default on CPU), SGD, Muon with AdamW
    or a ``module:Class`` torch optimizer, with ``cfg.optimizer_options``; with
    ``distributed`` its state sharded over the data-parallel ranks (:class:`DistributedOptimizer`, ``overlap``:
    its reductions started during the backward pass). ``precision="bf16"`` makes the parameters bf16 with
    fp32 main gradients and master weights in the optimizer (the flat buffers of :class:`DistributedOptimizer`,
    or unsharded: :class:`MixedPrecisionOptimizer`)."""

    options = dict(cfg.optimizer_options)
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    adamw = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused}

    def build(groups: list[dict]) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.max_lr, momentum=cfg.momentum, **options)
        if cfg.optimizer == "muon":
            return MuonWithAdamW(groups, cfg.max_lr, muon=options, adamw=adamw, splits=parameter_splits(model))
        if cfg.optimizer in ("adamw", "adam"):
            return torch.optim.AdamW(groups, lr=cfg.max_lr, **adamw, **options)
        cls = torch_optimizer_class(cfg.optimizer)
        keywords = optimizer_keywords(cls)
        unknown = sorted(set(options) - keywords) if keywords is not None else []
        if unknown:
            raise ConfigError(f"config key 'optim.optimizer_options': {cfg.optimizer} takes no option "
                              f"'{unknown[0]}'{did_you_mean(unknown[0], keywords)} (it takes: "
                              f"{', '.join(sorted(keywords))})")
        return cls(groups, **({"lr": cfg.max_lr} if keywords is None or "lr" in keywords else {}), **options)

    # Muon's own weight decay (optimizer_options) is its group's; the option would not override a group's value
    muon_weight_decay = options.pop("weight_decay", cfg.weight_decay) if cfg.optimizer == "muon" else None
    groups = parameter_groups(model, cfg.weight_decay, muon_weight_decay)
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    if distributed:
        return DistributedOptimizer(model, groups, build, overlap=overlap, param_dtype=param_dtype)
    return MixedPrecisionOptimizer(model, groups, build) if param_dtype else build(groups)


def build_training_optimizer(model: nn.Module, cfg: Config) -> TrainingOptimizer:
    """The run's optimizer: ``optim.implementation``'s class built as ``Class(model, cfg)``, or the built-in one
    of ``optim.optimizer``, ``trainer.data_parallel`` (and ``overlap_grad_reduce``, ``offload``) and
    ``trainer.precision``. With ``fsdp`` the model is sharded in place first (at DP size 1 there is nothing to
    shard: it trains as ``ddp``, unless ``offload`` asks FSDP to keep the weights and optimizer on the host)."""
    if cfg.optim.implementation:
        return optimizer_class(cfg.optim.implementation)(model, cfg)
    if uses_fsdp(cfg.trainer):
        shard_model(model, cfg.trainer)
        return FSDPOptimizer(build_optimizer(model, cfg.optim), model)
    built = build_optimizer(model, cfg.optim, distributed=cfg.trainer.distributed_optimizer,
                            overlap=cfg.trainer.overlap_grad_reduce, precision=cfg.trainer.precision)  # fmt: skip
    return as_training_optimizer(built, model)


def torch_optimizer_class(spec: str) -> type:
    """The torch optimizer class ``module:Class`` names; one line naming optim.optimizer when it is not one."""
    cls = named_object(spec, "optim.optimizer")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"config key 'optim.optimizer': {spec} is not a torch.optim.Optimizer subclass")
    return cls


def optimizer_keywords(cls: type) -> set[str] | None:
    """The keyword arguments ``cls.__init__`` takes besides the parameters (None: any, it has ``**kwargs``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def optimizer_class(spec: str) -> type:
    """The class an ``optim.implementation`` value (``module:Class``) names; ConfigError naming the key when it
    cannot be imported or lacks a :class:`TrainingOptimizer` method."""
    cls = named_object(spec, KEY, "Class")
    missing = [method for method in METHODS if not callable(getattr(cls, method, None))]
    if missing:
        raise ConfigError(f"{KEY}: {spec} does not implement the TrainingOptimizer interface "
                          f"(ironcore/training/optimizer.py); missing: {', '.join(missing)}")
    return cls


def reduce_gradients(model: nn.Module, optimizer: torch.optim.Optimizer | TrainingOptimizer) -> torch.Tensor:
    """The step's gradient communication, then the global gradient norm: TP sums and a DP all-reduce
    (``finalize_grads``, ``grad_norm``) for a torch optimizer, or the optimizer's own (the distributed
    optimizer: TP sums, its reduce-scatter, the norm from its shards)."""
    training = as_training_optimizer(optimizer, model)
    training.finish_grad_sync()
    return training.grad_norm()


@functools.singledispatch
def step_with_scaled_grads(optimizer: TrainingOptimizer, factor: float) -> None:
    """``optimizer.step()`` on the gradients times ``factor`` (the gradient-clipping factor; 1 costs nothing).

    Torch optimizers and the distributed optimizer's shards go through the same
    :func:`~ironcore.training.optimizer.scaled_step` (a fused optimizer divides by ``grad_scale`` inside its
    kernel; others multiply first), so plain DP and the sharded optimizer update every element with the same
    arithmetic. It equals clipping, then stepping, to rounding (``tests/test_optim.py``).
    """
    optimizer.step(factor)


@step_with_scaled_grads.register
def _(optimizer: torch.optim.Optimizer, factor: float) -> None:
    scaled_step(optimizer, factor)


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to max_lr, then ``cfg.lr_schedule``.

    ``cosine``/``linear`` decay from max_lr to min_lr over the steps after warmup, ``constant`` stays at
    max_lr. ``wsd`` (warmup-stable-decay, MiniCPM's) stays at max_lr until the last ``decay_fraction`` of
    the run, whose ``round(decay_fraction * total_steps)`` steps fall to min_lr along ``decay_shape``, the
    last step at min_lr: the stable phase does not depend on the run's length, so a checkpoint from it can
    be continued into a longer run. ``module:function`` is called as ``function(step, total_steps, cfg)``.
    """
    if cfg.lr_schedule not in SCHEDULES:
        return float(schedule_function(cfg.lr_schedule)(step, total_steps, cfg))
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.max_lr
    if cfg.lr_schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        progress = (step - (total_steps - decay_steps) + 1) / decay_steps
        if progress <= 0:
            return cfg.max_lr
        progress = min(1.0, progress)
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[cfg.decay_shape]
        return cfg.min_lr + (cfg.max_lr - cfg.min_lr) * factor
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.max_lr - cfg.min_lr) * factor


@functools.cache
def schedule_function(spec: str) -> Callable[[int, int, OptimConfig], float]:
    """The function an ``optim.lr_schedule`` of ``module:function`` names (imported once)."""
    function = named_object(spec, "optim.lr_schedule")
    if not callable(function):
        raise ConfigError(f"config key 'optim.lr_schedule': {spec} is not a function")
    return function


def total_steps(op: OperationConfig, tokens_per_step: int) -> int:
    """Optimizer steps of the run: train_steps, or the token budget rounded up to whole steps."""
    if op.train_steps is not None:
        return op.train_steps
    return math.ceil(op.train_tokens / tokens_per_step)

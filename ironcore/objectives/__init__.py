"""Training objectives: what a run minimises, as plug-ins of the trainer.

base   the Objective interface, its context, StepResult
lm     LMObjective: next-token cross-entropy over the trained tokens (pretraining, SFT)
dpo    DPOObjective: direct preference optimisation with a live or precomputed reference
grpo   GRPOObjective: group-relative policy optimisation, with rollouts from the policy and reward functions
reward_model  RewardModelObjective: a scalar head trained on preference pairs (Bradley–Terry)

``trainer.objective`` picks one: a built-in name (:data:`BUILTIN`) or
``module:Class`` of your own; left null, the data set's task type decides
(:mod:`ironcore.data.preprocessing.tasks`). See ``docs/objectives.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from ironcore.config.base import did_you_mean, from_dict
from ironcore.data.preprocessing.tasks import dataset_task
from ironcore.errors import ConfigError
from ironcore.objectives.base import Objective, ObjectiveContext, StepResult, global_sum
from ironcore.objectives.dpo import DPOObjective
from ironcore.objectives.grpo import GRPOObjective
from ironcore.objectives.lm import LMObjective
from ironcore.objectives.reward_model import RewardModelObjective

__all__ = ["BUILTIN", "DPOObjective", "GRPOObjective", "LMObjective", "Objective", "ObjectiveContext",
           "RewardModelObjective", "StepResult", "build_objective", "global_sum", "objective_class"]

BUILTIN: dict[str, type[Objective]] = {
    "lm": LMObjective, "dpo": DPOObjective, "grpo": GRPOObjective, "reward_model": RewardModelObjective,
}
KEY = "trainer.objective"


def objective_class(spec: str) -> type[Objective]:
    """The objective class a ``trainer.objective`` value names; ConfigError naming the key otherwise."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(
            f"{KEY}: '{spec}' is neither a built-in objective ({', '.join(BUILTIN)}) nor module:Class"
            + did_you_mean(spec, BUILTIN)
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{KEY}: cannot import module '{module_name}' ({err})") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ConfigError(f"{KEY}: module '{module_name}' has no '{name}'")
    if not (inspect.isclass(cls) and issubclass(cls, Objective)) or inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ())) if inspect.isclass(cls) else []
        raise ConfigError(
            f"{KEY}: {spec} does not implement the Objective interface (subclass "
            "ironcore.objectives.Objective and define backward and evaluate)"
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    return cls


def _options(cls: type[Objective], given: dict[str, Any]) -> Any:
    """``trainer.objective_options`` as the objective's Options dataclass (checked like any config group)."""
    if cls.Options is None:
        if given:
            raise ConfigError(f"trainer.objective_options: {cls.__name__} takes no options, got {sorted(given)}")
        return None
    if not dataclasses.is_dataclass(cls.Options):
        raise ConfigError(f"{KEY}: {cls.__name__}.Options must be a dataclass")
    return from_dict(cls.Options, given, "trainer.objective_options")


def build_objective(context: ObjectiveContext) -> Objective:
    """The run's objective: ``trainer.objective``, else the data set's default, checked against the data."""
    task = dataset_task(context.metadata, context.data_dir)
    spec = context.config.trainer.objective or task.objective
    cls = objective_class(spec)
    if cls.task_types is not None and task.name not in cls.task_types:
        raise ConfigError(
            f"{KEY}: {spec} trains on {' or '.join(cls.task_types)} data, but {context.data_dir} holds "
            f"{task.name} data"
        )
    if cls.score_head != context.config.model.score_head:
        raise ConfigError(
            f"{KEY}: {spec} trains a {'reward model' if cls.score_head else 'language model'}, so it needs "
            f"model.score_head: {str(cls.score_head).lower()}"
        )
    return cls(context, _options(cls, context.config.trainer.objective_options))

"""Task types: the one place that knows what each kind of data set is.

A :class:`TaskSpec` says, for one ``task_type`` of a data config,

* ``layouts`` -- the record fields it reads (alternatives; ``fields`` naming
  exactly one layout's fields picks it, else the first layout holding them is
  used, the first being the default), which the data config's ``fields`` maps
  to the source's columns;
* ``streams`` -- the shards each split of a preprocessed data set holds (the
  first is a token stream);
* ``encoder`` -- how a chunk of records becomes tokens and loss masks
  (:mod:`ironcore.data.preprocessing.encode`, run in the preprocessing workers);
* ``objective`` -- the training objective used unless ``trainer.objective``
  names another (:mod:`ironcore.objectives`);
* ``text_files`` -- whether plain text files are records of it (only
  pretraining documents are; the others need named fields);
* ``keeps_fields`` -- whether each split keeps its records' fields in a JSONL
  beside the shards (RL prompts: what the reward functions need).

How a split's shards become training samples is the other half of a task
type, and lives with the runtime data (:mod:`ironcore.data.samples.build`):
preprocessing never builds samples, so it never imports torch. Adding a task
type is an encoder and one entry in :data:`TASKS` here, a dataset class and
one builder there (a test checks that both tables name the same types).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironcore.config.base import InvalidValue, did_you_mean
from ironcore.data.preprocessing.encode import (
    PAIR_STREAMS,
    ChatEncoder,
    DPOEncoder,
    Encoder,
    PretrainEncoder,
    RLEncoder,
    SFTEncoder,
)
from ironcore.errors import DataError

if TYPE_CHECKING:
    from ironcore.data.preprocessing.config import DataConfig
    from ironcore.data.preprocessing.tokenizer import Tokenizer


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific about a data set (see the module doc)."""

    name: str
    layouts: tuple[tuple[str, ...], ...]
    streams: tuple[str, ...]
    encoder: Callable[[Tokenizer, DataConfig], Encoder]
    objective: str
    text_files: bool = False
    keeps_fields: bool = False

    def resolve_fields(self, fields: dict[str, str]) -> dict[str, str]:
        """``fields`` completed with the default column names of the layout it uses; InvalidValue otherwise."""
        for layout in self.layouts:
            if set(fields) == set(layout):
                return dict(fields)
        for layout in self.layouts:
            if set(fields) <= set(layout):
                return {**{name: name for name in layout}, **fields}
        closest = max(self.layouts, key=lambda layout: len(set(fields) & set(layout)))
        unknown = next(key for key in fields if key not in closest)
        raise InvalidValue(f"fields.{unknown}", f"a {self.name} data set reads {self.describe_layouts()}")

    def describe_layouts(self) -> str:
        return " or ".join("{" + ", ".join(layout) + "}" for layout in self.layouts)


def _sft_encoder(tokenizer: Tokenizer, config: DataConfig) -> Encoder:
    return ChatEncoder(tokenizer, config) if config.is_chat else SFTEncoder(tokenizer, config)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="pretrain", layouts=(("text",),), streams=("tokens",), encoder=PretrainEncoder,
            objective="lm", text_files=True,
        ),
        TaskSpec(
            name="sft", layouts=(("prompt", "response"), ("messages",)), streams=("tokens", "loss_mask"),
            encoder=_sft_encoder, objective="lm",
        ),
        TaskSpec(
            # {chosen, rejected}: the prompt is implicit, their shared beginning (TRL's implicit-prompt format).
            name="dpo", layouts=(("prompt", "chosen", "rejected"), ("chosen", "rejected")), streams=PAIR_STREAMS,
            encoder=DPOEncoder,
            objective="dpo",
        ),
        TaskSpec(
            name="rl", layouts=(("prompt",), ("messages",)), streams=("prompt",), encoder=RLEncoder,
            objective="grpo", keeps_fields=True,
        ),
    )
}


def task_spec(name: str, key: str = "task_type") -> TaskSpec:
    """The spec of task type ``name``; InvalidValue naming ``key`` when there is none."""
    if name not in TASKS:
        raise InvalidValue(key, f"'{name}' is not a task type ({', '.join(TASKS)}){did_you_mean(name, TASKS)}")
    return TASKS[name]


def dataset_task(metadata: dict[str, Any], where: str | Path) -> TaskSpec:
    """The spec of a preprocessed data set (its ``metadata.json``), or a DataError naming ``where``."""
    try:
        return task_spec(metadata.get("task_type", ""))
    except InvalidValue as err:
        raise DataError(f"{where}: {err.problem}") from None

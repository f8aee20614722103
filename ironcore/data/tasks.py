"""Task types: the one place that knows what each kind of data set is.

A :class:`TaskSpec` says, for one ``task_type`` of a data config,

* ``layouts`` -- the record fields it reads (alternatives; the first is the
  default), which the data config's ``fields`` maps to the source's columns;
* ``streams`` -- the shards each split of a preprocessed data set holds (the
  first is a token stream);
* ``encoder`` -- how a chunk of records becomes tokens and loss masks
  (:mod:`ironcore.data.encode`, run in the preprocessing workers);
* ``dataset`` -- how a split's shards become training samples
  (:mod:`ironcore.data.pretrain`, :mod:`~ironcore.data.sft`, :mod:`~ironcore.data.dpo`,
  :mod:`~ironcore.data.rl`);
* ``objective`` -- the training objective used unless ``trainer.objective``
  names another (:mod:`ironcore.objectives`);
* ``text_files`` -- whether plain text files are records of it (only
  pretraining documents are; the others need named fields);
* ``keeps_fields`` -- whether each split keeps its records' fields in a JSONL
  beside the shards (RL prompts: what the reward functions need).

Adding a task type is an encoder, a dataset class and one entry in
:data:`TASKS`. The dataset builders import their classes when called, so
that preprocessing (which never builds samples) does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironcore.config.base import InvalidValue, did_you_mean
from ironcore.data.encode import (
    PAIR_STREAMS,
    ChatEncoder,
    DPOEncoder,
    Encoder,
    PretrainEncoder,
    RLEncoder,
    SFTEncoder,
)
from ironcore.data.metadata import shard_prefix
from ironcore.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from ironcore.data.config import DataConfig
    from ironcore.data.tokenizer import Tokenizer

# (output folder, metadata, split, sequence length, seed, packing) -> the split's samples
DatasetBuilder = Callable[[Path, dict[str, Any], str, int, int, bool], "torch.utils.data.Dataset"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific about a data set (see the module doc)."""

    name: str
    layouts: tuple[tuple[str, ...], ...]
    streams: tuple[str, ...]
    encoder: Callable[[Tokenizer, DataConfig], Encoder]
    dataset: DatasetBuilder
    objective: str
    text_files: bool = False
    keeps_fields: bool = False

    def resolve_fields(self, fields: dict[str, str]) -> dict[str, str]:
        """``fields`` completed with the default column names of the layout it uses; InvalidValue otherwise."""
        for layout in self.layouts:
            if set(fields) <= set(layout):
                return {**{name: name for name in layout}, **fields}
        closest = max(self.layouts, key=lambda layout: len(set(fields) & set(layout)))
        unknown = next(key for key in fields if key not in closest)
        raise InvalidValue(f"fields.{unknown}", f"a {self.name} data set reads {self.describe_layouts()}")

    def describe_layouts(self) -> str:
        return " or ".join("{" + ", ".join(layout) + "}" for layout in self.layouts)


def _pretrain_samples(
    output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool
) -> torch.utils.data.Dataset:
    from ironcore.data.pretrain import PretrainDataset

    # Windows over the concatenated documents are always full: packing has nothing to add.
    return PretrainDataset(shard_prefix(output_dir, split, "tokens"), seq_len, seed=seed, shuffle=split == "train")


def _sft_samples(
    output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool
) -> torch.utils.data.Dataset:
    from ironcore.data.sft import SFTDataset

    prefix = shard_prefix(output_dir, split, "tokens")
    return SFTDataset(prefix, seq_len, pad_id=metadata["tokenizer"]["eod_id"], packing=packing, seed=seed)


def _dpo_samples(
    output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool
) -> torch.utils.data.Dataset:
    from ironcore.data.dpo import DPODataset

    if packing:
        raise ConfigError("data.packing: DPO pairs are not packed (each pair is compared as a whole)")
    return DPODataset(output_dir, split, seq_len, pad_id=metadata["tokenizer"]["eod_id"])


def _rl_prompts(
    output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool
) -> torch.utils.data.Dataset:
    from ironcore.data.rl import PromptDataset

    if packing:
        raise ConfigError("data.packing: RL prompts are not packed (each one is completed on its own)")
    return PromptDataset(output_dir, split)


def _sft_encoder(tokenizer: Tokenizer, config: DataConfig) -> Encoder:
    return ChatEncoder(tokenizer, config) if config.is_chat else SFTEncoder(tokenizer, config)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="pretrain", layouts=(("text",),), streams=("tokens",), encoder=PretrainEncoder,
            dataset=_pretrain_samples, objective="lm", text_files=True,
        ),
        TaskSpec(
            name="sft", layouts=(("prompt", "response"), ("messages",)), streams=("tokens", "loss_mask"),
            encoder=_sft_encoder, dataset=_sft_samples, objective="lm",
        ),
        TaskSpec(
            name="dpo", layouts=(("prompt", "chosen", "rejected"),), streams=PAIR_STREAMS, encoder=DPOEncoder,
            dataset=_dpo_samples, objective="dpo",
        ),
        TaskSpec(
            name="rl", layouts=(("prompt",), ("messages",)), streams=("prompt",), encoder=RLEncoder,
            dataset=_rl_prompts, objective="grpo", keeps_fields=True,
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


def build_dataset(
    output_dir: str | Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool = False
) -> torch.utils.data.Dataset:
    """The training samples of one split of a preprocessed data set, built the way its task type says."""
    return dataset_task(metadata, output_dir).dataset(Path(output_dir), metadata, split, seq_len, seed, packing)

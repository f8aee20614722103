"""A split's training samples, built the way its task type says.

The runtime half of a task type (:mod:`ironcore.data.preprocessing.tasks` is the
preprocessing half): one builder per ``task_type``, from a preprocessed data
set's folder, its ``metadata.json`` and the run's sequence length, seed and
packing to a ``torch`` dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ironcore.data.preprocessing.metadata import shard_prefix
from ironcore.data.preprocessing.tasks import dataset_task
from ironcore.data.samples.dpo import DPODataset
from ironcore.data.samples.pretrain import PretrainDataset
from ironcore.data.samples.rl import PromptDataset
from ironcore.data.samples.sft import SFTDataset
from ironcore.errors import ConfigError

# (output folder, metadata, split, sequence length, seed, packing) -> the split's samples
Builder = Callable[[Path, dict[str, Any], str, int, int, bool], torch.utils.data.Dataset]


def _pretrain(output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int,
              packing: bool) -> torch.utils.data.Dataset:
    # Windows over the concatenated documents are always full: packing has nothing to add.
    return PretrainDataset(shard_prefix(output_dir, split, "tokens"), seq_len, seed=seed, shuffle=split == "train")


def _sft(output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int,
         packing: bool) -> torch.utils.data.Dataset:
    prefix = shard_prefix(output_dir, split, "tokens")
    return SFTDataset(prefix, seq_len, pad_id=metadata["tokenizer"]["eod_id"], packing=packing, seed=seed)


def _dpo(output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int,
         packing: bool) -> torch.utils.data.Dataset:
    if packing:
        raise ConfigError("data.packing: DPO pairs are not packed (each pair is compared as a whole)")
    return DPODataset(output_dir, split, seq_len, pad_id=metadata["tokenizer"]["eod_id"])


def _rl(output_dir: Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int,
        packing: bool) -> torch.utils.data.Dataset:
    if packing:
        raise ConfigError("data.packing: RL prompts are not packed (each one is completed on its own)")
    return PromptDataset(output_dir, split)


BUILDERS: dict[str, Builder] = {"pretrain": _pretrain, "sft": _sft, "dpo": _dpo, "rl": _rl}


def build_dataset(
    output_dir: str | Path, metadata: dict[str, Any], split: str, seq_len: int, seed: int, packing: bool = False
) -> torch.utils.data.Dataset:
    """The training samples of one split of a preprocessed data set, built the way its task type says."""
    task = dataset_task(metadata, output_dir)
    return BUILDERS[task.name](Path(output_dir), metadata, split, seq_len, seed, packing)

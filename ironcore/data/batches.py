"""The trainer's view of a preprocessed data set: the micro-batches of each optimizer step.

Global batch ``s`` is fixed by the seed alone (see
:class:`~ironcore.data.sampler.ResumableDistributedSampler`); this rank takes
its slice and cuts it into micro-batches, so the step's data depends only on
``consumed_samples`` — which is what the trainer checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ironcore.data.dpo import DPODataset
from ironcore.data.metadata import shard_prefix
from ironcore.data.pretrain import PretrainDataset
from ironcore.data.sampler import ResumableDistributedSampler
from ironcore.data.sft import SFTDataset
from ironcore.errors import ConfigError

MicroBatch = dict[str, torch.Tensor]


def build_dataset(
    output_dir: str | Path, metadata: dict, split: str, seq_len: int, seed: int, packing: bool = False
) -> torch.utils.data.Dataset:
    """The training samples of one split of a preprocessed data set, by its task type."""
    task = metadata["task_type"]
    prefix = shard_prefix(output_dir, split, "tokens")
    if task == "pretrain":
        return PretrainDataset(prefix, seq_len, seed=seed, shuffle=split == "train")
    if task == "sft":
        return SFTDataset(prefix, seq_len, pad_id=metadata["tokenizer"]["eod_id"], packing=packing, seed=seed)
    if task == "dpo":
        if packing:
            raise ConfigError("data.packing: DPO pairs are not packed (each pair is compared as a whole)")
        return DPODataset(output_dir, split, seq_len, pad_id=metadata["tokenizer"]["eod_id"])
    raise ConfigError(f"{output_dir}: task_type '{task}' cannot be trained by this trainer yet")


class StepBatches:
    """Micro-batches (on ``device``) of each optimizer step for one data-parallel rank."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        device: torch.device,
    ) -> None:
        self.dataset, self.device = dataset, device
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampler = ResumableDistributedSampler(
            len(dataset), global_batch_size, micro_batch_size, dp_rank, dp_size, seed, shuffle
        )

    def step(self, consumed_samples: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global batch that starts at ``consumed_samples``."""
        batch = self.sampler.global_batch(consumed_samples // self.global_batch_size)
        mine = batch[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank].tolist()
        return [
            self._collate(mine[start : start + self.micro_batch_size])
            for start in range(0, self.per_rank, self.micro_batch_size)
        ]

    def eval_steps(self, limit: int | None = None) -> Iterator[list[MicroBatch]]:
        """The first ``limit`` global batches (all when None) in data set order, never wrapping around.

        The last batch may be short; each rank takes its share of every batch.
        """
        steps = math.ceil(len(self.dataset) / self.global_batch_size)
        for step in range(steps if limit is None else min(limit, steps)):
            start = step * self.global_batch_size
            batch = list(range(start, min(start + self.global_batch_size, len(self.dataset))))
            share = math.ceil(len(batch) / self.dp_size)
            mine = batch[self.dp_rank * share : (self.dp_rank + 1) * share]
            yield [
                self._collate(mine[i : i + self.micro_batch_size]) for i in range(0, len(mine), self.micro_batch_size)
            ]

    def _collate(self, indices: list[int]) -> MicroBatch:
        samples = [self.dataset[i] for i in indices]
        return {key: torch.stack([s[key] for s in samples]).to(self.device) for key in samples[0]}

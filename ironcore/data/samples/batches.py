"""The trainer's view of a preprocessed data set: the micro-batches of each optimizer step.

The sample stream is epoch after epoch of a permutation of the data set
(seeded by ``(seed, epoch)``; identity when ``shuffle=False``). Global batch
``b`` is stream positions ``[b * G, (b + 1) * G)``; data-parallel rank ``r``
takes its contiguous slice of ``G / dp_size`` and cuts it into micro-batches.
So the global batch is the same whatever the parallel layout (which is what
makes "DP=2 equals one process" testable), and the data of a step depends
only on ``consumed_samples``, the one number the trainer checkpoints: a
resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ironcore.errors import ConfigError

MicroBatch = dict[str, torch.Tensor]


class StepBatches:
    """Micro-batches (on ``device``) of each optimizer step for one data-parallel rank (by default the only one,
    in data set order)."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        device: torch.device,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
    ) -> None:
        if len(dataset) < 1:
            raise ConfigError("the data set has no samples")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global batch size {global_batch_size} is not a multiple of micro batch size "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        self.dataset, self.device = dataset, device
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self._epoch, self._permutation = -1, np.arange(0)

    def global_batch(self, step: int) -> np.ndarray:
        """All data set indices of global batch ``step`` (counted from the start of training)."""
        size = len(self.dataset)
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for i, position in enumerate(range(step * self.global_batch_size, (step + 1) * self.global_batch_size)):
            epoch, offset = divmod(position, size)
            if epoch != self._epoch:
                self._epoch = epoch
                self._permutation = (
                    np.random.default_rng([self.seed, epoch]).permutation(size) if self.shuffle else np.arange(size)
                )
            out[i] = self._permutation[offset]
        return out

    def step(self, consumed_samples: int) -> list[MicroBatch]:
        """This rank's micro-batches of the global batch that starts at ``consumed_samples``."""
        batch = self.global_batch(consumed_samples // self.global_batch_size)
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


class IndexDataset(torch.utils.data.Dataset):
    """Sample ``i`` is ``{"index": i}``: the batches of an objective whose samples do not stack (RL prompts of
    any length) carry only which samples they hold; the objective looks the samples up itself."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index)}

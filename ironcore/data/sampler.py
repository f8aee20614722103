"""A distributed, resumable batch sampler whose whole state is ``consumed_samples``.

The sample stream is epoch after epoch of a permutation of the data set
(seeded by ``(seed, epoch)``; identity when ``shuffle=False``). Global batch
``b`` is stream positions ``[b * G, (b + 1) * G)``; data-parallel rank ``r``
takes its contiguous slice of ``G / dp_size`` and yields it as micro-batches.
So the global batch is the same whatever the parallel layout, and a run
restarted with ``consumed_samples = steps_done * G`` continues with exactly
the next batch. The trainer owns the counter (it knows which steps finished;
a prefetching DataLoader runs ahead of it) and passes it back in on resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ironcore.errors import ConfigError


class ResumableDistributedSampler:
    """Yields this rank's micro-batches (lists of indices) forever; use as a DataLoader ``batch_sampler``."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        consumed_samples: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ConfigError("the data set has no samples")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global batch size {global_batch_size} is not a multiple of micro batch size "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        if consumed_samples % global_batch_size:
            raise ConfigError(f"consumed_samples {consumed_samples} is not a multiple of {global_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = consumed_samples
        self._epoch = -1
        self._permutation = np.arange(0)

    def _positions(self, start: int, stop: int) -> np.ndarray:
        """Data set indices of stream positions ``[start, stop)``."""
        out = np.empty(stop - start, dtype=np.int64)
        for i, position in enumerate(range(start, stop)):
            epoch, offset = divmod(position, self.num_samples)
            if epoch != self._epoch:
                self._epoch = epoch
                self._permutation = (
                    np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                    if self.shuffle
                    else np.arange(self.num_samples)
                )
            out[i] = self._permutation[offset]
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """All ``global_batch_size`` indices of global batch ``step`` (counted from the start)."""
        start = step * self.global_batch_size
        return self._positions(start, start + self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.dp_size
        step = self.consumed_samples // self.global_batch_size
        while True:
            batch = self.global_batch(step)
            mine = batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
            for start in range(0, per_rank, self.micro_batch_size):
                yield mine[start : start + self.micro_batch_size].tolist()
            step += 1

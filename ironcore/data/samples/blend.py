"""A mixture of data sets (Megatron's blended data set): sample ``i`` of the blend is a sample of one source.

Sample ``i`` goes to the source whose realised share of samples ``0..i-1`` is
furthest below its target weight (ties: the first such source): an exact,
deterministic interleaving, every source within one sample of its share at
every point. Within a source, its ``j``-th draw is epoch ``j // len`` of it,
in a permutation seeded by ``(seed, source, epoch)``. So where sample ``i``
comes from is a pure function of (weights, seed, ``i``): a resumed run, and
every data-parallel layout, sees the same samples, and the blend's length
(the run's samples) changes nothing but where it ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ironcore.data.preprocessing.tasks import dataset_task
from ironcore.errors import ConfigError

_CHUNK = 1 << 16  # the interleaving is extended this many samples at a time, as far as it is read


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``sources`` in proportion to ``weights`` (normalised here)."""

    def __init__(self, sources: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int,
                 seed: int) -> None:
        total = float(sum(weights))
        self.sources, self.weights = list(sources), [w / total for w in weights]
        self.size, self.seed = size, seed
        # The interleaving so far: per sample its source and its draw number within that source.
        self.source = np.empty(0, dtype=np.int64)
        self.draw = np.empty(0, dtype=np.int64)
        self._counts = [0] * len(sources)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def __len__(self) -> int:
        return self.size

    def _extend(self, end: int) -> None:
        """Decide the sources of samples up to ``end`` (the greedy choice needs every earlier one)."""
        start = len(self.source)
        end = max(end, start + _CHUNK)
        source, draw = np.empty(end - start, dtype=np.int64), np.empty(end - start, dtype=np.int64)
        counts, weights = self._counts, self.weights
        for i in range(start, end):
            deficits = [w * (i + 1) - c for w, c in zip(weights, counts)]
            s = deficits.index(max(deficits))
            source[i - start], draw[i - start] = s, counts[s]
            counts[s] += 1
        self.source = np.concatenate([self.source, source])
        self.draw = np.concatenate([self.draw, draw])

    def sources_of(self, end: int) -> np.ndarray:
        """The source of each of samples ``0..end-1``: what a report counts, the mapping training reads (kept, so
        training does not decide it again)."""
        if not 0 <= end <= self.size:
            raise IndexError(f"{end} samples out of range [0, {self.size}]")
        if end > len(self.source):
            self._extend(end)
        return self.source[:end]

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, sample index within that source)`` of blend sample ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range [0, {self.size})")
        if index >= len(self.source):
            self._extend(index + 1)
        s, draw = int(self.source[index]), int(self.draw[index])
        epoch, offset = divmod(draw, len(self.sources[s]))
        cached = self._orders.get(s)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, s, epoch]).permutation(len(self.sources[s])))
            self._orders[s] = cached
        return s, int(cached[1][offset])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, within = self.locate(index)
        return self.sources[s][within]


BLENDABLE = ("pretrain", "sft")  # task types whose samples are interchangeable rows of one language-model batch


def check_blendable(sources: Sequence[tuple[str, Path, dict[str, Any], int]]) -> None:
    """One line when the ``(name, folder, metadata, max_seq_length)`` of a blend's data sets cannot mix: their
    token ids must mean the same text, their samples be of one kind and length, their names (the metric
    names of their validation) distinct."""
    name, folder, metadata, seq_len = sources[0]
    task = dataset_task(metadata, folder).name
    if task not in BLENDABLE:
        raise ConfigError(f"data.blend: {folder} holds {task} data; a blend mixes {' or '.join(BLENDABLE)} data")
    seen = set()
    for other_name, other_folder, other, other_len in sources:
        if other["tokenizer"]["identity"] != metadata["tokenizer"]["identity"]:
            raise ConfigError(f"data.blend: {folder} and {other_folder} were tokenized by different tokenizers "
                              f"({metadata['tokenizer']['identity']} vs {other['tokenizer']['identity']})")
        if dataset_task(other, other_folder).name != task:
            raise ConfigError(f"data.blend: {folder} holds {task} data but {other_folder} "
                              f"{dataset_task(other, other_folder).name} data")
        if other_len != seq_len:
            raise ConfigError(f"data.blend: {folder} has max_seq_length {seq_len} but {other_folder} {other_len}")
        if other_name in seen:
            raise ConfigError(f"data.blend: two data sets are named '{other_name}' (their metrics would collide)")
        seen.add(other_name)


def mix_metrics(per_source: dict[str, dict[str, float]], weights: dict[str, float]) -> dict[str, float]:
    """A blend's validation metrics: each source's ``val_x`` as ``val_<name>/x`` (MLflow ``val/<name>/x``), and as
    ``val_x`` their mean weighted by the blend's weights (over the sources that have a validation split);
    ``val_ppl`` is that of the mixed loss."""
    total = sum(weights[name] for name in per_source)
    keys = next(iter(per_source.values()))
    mixed = {key: sum(weights[name] * m[key] for name, m in per_source.items()) / total for key in keys}
    if "val_loss" in mixed and "val_ppl" in mixed:
        mixed["val_ppl"] = math.exp(min(mixed["val_loss"], 50.0))
    for name, metrics in per_source.items():
        mixed |= {f"val_{name}/{key.removeprefix('val_')}": value for key, value in metrics.items()}
    return mixed

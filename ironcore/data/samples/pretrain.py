"""Pretraining samples: windows of ``seq_len + 1`` tokens over the concatenated documents.

Documents are never truncated: they are concatenated (each already ends with
EOD when the data was preprocessed with ``append_eod``) in an order shuffled
by ``seed``, and sample ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len]`` of
that stream — consecutive samples share one boundary token, as in Megatron,
so every token is a label exactly once. ``input_ids = window[:-1]``,
``labels = window[1:]``.

The document order and its cumulative token offsets are the index; it is
cached beside the shards (``PREFIX.doc_order.s{seed}.npy`` /
``PREFIX.doc_offsets.s{seed}.npy``) and memory-mapped, so ranks and restarts
share it. A rebuilt data set replaces its folder, caches included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.errors import DataError


class PretrainDataset(torch.utils.data.Dataset):
    """``{"input_ids", "labels", "loss_mask"}`` samples of ``seq_len`` positions from one shard."""

    def __init__(self, prefix: str | Path, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        self.data = IndexedDataset(prefix)
        self.seq_len = seq_len
        self.order, self.offsets = self._index(Path(prefix), seed, shuffle)
        total = int(self.offsets[-1])
        self.num_samples = (total - 1) // seq_len if total > 0 else 0
        if self.num_samples < 1:
            raise DataError(f"{prefix}: {total} tokens is too few for one sample of {seq_len + 1} tokens")

    def _index(self, prefix: Path, seed: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(document order, cumulative token offsets in that order)``, cached as .npy files."""
        tag = f"s{seed}" if shuffle else "ordered"
        order_path = Path(f"{prefix}.doc_order.{tag}.npy")
        offsets_path = Path(f"{prefix}.doc_offsets.{tag}.npy")
        lengths = self.data.sequence_lengths
        try:  # a cache that is missing, damaged or of other data is rebuilt
            order = np.load(order_path, mmap_mode="r")
            offsets = np.load(offsets_path, mmap_mode="r")
            if len(order) == len(lengths) and len(offsets) == len(lengths) + 1 and offsets[-1] == self.data.num_tokens:
                return order, offsets
        except (OSError, ValueError, EOFError):
            pass
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(lengths))
        else:
            order = np.arange(len(lengths))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=offsets[1:])
        for path, array in ((order_path, order), (offsets_path, offsets)):
            _save_atomically(path, array)
        return order, offsets

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int) -> np.ndarray:
        """Tokens ``[index * seq_len, index * seq_len + seq_len + 1)`` of the shuffled stream."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        start = index * self.seq_len
        needed = self.seq_len + 1
        position = int(np.searchsorted(self.offsets, start, side="right")) - 1
        offset = start - int(self.offsets[position])
        pieces = []
        while needed:
            doc = int(self.order[position])
            piece = self.data.get(doc, offset, min(needed, int(self.data.sequence_lengths[doc]) - offset))
            pieces.append(piece)
            needed -= len(piece)
            position += 1
            offset = 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.window(index))
        return {
            "input_ids": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_len, dtype=torch.float32),
        }


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Write an .npy so that concurrent ranks never read a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)

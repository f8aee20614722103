"""DPO pairs: the chosen and the rejected continuation of one prompt, padded to ``seq_len``.

Each sample holds, for ``side`` in ``chosen`` / ``rejected``: ``{side}_input_ids``,
``{side}_labels``, ``{side}_loss_mask`` (1.0 on response tokens) and
``{side}_position_ids``. The default collate stacks them into pair batches
(``[B, T]`` per key); the trainer runs chosen and rejected through the policy
and the reference model and compares the masked log-probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.samples.sft import _shifted
from ironcore.errors import DataError

SIDES = ("chosen", "rejected")


def both_sides(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``{side}_{key}`` of the chosen then the rejected sequences, stacked ``[2B, ...]``: one forward pass
    runs both sides of a pair batch (TRL's concatenated forward)."""
    return torch.cat([batch[f"{side}_{key}"] for side in SIDES])


class DPODataset(torch.utils.data.Dataset):
    """Pairs from ``{split}_chosen[_loss_mask]`` and ``{split}_rejected[_loss_mask]`` shards."""

    def __init__(self, output_dir: str | Path, split: str, seq_len: int, pad_id: int) -> None:
        self.streams = {
            name: IndexedDataset(Path(output_dir) / f"{split}_{name}")
            for side in SIDES
            for name in (side, f"{side}_loss_mask")
        }
        counts = {len(data) for data in self.streams.values()}
        if len(counts) != 1:
            raise DataError(f"{output_dir}: the {split} DPO shards hold different numbers of pairs")
        for side in SIDES:
            tokens, masks = self.streams[side], self.streams[f"{side}_loss_mask"]
            if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
                raise DataError(f"{output_dir}: {split}_{side} tokens and loss mask disagree on lengths")
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.streams["chosen"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {}
        for side in SIDES:
            length = min(int(self.streams[side].sequence_lengths[index]), self.seq_len + 1)
            tokens = self.streams[side].get(index, 0, length)
            mask = self.streams[f"{side}_loss_mask"].get(index, 0, length)
            shifted = _shifted(
                tokens, mask, np.zeros(length, np.int64), np.arange(length), self.seq_len, self.pad_id
            )
            del shifted["example_ids"]
            sample.update({f"{side}_{key}": value for key, value in shifted.items()})
        return sample

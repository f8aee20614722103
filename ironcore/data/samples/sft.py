"""SFT samples from token + loss-mask shards: one padded example per sample, or packed.

Every sample has ``seq_len`` positions: ``input_ids``, ``labels`` (the next
token), ``loss_mask`` (1.0 where the label is a trained token) and
``position_ids``. Padding uses the EOD id and is never trained.

Packing (``packing=True``) fills each sample with several whole examples
(next-fit over a seed-shuffled order; an example never straddles two
samples). Inside a packed sample positions restart at 0 for every example,
and ``attention_mask`` (bool ``[1, T, T]``, True = may attend) is causal *and*
same-example, so no example sees another; the label of an example's last
token (which would be the next example's first token) is not trained. Padding
mode returns no ``attention_mask``: plain causal attention is exact there
because the pads come last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.errors import DataError


def packed_attention_mask(example_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask ``[..., 1, T, T]``: query ``q`` may attend key ``k`` iff ``k <= q`` and same example."""
    length = example_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=example_ids.device).tril()
    same = example_ids.unsqueeze(-1) == example_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(-3)


def next_fit_bins(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Start offsets of bins when items of ``lengths`` are packed in order, each bin <= capacity.

    Returns ``starts`` with ``len(bins) + 1`` entries: bin ``b`` holds items ``starts[b]:starts[b+1]``.
    """
    starts = [0]
    used = 0
    for i, length in enumerate(lengths.tolist()):
        if used + length > capacity and i > starts[-1]:
            starts.append(i)
            used = 0
        used += length
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


class SFTDataset(torch.utils.data.Dataset):
    """Padded or packed SFT samples of ``seq_len`` positions from ``PREFIX`` and ``PREFIX_loss_mask``."""

    def __init__(
        self,
        prefix: str | Path,
        seq_len: int,
        pad_id: int,
        packing: bool = False,
        seed: int = 0,
    ) -> None:
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(f"{prefix}_loss_mask")
        if not np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths):
            raise DataError(f"{prefix}: token and loss-mask shards disagree on example lengths")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.packing = packing
        if packing:
            # Capacity seq_len + 1 tokens: a full window gives seq_len inputs and their labels.
            self.order = np.random.default_rng(seed).permutation(len(self.tokens))
            lengths = np.minimum(self.tokens.sequence_lengths[self.order], seq_len + 1)
            self.bins = next_fit_bins(lengths, seq_len + 1)

    def __len__(self) -> int:
        return len(self.bins) - 1 if self.packing else len(self.tokens)

    def _example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        length = min(int(self.tokens.sequence_lengths[index]), self.seq_len + 1)
        return self.tokens.get(index, 0, length), self.masks.get(index, 0, length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.packing:
            tokens, mask = self._example(index)
            example_ids = np.zeros(len(tokens), dtype=np.int64)
            positions = np.arange(len(tokens), dtype=np.int64)
        else:
            parts = [self._example(int(i)) for i in self.order[self.bins[index] : self.bins[index + 1]]]
            tokens = np.concatenate([t for t, _ in parts])
            mask = np.concatenate([m for _, m in parts])
            example_ids = np.repeat(np.arange(len(parts)), [len(t) for t, _ in parts])
            positions = np.concatenate([np.arange(len(t)) for t, _ in parts])
        sample = _shifted(tokens, mask, example_ids, positions, self.seq_len, self.pad_id)
        if self.packing:
            sample["attention_mask"] = packed_attention_mask(sample.pop("example_ids"))
        else:
            del sample["example_ids"]
        return sample


def _shifted(
    tokens: np.ndarray,
    mask: np.ndarray,
    example_ids: np.ndarray,
    positions: np.ndarray,
    seq_len: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Inputs/labels of a token window padded to ``seq_len``; pads get their own example id (-1)."""
    n = len(tokens) - 1
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    ids = np.full(seq_len, -1, dtype=np.int64)
    position_ids = np.arange(seq_len, dtype=np.int64)
    input_ids[:n] = tokens[:-1]
    labels[:n] = tokens[1:]
    # A label is trained when its token is, and only within the same example.
    loss_mask[:n] = mask[1:] * (example_ids[1:] == example_ids[:-1])
    ids[:n] = example_ids[:-1]
    position_ids[:n] = positions[:-1]
    if n < seq_len:  # padding continues the positions of the last example, harmlessly
        position_ids[n:] = np.arange(seq_len - n) + (positions[n - 1] + 1 if n > 0 else 0)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "example_ids": torch.from_numpy(ids),
    }

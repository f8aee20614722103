"""Pretraining samples over concatenated documents, blending, and the resumable distributed sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ironcore.data.indexed import IndexedDatasetWriter
from ironcore.data.pretrain import BlendedDataset, PretrainDataset
from ironcore.data.sampler import ResumableDistributedSampler
from ironcore.errors import ConfigError, DataError


def _shard(path, documents: list[list[int]]):
    with IndexedDatasetWriter(path, np.uint16) as writer:
        for doc in documents:
            writer.add(np.array(doc))
    return path


def test_windows_cover_the_shuffled_concatenation_without_truncating_documents(tmp_path) -> None:
    rng = np.random.default_rng(1)
    documents = [list(rng.integers(1, 1000, size=n)) for n in rng.integers(1, 40, size=60)]
    prefix = _shard(tmp_path / "train", documents)
    dataset = PretrainDataset(prefix, seq_len=16, seed=5)
    order = np.random.default_rng(5).permutation(len(documents))
    stream = np.concatenate([documents[i] for i in order])
    assert len(dataset) == (len(stream) - 1) // 16
    for i in range(len(dataset)):
        sample = dataset[i]
        window = stream[i * 16 : i * 16 + 17]
        assert sample["input_ids"].tolist() == window[:-1].tolist()
        assert sample["labels"].tolist() == window[1:].tolist()
        assert sample["loss_mask"].sum() == 16
    # The index is cached beside the shard and reused (same order, different seed -> different order).
    assert (tmp_path / "train.doc_order.s5.npy").exists() and (tmp_path / "train.doc_offsets.s5.npy").exists()
    again = PretrainDataset(prefix, seq_len=16, seed=5)
    assert isinstance(again.order, np.memmap) and np.array_equal(again.order, order)
    assert not np.array_equal(PretrainDataset(prefix, seq_len=16, seed=6).order, order)
    ordered = PretrainDataset(prefix, seq_len=16, shuffle=False)
    assert ordered[0]["input_ids"].tolist() == np.concatenate(documents)[:16].tolist()


def test_too_little_data_is_an_error(tmp_path) -> None:
    with pytest.raises(DataError, match="too few"):
        PretrainDataset(_shard(tmp_path / "t", [[1, 2, 3]]), seq_len=8)


def test_blend_follows_the_weights_exactly(tmp_path) -> None:
    a = PretrainDataset(_shard(tmp_path / "a", [[1] * 100]), seq_len=4)
    b = PretrainDataset(_shard(tmp_path / "b", [[2] * 30]), seq_len=4)
    blend = BlendedDataset([a, b], [0.75, 0.25], num_samples=40)
    owners = [int(blend[i]["input_ids"][0]) for i in range(40)]
    assert owners.count(1) == 30 and owners.count(2) == 10
    assert all(owners[i : i + 4].count(2) == 1 for i in range(0, 40, 4))  # evenly interleaved
    assert blend.sample_index[blend.dataset_index == 1].tolist() == [i % len(b) for i in range(10)]
    with pytest.raises(ValueError):
        BlendedDataset([a, b], [1.0])


def test_sampler_slices_the_same_global_batch_for_any_dp_size() -> None:
    single = iter(ResumableDistributedSampler(50, global_batch_size=8, micro_batch_size=2, seed=3))
    ranks = [iter(ResumableDistributedSampler(50, 8, 2, dp_rank=r, dp_size=2, seed=3)) for r in range(2)]
    for _ in range(20):  # crosses several epochs of 50 samples
        whole = [i for _ in range(4) for i in next(single)]
        split = [i for it in ranks for _ in range(2) for i in next(it)]
        assert whole == split
    sampler = ResumableDistributedSampler(50, 8, 2, seed=3)
    epoch0 = np.concatenate([sampler.global_batch(s) for s in range(7)])[:50]
    assert sorted(epoch0.tolist()) == list(range(50))  # one epoch is a permutation


def test_resumed_sampler_continues_with_the_next_batch() -> None:
    full = iter(ResumableDistributedSampler(30, 6, 3, seed=9))
    batches = [next(full) for _ in range(20)]
    resumed = iter(ResumableDistributedSampler(30, 6, 3, seed=9, consumed_samples=6 * 7))
    assert [next(resumed) for _ in range(6)] == batches[14:20]
    with pytest.raises(ConfigError):
        ResumableDistributedSampler(30, 6, 3, consumed_samples=5)
    with pytest.raises(ConfigError):
        ResumableDistributedSampler(30, 6, 4)


def test_sampler_drives_a_dataloader(tmp_path) -> None:
    dataset = PretrainDataset(_shard(tmp_path / "t", [list(range(1, 200))]), seq_len=8)
    sampler = ResumableDistributedSampler(len(dataset), 4, 2, dp_rank=1, dp_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 8)
    expected = sampler.global_batch(0)[2:4]
    assert batch["input_ids"][:, 0].tolist() == [dataset[int(i)]["input_ids"][0].item() for i in expected]

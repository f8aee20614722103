"""Pretraining samples over concatenated documents, and the resumable per-step batches of every DP rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ironcore.data.preprocessing.indexed import IndexedDatasetWriter
from ironcore.data.samples.batches import IndexDataset, StepBatches
from ironcore.data.samples.pretrain import PretrainDataset
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


def _batches(size: int, global_batch: int, micro: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 3):
    return StepBatches(IndexDataset(size), global_batch_size=global_batch, micro_batch_size=micro, dp_rank=dp_rank,
                       dp_size=dp_size, seed=seed, shuffle=True, device=torch.device("cpu"))


def _indices(micro_batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [i for mb in micro_batches for i in mb["index"].tolist()]


def test_every_dp_layout_slices_the_same_global_batch() -> None:
    single = _batches(50, 8, 2)
    ranks = [_batches(50, 8, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(20):  # crosses several epochs of 50 samples
        consumed = step * 8
        assert len(single.step(consumed)) == 4 and all(len(r.step(consumed)) == 2 for r in ranks)
        assert _indices(single.step(consumed)) == [i for r in ranks for i in _indices(r.step(consumed))]
    epoch0 = np.concatenate([single.global_batch(s) for s in range(7)])[:50]
    assert sorted(epoch0.tolist()) == list(range(50))  # one epoch is a permutation
    assert not np.array_equal(epoch0, np.arange(50))


def test_a_step_depends_on_consumed_samples_only() -> None:
    """A resumed run (a fresh object, any earlier history) gets exactly the batch the straight run got."""
    straight = _batches(30, 6, 3, seed=9)
    history = [_indices(straight.step(6 * s)) for s in range(20)]
    resumed = _batches(30, 6, 3, seed=9)
    assert [_indices(resumed.step(6 * s)) for s in range(14, 20)] == history[14:20]
    assert _indices(_batches(30, 6, 3, seed=10).step(0)) != history[0]
    with pytest.raises(ConfigError, match="not a multiple"):
        _batches(30, 6, 4)


def test_every_task_type_has_a_sample_builder_and_no_builder_lacks_a_task_type() -> None:
    """The preprocessing half (TASKS) and the runtime half (BUILDERS) of a task type name the same types."""
    from ironcore.data.preprocessing.tasks import TASKS
    from ironcore.data.samples.build import BUILDERS

    assert set(BUILDERS) == set(TASKS)

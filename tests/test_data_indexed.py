"""Megatron interop of the .bin/.idx shards, both directions, on real text."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ironcore.data.preprocessing.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

with warnings.catch_warnings():  # megatron-core warns about missing optional CUDA extensions
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def _paragraphs(text: str) -> list[str]:
    """The documents of `document_split: paragraph`, computed independently of ironcore."""
    return [p for p in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if p]


def test_megatron_reads_our_shards_exactly(tmp_path, data_config, gpt2_tokenizer) -> None:
    text = (EXAMPLES / "tinyshakespeare.txt").read_text(encoding="utf-8")
    config = data_config(source={"path": str(EXAMPLES / "tinyshakespeare.txt")}, num_workers=2)
    preprocess(config, progress=False)
    megatron = MegatronIndexedDataset(str(tmp_path / "out" / "train"))
    docs = _paragraphs(text)
    assert len(megatron) == len(docs) == 7222
    assert megatron.index.dtype == np.uint16
    assert megatron.document_indices.tolist() == list(range(len(docs) + 1))
    expected = gpt2_tokenizer.encode_batch(docs)
    for i in (0, 1, 500, 3333, len(docs) - 1):
        assert megatron[i].tolist() == expected[i] + [gpt2_tokenizer.eod_id]
    ours = IndexedDataset(tmp_path / "out" / "train")
    assert ours.num_tokens == sum(len(e) + 1 for e in expected)
    assert np.concatenate([megatron[i] for i in range(len(megatron))]).tolist() == [
        t for e in expected for t in [*e, gpt2_tokenizer.eod_id]
    ]


def test_we_read_shards_megatrons_builder_wrote(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32):
        prefix = tmp_path / f"megatron_{np.dtype(dtype).name}"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        sequences = [rng.integers(0, 60000, size=n) for n in (5, 1, 300, 0, 17)]
        for sequence in sequences[:3]:
            builder.add_item(torch.tensor(sequence))
        builder.end_document()  # a three-sequence document, then two single-sequence ones
        for sequence in sequences[3:]:
            builder.add_item(torch.tensor(sequence))
            builder.end_document()
        builder.finalize(f"{prefix}.idx")
        ours = IndexedDataset(prefix)
        assert ours.dtype == np.dtype(dtype)
        assert len(ours) == len(sequences)
        assert ours.document_indices.tolist() == [0, 3, 4, 5]
        for i, sequence in enumerate(sequences):
            assert ours[i].tolist() == sequence.tolist()
        assert ours.get(2, offset=10, length=5).tolist() == sequences[2][10:15].tolist()


def test_our_writer_matches_megatron_byte_for_byte(tmp_path) -> None:
    sequences = [np.arange(n, dtype=np.int64) * 7 for n in (3, 10, 1, 64)]
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for sequence in sequences:
        builder.add_item(torch.tensor(sequence))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    with IndexedDatasetWriter(tmp_path / "o", np.int32) as writer:
        writer.add_batch(np.concatenate(sequences[:2]), np.array([3, 10]))
        writer.add(sequences[2])
        writer.add(sequences[3])
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"o{suffix}").read_bytes() == (tmp_path / f"m{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_dtype_choice_and_overflow() -> None:
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(151669) == np.int32


def test_values_too_large_for_the_dtype_are_an_error(tmp_path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    with pytest.raises(DataError, match="does not fit the shard dtype uint16"):
        writer.add_batch(np.array([1, 70000], dtype=np.int32), np.array([2]))


def test_empty_shard_and_bad_index(tmp_path) -> None:
    IndexedDatasetWriter(tmp_path / "empty", np.uint16).finalize()
    assert len(IndexedDataset(tmp_path / "empty")) == 0
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, really")
    with pytest.raises(DataError, match="not a Megatron MMIDIDX"):
        IndexedDataset(tmp_path / "junk")
    with pytest.raises(DataError, match="no such index"):
        IndexedDataset(tmp_path / "missing")

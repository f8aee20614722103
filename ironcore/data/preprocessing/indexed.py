"""Megatron-compatible ``.bin``/``.idx`` token shards (MMapIndexedDataset, version 1).

The format is Megatron-LM's, byte for byte, so shards move freely between the
two projects (``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads
ours, we read theirs):

``PREFIX.bin``  the sequences' items back to back, in one numpy dtype.
``PREFIX.idx``  ``MMIDIDX\\x00\\x00`` | version <Q=1 | dtype code <B |
                sequence count <Q | document count <Q |
                sequence lengths int32[S] | byte pointers int64[S] |
                document indices int64[D].

IronCore writes one sequence per document, so the document indices are
``0, 1, …, S``. The writer keeps no per-sequence state in memory: lengths are
spooled to a side file and the index is assembled in chunks at
:meth:`IndexedDatasetWriter.finalize`, so memory stays flat whatever the corpus
size.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ironcore.errors import DataError
from ironcore.files import describe_os_error

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8

# Megatron's DType enum: code -> numpy dtype.
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}

# Megatron's cut-off: uint16 only when the vocabulary is comfortably below 2**16.
UINT16_VOCAB_LIMIT = 65500
_CHUNK = 1 << 20  # items per chunk when streaming the index


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron would pick for ``vocab_size`` tokens."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Append sequences in bulk (numpy arrays), then :meth:`finalize` the index.

    ``add_batch(items, lengths)`` takes the concatenation of several sequences
    and their lengths: one ``write`` per batch, no per-sequence Python work.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._data = open(bin_path(self.prefix), "wb")
        self._lengths_path = Path(f"{self.prefix}.lengths.tmp")
        self._lengths = open(self._lengths_path, "wb")
        self.num_sequences = 0

    def add_batch(self, items: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` sequences whose items are ``items``, concatenated."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(items):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(items)} items were given")
        if (
            self._limits is not None
            and len(items)
            and (items.min() < self._limits.min or items.max() > self._limits.max)
        ):
            raise DataError(
                f"{bin_path(self.prefix)}: value {int(items.max())} does not fit the shard dtype "
                f"{self.dtype} (vocabulary too large for it?)"
            )
        self._data.write(np.ascontiguousarray(items, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_sequences += len(lengths)

    def add(self, sequence: np.ndarray) -> None:
        """Append one sequence (convenience for tests and small tools)."""
        sequence = np.asarray(sequence)
        self.add_batch(sequence, np.array([len(sequence)]))

    def finalize(self) -> None:
        """Close the ``.bin`` and write the ``.idx`` (streamed in chunks)."""
        self._data.close()
        self._lengths.close()
        itemsize = self.dtype.itemsize
        count = self.num_sequences
        with open(idx_path(self.prefix), "wb") as out, open(self._lengths_path, "rb") as lengths_file:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", _CODE_OF[self.dtype]))
            out.write(struct.pack("<Q", count))
            out.write(struct.pack("<Q", count + 1))
            # Lengths verbatim, then byte pointers (exclusive cumulative sum), then 0..count.
            while chunk := lengths_file.read(_CHUNK * 4):
                out.write(chunk)
            lengths_file.seek(0)
            pointer = 0
            while chunk := lengths_file.read(_CHUNK * 4):
                sizes = np.frombuffer(chunk, dtype=np.int32).astype(np.int64) * itemsize
                ends = np.cumsum(sizes) + pointer
                out.write((ends - sizes).tobytes())
                pointer = int(ends[-1])
            for start in range(0, count + 1, _CHUNK):
                out.write(np.arange(start, min(start + _CHUNK, count + 1), dtype=np.int64).tobytes())
        os.remove(self._lengths_path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._data.close()
            self._lengths.close()


class IndexedDataset:
    """Read-only, memory-mapped view of a ``.bin``/``.idx`` pair.

    Sequences come back as numpy views into the mapped file (no copy); reading
    a window of a long document with :meth:`get` touches only those pages.
    Multi-sequence documents (Megatron can write them) are exposed as their
    sequences; :attr:`document_indices` says where documents start.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        path = idx_path(self.prefix)
        try:
            with open(path, "rb") as f:
                header = f.read(_HEADER_SIZE)
        except FileNotFoundError:
            raise DataError(f"{path}: no such index file (was the data preprocessed?)") from None
        except OSError as err:
            raise DataError(describe_os_error(err, path)) from None
        if len(header) < _HEADER_SIZE or header[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise DataError(f"{path}: not a Megatron MMIDIDX index file")
        offset = len(INDEX_HEADER)
        (version,) = struct.unpack_from("<Q", header, offset)
        (code,) = struct.unpack_from("<B", header, offset + 8)
        sequence_count, document_count = struct.unpack_from("<QQ", header, offset + 9)
        if version != INDEX_VERSION:
            raise DataError(f"{path}: index version {version}, only {INDEX_VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER_SIZE + 12 * sequence_count + 8 * document_count
        if path.stat().st_size != expected:
            raise DataError(f"{path}: {path.stat().st_size} bytes, but its header promises {expected}: the index is "
                            "truncated or damaged (rebuild the data)")
        index = np.memmap(path, mode="r", dtype=np.uint8)
        start = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(index, np.int32, sequence_count, start)
        start += 4 * sequence_count
        self.sequence_pointers = np.frombuffer(index, np.int64, sequence_count, start)
        start += 8 * sequence_count
        self.document_indices = np.frombuffer(index, np.int64, document_count, start)
        data_path = bin_path(self.prefix)
        if not data_path.exists():
            raise DataError(f"{data_path}: missing data file for index {path}")
        if not data_path.is_file():
            raise DataError(f"{data_path}: is a folder, expected the data file of index {path}")
        size = data_path.stat().st_size
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if sequence_count else 0
        if size != end:
            raise DataError(f"{data_path}: {size} bytes, but index {path.name} describes {end}: the data file is "
                            "truncated or damaged (rebuild the data)")
        try:  # np.memmap cannot map an empty file; an empty shard is a legal (if useless) shard.
            self._data = np.memmap(data_path, mode="r", dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)
        except OSError as err:
            raise DataError(describe_os_error(err, data_path)) from None

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Items ``offset:offset+length`` of sequence ``idx`` (to the end when length is None)."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        pointer = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, self.dtype, length, pointer)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def iter_chunks(self, items: int = 1 << 24):
        """Yield the whole ``.bin`` as arrays of about ``items`` items (bounded memory)."""
        total = len(self._data) // self.dtype.itemsize
        for start in range(0, total, items):
            yield np.frombuffer(
                self._data, self.dtype, min(items, total - start), start * self.dtype.itemsize
            )

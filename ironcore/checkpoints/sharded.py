"""Sharded checkpoints: every rank writes the pieces it holds, nothing is gathered (torch.distributed.checkpoint).

A checkpoint's ``shards/`` folder is a DCP checkpoint (``.metadata`` and one ``__<rank>_*.distcp`` file per
writing rank). Each tensor is stored by *full* (TP=1, unpadded) name and shape, as pieces placed at their
offsets in it, so any layout reads it back: each rank asks for the pieces its own layout needs and DCP
finds them in whichever files hold them (resharding over TP, DP, FSDP, or to one process).

How a rank's tensors become pieces of full tensors: TP splits a tensor by its ``TPSplit`` (fused parts,
replicated key/value heads, vocab padding), FSDP shards the TP-local tensor along dim 0; both are read off the
tensor by :func:`~ironcore.parallel.sharding.full_pieces`, which may give several rectangles per tensor (one
per fused part). DTensor describes one rectangle per rank, so :class:`Pieces` speaks DCP's checkpointable
protocol itself (``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``, the
methods DTensor implements), and the planners below find its pieces. Pieces that several ranks hold (DP
replicas, TP-replicated tensors) are written once: DCP keeps one copy of equal pieces.

Reading never runs code from the checkpoint: DCP pickles its metadata, which is read here with an unpickler
that builds DCP's metadata classes and nothing else, and non-tensor entries with ``weights_only``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, TensorWriteData, WriteItem, WriteItemType

from ironcore.checkpoints.pointers import SHARDS
from ironcore.errors import CheckpointError, first_line
from ironcore.parallel.sharding import FullPiece, full_pieces, full_shapes, named_splits


class Pieces:
    """This rank's pieces of one full tensor of shape ``size``, for DCP to write from or read into in place."""

    def __init__(self, size: torch.Size, pieces: list[FullPiece]) -> None:
        self._size, self.pieces = torch.Size(size), pieces

    def size(self) -> torch.Size:
        return self._size

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(index=MetadataIndex(fqn, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=_chunk(p), properties=TensorProperties.create_from_tensor(
                          p.view), size=self._size))  # fmt: skip
            for p in self.pieces
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [_chunk(p) for p in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for piece in self.pieces:
            if torch.Size(piece.offsets) == index.offset:
                return piece.view
        raise ValueError(f"{index.fqn}: no piece at {tuple(index.offset or ())}")


def _chunk(piece: FullPiece) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=piece.view.shape)


def piece_maker(model: torch.nn.Module) -> Callable[[str, torch.Tensor], Pieces]:
    """``make(name, tensor)``: a tensor in the layout of the model's entry ``name`` (the parameter itself, or an
    optimizer state of its shape) as its pieces of the full tensor."""
    splits, shapes = named_splits(model), full_shapes(model)
    return lambda name, tensor: Pieces(shapes[name], full_pieces(tensor.detach(), splits.get(name)))


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner, finding the pieces of a :class:`Pieces` entry."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = self.state_dict[index.fqn]
        return found.__get_tensor_shard__(index) if isinstance(found, Pieces) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's planner, reading into a :class:`Pieces` entry's views, and non-tensor entries without running code."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:  # fmt: skip
        # DCP's own set-up passes the entries through a function that turns types it does not know into None;
        # ours are flat already and hold no meta tensors, the only other thing it does.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = self.state_dict[index.fqn]
        return found.__get_tensor_shard__(index) if isinstance(found, Pieces) else super().lookup_tensor(index)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


# What DCP's metadata pickle may name: its own dataclasses and the torch types inside them, nothing callable else.
_METADATA_CLASSES = ("BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
                     "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")  # fmt: skip
_DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_SAFE_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES),
    *(("torch", name) for name in (*_DTYPES, "Size")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a part of DCP's metadata")


class _Reader(FileSystemReader):
    """DCP's file reader with a metadata unpickler that cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read the sharded checkpoint's metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a sharded checkpoint's metadata")
        return metadata


def write_shards(folder: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (:class:`Pieces`, tensors and plain values by key) to ``folder / shards`` (collective:
    every rank its own pieces, in parallel; one copy of what several ranks hold)."""
    dcp.save(dict(state), storage_writer=FileSystemWriter(folder / SHARDS, single_file_per_rank=True),
             planner=_SavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))  # fmt: skip


def read_shards(folder: Path, state: dict[str, Any], *, alone: bool = False) -> dict[str, Any]:
    """Read ``folder / shards`` into ``state``'s tensors and :class:`Pieces` in place; its other entries are
    replaced by the values read (returned). Collective over the world unless ``alone`` (one process reading on
    its own). A missing or damaged file is one CheckpointError naming it."""
    try:
        with warnings.catch_warnings():  # alone: DCP warns that it reads in a single process, as asked
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_Reader(folder / SHARDS),
                     planner=_LoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=alone)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # noqa: BLE001 -- DCP's wrapper of every rank's failures is a
        # BaseException; any other failure while reading is a damaged or foreign file too
        raise CheckpointError(f"{folder / SHARDS}: cannot read the sharded checkpoint ({_reason(err)})") from None
    return state


def saved_tensors(folder: Path) -> dict[str, TensorStorageMetadata]:
    """Key -> shape and dtype of every tensor in ``folder``'s shards (from the metadata; no tensor read)."""
    metadata = _Reader(folder / SHARDS).read_metadata()
    return {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


def read_full(folder: Path, prefix: str = "", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The full tensors saved under ``prefix`` (all of them by default), consolidated from every rank's pieces by
    this process alone (no process group), keyed without the prefix."""
    saved = saved_tensors(folder)
    keys = [k for k in saved if k.startswith(prefix)]
    state = {k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype, device=device) for k in keys}
    read_shards(folder, state, alone=True)
    return {k[len(prefix):]: t for k, t in state.items()}


def _reason(err: BaseException) -> str:
    """The first line of ``err``, or of the first rank's failure inside DCP's ``CheckpointException``."""
    if isinstance(err, CheckpointException) and err.failures:
        failure = next(iter(err.failures.values()))[0]  # (exception, traceback) of the first failing rank
        return f"{type(failure).__name__}: {first_line(failure)}"
    return first_line(err)

"""Who am I in the tensor- and data-parallel groups? Defaults describe a single process.

``ironcore.parallel.setup.init_parallel`` sets the groups once; layers only
ask for the tensor-parallel size, rank and group, so model code never
branches on TP. ``None`` stands for "a group of one" (no communication).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_DP_GROUP: dist.ProcessGroup | None = None
_SEQUENCE_PARALLEL = False


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Install the tensor-parallel process group (None: single process)."""
    global _TP_GROUP
    _TP_GROUP = group


def set_data_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Install the data-parallel process group (None: no data parallelism)."""
    global _DP_GROUP
    _DP_GROUP = group


def tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def tp_size() -> int:
    return 1 if _TP_GROUP is None else dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    return 0 if _TP_GROUP is None else dist.get_rank(_TP_GROUP)


def dp_group() -> dist.ProcessGroup | None:
    return _DP_GROUP


def dp_size() -> int:
    return 1 if _DP_GROUP is None else dist.get_world_size(_DP_GROUP)


def dp_rank() -> int:
    return 0 if _DP_GROUP is None else dist.get_rank(_DP_GROUP)


def set_sequence_parallel(enabled: bool) -> None:
    """Split the residual stream over the TP ranks along the sequence (see ``ironcore.parallel.mappings``)."""
    global _SEQUENCE_PARALLEL
    _SEQUENCE_PARALLEL = enabled


def sequence_parallel() -> bool:
    return _SEQUENCE_PARALLEL


@contextlib.contextmanager
def sequence_parallel_paused() -> Iterator[None]:
    """Run without sequence parallelism inside the block (e.g. KV-cached generation steps)."""
    global _SEQUENCE_PARALLEL
    saved = _SEQUENCE_PARALLEL
    _SEQUENCE_PARALLEL = False
    try:
        yield
    finally:
        _SEQUENCE_PARALLEL = saved

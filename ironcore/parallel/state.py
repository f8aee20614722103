"""Who am I in the tensor-parallel group? Defaults describe a single process.

The trainer sets the groups once (``set_tensor_parallel_group``); layers only
ask for the size, rank and group, so model code never branches on TP.
"""

from __future__ import annotations

import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Install the tensor-parallel process group (None: single process)."""
    global _TP_GROUP
    _TP_GROUP = group


def tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def tp_size() -> int:
    return 1 if _TP_GROUP is None else dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    return 0 if _TP_GROUP is None else dist.get_rank(_TP_GROUP)

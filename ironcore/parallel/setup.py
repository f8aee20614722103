"""Process groups for tensor x data parallelism, from torchrun's environment.

Layout (Megatron's): ``world = tp x dp`` and global rank = ``dp_rank * tp +
tp_rank``, so the ranks of one tensor-parallel group are neighbours. TP
communicates inside every layer, so it goes on the fastest links (the GPUs of
one node); DP communicates once per step and spans nodes::

    world 4, tp 2:   TP groups {0,1} {2,3}    DP groups {0,2} {1,3}

Without torchrun (no ``WORLD_SIZE``) or with a world of one, nothing is
initialised and the context describes a single process; layers and gradient
helpers then never communicate.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from ironcore.config.loader import validate_config
from ironcore.config.model import ModelConfig
from ironcore.config.training import Config, TrainerConfig
from ironcore.errors import ConfigError
from ironcore.parallel import comm, state


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """This process's place in the layout, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, tracks and writes checkpoints."""
        return self.rank == 0


def check_parallel_layout(tp_size: int, world_size: int, model: ModelConfig) -> None:
    """One-line ConfigError when ``model`` cannot be split ``tp_size`` ways in a world of ``world_size``.

    The checks are the config loader's (``validate_config``: TP vs world size,
    heads, key/value groups and MLP width vs TP), so a layout that passed
    config loading passes here, and callers without a Config are checked too.
    """
    validate_config(Config(model=model, trainer=TrainerConfig(tensor_model_parallel_size=tp_size)), world_size)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no GPU is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def init_parallel(
    tp_size: int, model: ModelConfig, device: str = "auto", timeout_s: float = 600.0, sequence_parallel: bool = False
) -> ParallelContext:
    """Initialise torch.distributed from torchrun's env and build the TP and DP groups.

    Validates the layout first (one-line ConfigError before any process-group
    work). Backend: nccl on CUDA, gloo on CPU. Installs the groups (and
    ``sequence_parallel``, which only means something with TP > 1) in
    :mod:`ironcore.parallel.state`, where layers and gradient helpers find them.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_parallel_layout(tp_size, world, model)
    dev = _pick_device(device, local_rank)
    if world == 1:
        return ParallelContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    dp_size = world // tp_size
    tp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for d in range(dp_size):
        ranks = list(range(d * tp_size, (d + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    for t in range(tp_size):
        ranks = list(range(t, world, tp_size))
        group = dist.new_group(ranks) if dp_size > 1 else None
        if rank in ranks:
            dp_group = group
    for group, name in ((tp_group, "tp"), (dp_group, "dp")):
        if group is not None:
            comm.name_group(group, name)
    state.set_tensor_parallel_group(tp_group)
    state.set_data_parallel_group(dp_group)
    state.set_sequence_parallel(sequence_parallel and tp_size > 1)
    return ParallelContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        tp_size=tp_size,
        tp_rank=rank % tp_size,
        dp_size=dp_size,
        dp_rank=rank // tp_size,
        device=dev,
        backend=backend,
    )


def destroy_parallel() -> None:
    """Forget the groups and shut torch.distributed down (safe to call in a single process)."""
    state.set_tensor_parallel_group(None)
    state.set_data_parallel_group(None)
    state.set_sequence_parallel(False)
    if dist.is_initialized():
        dist.destroy_process_group()

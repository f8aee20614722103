"""Fully sharded data parallelism with PyTorch's FSDP2: how a model is sharded (``trainer.data_parallel: fsdp``).

``fully_shard`` (:mod:`torch.distributed.fsdp`, what torchtitan builds on) splits every parameter along its
first dimension over the data-parallel ranks. Each transformer block is one unit: its weights are
all-gathered just before its forward pass (the next block's gather prefetched, as torchtitan does) and freed
after it (unless ``reshard_after_forward`` is off), gathered again for its backward pass, and its gradients
reduce-scattered as soon as they are done -- on every backward pass, so gradient accumulation keeps sharded
gradients only. The embeddings, final norm and output head form the root unit.

* Tensor parallelism composes as a 2-D layout: our TP layers split a weight over the TP ranks as always, and
  FSDP shards each rank's TP-local weight over the DP group.
* Mixed precision is FSDP2's policy: the sharded parameters stay fp32 (they are the master weights), the
  gathered ones are bf16 for compute, and gradients are reduced in fp32.
* Losses are normalised over the global batch, so the reduction is a sum (``set_gradient_divide_factor(1)``
  with sum-only collectives, which gloo needs). On gloo the all-gathers and reduce-scatters are IronCore's
  rings (:mod:`ironcore.parallel.comm`), as for the distributed optimizer: gloo's own take about twice as long.
* ``offload`` is FSDP2's ``CPUOffloadPolicy``: the shards, their gradients and the optimizer state live in
  host memory and the optimizer step runs there. It works at DP size 1 too (one GPU: a group of one).

The training side (the optimizer over the shards, the gradient norm) is :mod:`ironcore.training.fsdp`; a frozen
reference model (DPO's, GRPO's) is sharded the same way by its objective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ironcore.config.training import TrainerConfig
from ironcore.errors import ConfigError
from ironcore.parallel import comm, state
from ironcore.parallel.sharding import named_splits


def fsdp_shards(data_parallel: str, dp_size: int, offload: str) -> bool:
    """Does FSDP shard at this layout: ``data_parallel: fsdp`` with more than one DP rank, or with offload (at DP
    size 1 there is nothing to shard, unless the host is to hold the weights)?"""
    return data_parallel == "fsdp" and (dp_size > 1 or offload != "none")


def uses_fsdp(trainer: TrainerConfig) -> bool:
    """:func:`fsdp_shards` for this run (call after the process groups are set up)."""
    return fsdp_shards(trainer.data_parallel, state.dp_size(), trainer.offload)


def shard_model(model: nn.Module, trainer: TrainerConfig) -> None:
    """:func:`apply_fsdp` with the run's settings (``trainer.precision``, ``offload``, ``reshard_after_forward``)."""
    apply_fsdp(model, bf16=trainer.precision == "bf16", offload=trainer.offload == "params",
               reshard_after_forward=trainer.reshard_after_forward)  # fmt: skip


def apply_fsdp(model: nn.Module, *, bf16: bool, offload: bool, reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place over the data-parallel group: one FSDP unit per transformer block, the rest in
    the root unit (see the module doc). ``reshard_after_forward=False`` keeps each block's gathered weights
    until its backward pass (one all-gather less, more memory)."""
    # Imported here: torch.distributed.fsdp brings DTensor, 0.7 s at the start of every command that never shards.
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if any(max(split.replicas) > 1 for split in named_splits(model).values()):
        raise ConfigError("trainer.data_parallel: fsdp with more tensor-parallel ranks than key/value heads is not "
                          "supported (the replicated heads' gradient sum); lower tensor_model_parallel_size")
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(data_parallel_group(device), device.type)
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy(),
    }
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        # The last block's backward pass starts right after its forward pass: keep its weights gathered.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **options)
    fully_shard(model, **options)
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
    gloo = dist.get_backend(mesh.get_group()) == "gloo"
    for unit in (*blocks, model):  # each unit's own setting
        unit.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided by the global batch
        unit.set_force_sum_reduction_for_comms(True)
        if gloo:  # gloo's own collectives take about twice as long as IronCore's rings (parallel/comm.py)
            unit.set_custom_all_gather(_RingAllGather())
            unit.set_custom_reduce_scatter(_RingReduceScatter())


def data_parallel_group(device: torch.device) -> dist.ProcessGroup:
    """The group FSDP shards over: the DP group, or at DP size 1 (offload on one GPU) a group of this rank alone,
    starting a one-process group when none runs (FSDP2 needs a process group even to shard nothing)."""
    if state.dp_group() is not None:
        return state.dp_group()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return dist.group.WORLD
    alone = None
    for rank in range(dist.get_world_size()):  # new_group is collective: every rank creates every group
        group = dist.new_group([rank], backend=backend)
        alone = group if rank == dist.get_rank() else alone
    return alone


# FSDP2's custom collectives (``set_custom_all_gather``/``reduce_scatter``) are duck-typed: the two classes below
# implement torch.distributed.fsdp's ``AllGather`` and ``ReduceScatter`` interfaces (``allocate`` and ``__call__``)
# without subclassing them, so that importing this module does not import FSDP.
class _RingAllGather:
    """FSDP2's all-gather through :func:`ironcore.parallel.comm.all_gather_into` (counted in its traffic log)."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:  # fmt: skip
        comm.all_gather_into(output_tensor, input_tensor, group)  # done when it returns: no handle to wait on


class _RingReduceScatter:
    """FSDP2's reduce-scatter (a sum: the divide factor is 1) through :func:`ironcore.parallel.comm.reduce_scatter`,
    which uses the input, FSDP's temporary, as its scratch space."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any = None, async_op: bool = False) -> None:  # fmt: skip
        comm.reduce_scatter(input_tensor, output_tensor, group)

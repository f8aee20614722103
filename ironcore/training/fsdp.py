"""Fully sharded data parallelism (``trainer.data_parallel: fsdp``) with PyTorch's FSDP2.

``fully_shard`` (:mod:`torch.distributed.fsdp`, what torchtitan builds on) splits every parameter along its
first dimension over the data-parallel ranks, so each rank holds 1/DP of the weights, of their gradients and,
since the optimizer only sees the shards, of the optimizer state. Each transformer block is one unit: its
weights are all-gathered just before its forward pass (the next block's gather prefetched, as torchtitan does)
and freed after it, gathered again for its backward pass, and its gradients reduce-scattered as soon as they
are done -- on every backward pass, so gradient accumulation keeps sharded gradients only. The embeddings,
final norm and output head form the root unit.

How it fits the rest:

* Tensor parallelism composes as a 2-D layout: our TP layers split a weight over the TP ranks as always, and
  FSDP shards each rank's TP-local weight over the DP group (the ``(dp, tp)`` mesh of
  :mod:`ironcore.parallel.setup`). The TP sums some gradients need (q/k norms, sequence-parallel norms) are
  elementwise, so they run on the reduce-scattered shards.
* Mixed precision is FSDP2's policy: the sharded parameters stay fp32 (they are the master weights), the
  gathered ones are bf16 for compute, and gradients are reduced in fp32.
* Losses are normalised over the global batch, so the reduction is a sum (``set_gradient_divide_factor(1)``
  with sum-only collectives, which gloo needs). On gloo the all-gathers and reduce-scatters are IronCore's
  rings (:mod:`ironcore.parallel.comm`), as for the distributed optimizer: gloo's own take about twice as long.
* ``trainer.offload: params`` is FSDP2's ``CPUOffloadPolicy``: the shards, their gradients and the optimizer
  state live in host memory and the optimizer step runs there. It works at DP size 1 too (one GPU: the
  weights and AdamW in host memory, each unit copied to the GPU for its compute); without offload a DP size
  of 1 has nothing to shard and trains as ``ddp``.
* Parameters are DTensors (``Shard(0)`` over the DP mesh); :mod:`ironcore.parallel.sharding` takes them in
  full checkpoints, and :mod:`ironcore.checkpoints.sharded` writes each rank's shards as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from ironcore.errors import ConfigError
from ironcore.parallel import comm, state
from ironcore.parallel.grad import sum_of_squares, sync_tensor_parallel_grads
from ironcore.parallel.sharding import local_tensor, named_splits, owned_full_pieces
from ironcore.training.optimizer import DataParallelOptimizer


def apply_fsdp(model: nn.Module, *, bf16: bool, offload: bool, reshard_after_forward: bool = True) -> None:
    """Shard ``model`` in place over the data-parallel group: one FSDP unit per transformer block, the rest in
    the root unit (see the module doc). ``reshard_after_forward=False`` keeps each block's gathered weights
    until its backward pass (one all-gather less, more memory)."""
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


class _RingAllGather(AllGather):
    """FSDP2's all-gather through :func:`ironcore.parallel.comm.all_gather_into` (counted in its traffic log)."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:  # fmt: skip
        comm.all_gather_into(output_tensor, input_tensor, group)  # done when it returns: no handle to wait on


class _RingReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter (a sum: the divide factor is 1) through :func:`ironcore.parallel.comm.reduce_scatter`,
    which uses the input, FSDP's temporary, as its scratch space."""

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any = None, async_op: bool = False) -> None:  # fmt: skip
        comm.reduce_scatter(input_tensor, output_tensor, group)


class FSDPOptimizer(DataParallelOptimizer):
    """A torch optimizer over the FSDP shards: the gradients arrive reduce-scattered from the backward pass, so
    the step's communication is only the TP sums and the norm's one all-reduce."""

    def finish_grad_sync(self) -> None:
        """The TP sums (on the shards); the DP reduction already happened during the backward passes."""
        sync_tensor_parallel_grads(self.model)

    def grad_norm(self) -> torch.Tensor:
        """The global norm: each element of the full gradient counted once, on the rank that owns it, summed over
        the whole world in float64 (:func:`~ironcore.parallel.grad.sum_of_squares`)."""
        splits = named_splits(self.model)
        tp_rank = state.tp_rank()
        owned: list[torch.Tensor] = []
        device = torch.device("cpu")
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            grad = local_tensor(param.grad)
            device = grad.device
            if name in splits:
                owned += owned_full_pieces(param.grad, splits[name])
            elif tp_rank == 0:  # replicated over TP: the first TP rank's copy counts
                owned.append(grad)
        total = sum_of_squares(owned, device)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":  # offloaded gradients are on the host
                total = total.cuda()
            dist.all_reduce(total)
        return total.sqrt().float()

"""The optimizer of fully sharded data parallelism (``trainer.data_parallel: fsdp``): a torch optimizer over the
FSDP2 shards (:mod:`ironcore.parallel.fsdp` shards the model).

The gradients arrive reduce-scattered from the backward pass, so the step's communication is only the TP sums
(on the shards: they are elementwise) and the norm's one all-reduce. Parameters and optimizer states are
DTensors (``Shard(0)`` over the DP mesh); :mod:`ironcore.parallel.sharding` takes them in full checkpoints, and
:mod:`ironcore.checkpoints.sharded` writes each rank's shards as they are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ironcore.parallel import state
from ironcore.parallel.grad import sum_of_squares, sync_tensor_parallel_grads
from ironcore.parallel.sharding import local_tensor, named_splits, owned_full_pieces
from ironcore.training.optimizer import DataParallelOptimizer


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

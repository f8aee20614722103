"""The communication patterns of Megatron-style tensor parallelism as autograd functions.

Column-parallel layers enter through ``copy_to_tp`` (identity forward,
all-reduce of the input gradient backward); row-parallel layers leave through
``reduce_from_tp`` (all-reduce forward, identity backward). ``gather_from_tp``
concatenates last-dimension shards into the whole.
With one rank every function is the identity.
"""

from __future__ import annotations

import torch

from ironcore.parallel import comm, state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce(x.contiguous(), state.tp_group())


def _split_last(x: torch.Tensor) -> torch.Tensor:
    size = state.tp_size()
    if size == 1:
        return x
    return x.chunk(size, dim=-1)[state.tp_rank()].contiguous()


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    return torch.cat(comm.all_gather(x, state.tp_group()), dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _all_reduce(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return _gather_last(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _split_last(grad)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Enter a column-parallel region: every rank needs the full input."""
    return x if state.tp_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Leave a row-parallel region: sum the partial outputs of all ranks."""
    return x if state.tp_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' last-dimension shards (e.g. vocab-parallel logits)."""
    return x if state.tp_size() == 1 else _GatherFromTP.apply(x)

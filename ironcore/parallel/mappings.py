"""The communication patterns of Megatron-style tensor parallelism as autograd functions.

Column-parallel layers enter through ``copy_to_tp`` (identity forward,
all-reduce of the input gradient backward); row-parallel layers leave through
``reduce_from_tp`` (all-reduce forward, identity backward). ``gather_from_tp``
concatenates last-dimension shards into the whole.

Sequence parallelism (``state.sequence_parallel()``, Megatron's
``sequence_parallel``) splits the residual stream between the TP regions
along the sequence (dimension 1 of [B, T, H]): each rank normalises and
drops out T / tp positions. A column-parallel layer then enters through
``gather_from_sequence`` (all-gather forward, reduce-scatter backward) and a
row-parallel one leaves through ``reduce_scatter_to_sequence``
(reduce-scatter forward, all-gather backward), which move the same bytes as
the one all-reduce they replace. ``column_input`` and ``row_output`` pick
the pair for the layers, so neither layers nor model branch on the mode.
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


def _to_sequence_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()  # [T, B, ...]: each rank's positions one contiguous block


def _gather_sequence(x: torch.Tensor) -> torch.Tensor:
    size = state.tp_size()
    local = _to_sequence_major(x)
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    return comm.all_gather_into(out, local, state.tp_group()).transpose(0, 1)


def _reduce_scatter_sequence(x: torch.Tensor) -> torch.Tensor:
    full = _to_sequence_major(x)
    out = full.new_empty((_sequence_shard(full.shape[0]), *full.shape[1:]))
    return comm.reduce_scatter(full, out, state.tp_group()).transpose(0, 1)


def _split_sequence(x: torch.Tensor) -> torch.Tensor:
    n = _sequence_shard(x.shape[1])
    return x.narrow(1, state.tp_rank() * n, n)


def _sequence_shard(length: int) -> int:
    if length % state.tp_size():
        raise ValueError(
            f"sequence parallelism: sequence length {length} is not a multiple of the tensor-parallel size "
            f"{state.tp_size()}"
        )
    return length // state.tp_size()


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


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, partial_grad):  # noqa: D102
        ctx.partial_grad = partial_grad
        return _gather_sequence(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return (_reduce_scatter_sequence(grad) if ctx.partial_grad else _split_sequence(grad).contiguous()), None


class _ToSequenceShard(torch.autograd.Function):
    """This rank's positions: of the sum over ranks (``reduce``, a row-parallel output) or of a whole tensor."""

    @staticmethod
    def forward(ctx, x, reduce):  # noqa: D102
        return _reduce_scatter_sequence(x) if reduce else _split_sequence(x).contiguous()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _gather_sequence(grad), None


def _sequence_parallel() -> bool:
    return state.sequence_parallel() and state.tp_size() > 1


def scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Enter the sequence-parallel residual stream: keep this rank's T / tp positions (identity without SP)."""
    return _ToSequenceShard.apply(x, False) if _sequence_parallel() else x


def gather_from_sequence(x: torch.Tensor) -> torch.Tensor:
    """Leave the sequence-parallel residual stream for a replicated consumer (e.g. a reward model's score head):
    all positions on every rank, each rank's gradient share kept in the backward (identity without SP)."""
    return _GatherFromSequence.apply(x, False) if _sequence_parallel() else x


def column_input(x: torch.Tensor) -> torch.Tensor:
    """A column-parallel layer's input: ``copy_to_tp``, or under SP the positions of all ranks gathered."""
    return _GatherFromSequence.apply(x, True) if _sequence_parallel() else copy_to_tp(x)


def row_output(x: torch.Tensor) -> torch.Tensor:
    """A row-parallel layer's output: ``reduce_from_tp``, or under SP the sum reduce-scattered over positions."""
    return _ToSequenceShard.apply(x, True) if _sequence_parallel() else reduce_from_tp(x)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Enter a column-parallel region: every rank needs the full input."""
    return x if state.tp_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Leave a row-parallel region: sum the partial outputs of all ranks."""
    return x if state.tp_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' last-dimension shards (e.g. vocab-parallel logits)."""
    return x if state.tp_size() == 1 else _GatherFromTP.apply(x)

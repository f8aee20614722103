"""Tensor-parallel linear and embedding layers (Megatron-LM's column/row split).

Each layer owns only its shard, but is *initialised* by drawing the full
tensor from the global RNG and keeping its slice, so the same seed gives the
same network for every TP size. With one rank they are plain Linear/Embedding.
Each layer declares how its tensors are split in ``tp_splits`` (see
:mod:`ironcore.parallel.sharding`), which checkpoints, gradient clipping and
gradient synchronisation read.

A column-parallel weight may be the concatenation of several logical parts
along its output dimension (fused q/k/v, fused gate/up); ``output_parts``
records their full sizes so each part is split across ranks separately and a
rank holds matching slices of every part. A part may be *replicated* over
neighbouring ranks (``replicas``): GQA/MQA key/value heads when there are
fewer of them than ranks.

The vocabulary (token embedding, output projection) is padded to a multiple
of ``128 x tp`` like Megatron's ``make_vocab_size_divisible_by``: every rank
gets an equal, 128-aligned slice. Padding rows start at zero, their logits
are masked to -inf, so they are never sampled, never counted in the loss and
never receive a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.parallel import state
from ironcore.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp
from ironcore.parallel.sharding import TPSplit

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int | None = None) -> int:
    """``vocab_size`` rounded up to a multiple of 128 x tp (default tp: the current TP size)."""
    multiple = VOCAB_MULTIPLE * (state.tp_size() if tp is None else tp)
    return -(-vocab_size // multiple) * multiple


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the padding columns of this rank's vocab-parallel ``logits`` to -inf (a no-op without any)."""
    local = logits.shape[-1]
    real = min(max(vocab_size - state.tp_rank() * local, 0), local)
    if real == local:
        return logits
    logits[..., real:] = float("-inf")  # in place: the projection's backward does not need its output
    return logits


def _local_size(split: TPSplit, what: str) -> int:
    try:
        return sum(split.local_sizes(state.tp_size()))
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _init_from_full(param: torch.Tensor, full_shape: tuple[int, ...], std: float, split: TPSplit) -> None:
    if param.is_meta:
        return
    full = torch.empty(full_shape, dtype=torch.float32, device=param.device).normal_(0.0, std)
    with torch.no_grad():
        param.copy_(split.shard(full, state.tp_size(), state.tp_rank()))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; output stays sharded unless ``gather_output``.

    ``replicas[i]`` neighbouring ranks share one slice of part i (default 1);
    ``pad_vocab`` pads the output dimension like the vocabulary (output projection).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = True,
        gather_output: bool = False,
        replicas: list[int] | None = None,
        pad_vocab: bool = False,
    ) -> None:
        super().__init__()
        self.output_parts = list(out_features) if isinstance(out_features, list) else [out_features]
        self.in_features = in_features
        self.out_features = sum(self.output_parts)
        padded = padded_vocab_size(self.out_features) if pad_vocab else None
        split = TPSplit(0, tuple(self.output_parts), tuple(replicas) if replicas else None, padded)
        local = _local_size(split, "column-parallel output")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        self.tp_splits = {"weight": split} | ({"bias": split} if bias else {})

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.out_features, self.in_features), std, self.tp_splits["weight"])
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x), self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; the partial sums are all-reduced, then b added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        split = TPSplit(1, (in_features,))
        self.weight = nn.Parameter(torch.empty(out_features, _local_size(split, "row-parallel input")))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.tp_splits = {"weight": split}

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.out_features, self.in_features), std, self.tp_splits["weight"])
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across ranks; each rank looks up its own rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        split = TPSplit(0, (num_embeddings,), padded=padded_vocab_size(num_embeddings))
        local = _local_size(split, "vocabulary")
        self.vocab_start = state.tp_rank() * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        self.tp_splits = {"weight": split}

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.num_embeddings, self.embedding_dim), std, self.tp_splits["weight"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if state.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection with this (tied) weight: this rank's vocab-parallel logits."""
        return _TiedProjection.apply(copy_to_tp(x), self.weight)


class _TiedProjection(torch.autograd.Function):
    """``x @ weight.T`` whose weight gradient comes back as one fresh contiguous tensor.

    Autograd's own linear returns a transposed view, and a view cannot take the
    embedding lookup's gradient in place: with tied weights every step would
    allocate a third vocabulary x hidden tensor just to add the two. Casts like
    autocast's own linear when autocast is on.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.dtypes = (x.dtype, weight.dtype)
        return F.linear(x_c, w_c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])).to(ctx.dtypes[1])
        return grad_x, grad_weight


def residual_std(std: float, num_layers: int) -> float:
    """GPT-2/Megatron scaling of output projections that write into the residual stream."""
    return std / math.sqrt(2 * num_layers)

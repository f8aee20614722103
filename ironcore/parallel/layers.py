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
come out of the output projection as -inf, so they are never sampled, never
counted in the loss and never receive a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.parallel import state
from ironcore.parallel.grad import mark_sequence_parallel_grads
from ironcore.parallel.mappings import column_input, gather_from_tp, reduce_from_tp, row_output
from ironcore.parallel.sharding import TPSplit

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int | None = None) -> int:
    """``vocab_size`` rounded up to a multiple of 128 x tp (default tp: the current TP size)."""
    multiple = VOCAB_MULTIPLE * (state.tp_size() if tp is None else tp)
    return -(-vocab_size // multiple) * multiple


def local_size(split: TPSplit, what: str) -> int:
    try:
        return sum(split.local_sizes(state.tp_size()))
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def init_from_full(param: torch.Tensor, full_shape: tuple[int, ...], std: float, split: TPSplit) -> None:
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
        local = local_size(split, "column-parallel output")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        self.tp_splits = {"weight": split} | ({"bias": split} if bias else {})
        self.lora: nn.Module | None = None  # low-rank adapters (ironcore/layers/lora.py), added by models/lora.py

    def reset_parameters(self, std: float) -> None:
        init_from_full(self.weight, (self.out_features, self.in_features), std, self.tp_splits["weight"])
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = column_input(x)
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None and self.lora.enabled:
            y = self.lora(y, x)  # adds its update into y
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; the partial sums are all-reduced, then b added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        split = TPSplit(1, (in_features,))
        self.weight = nn.Parameter(torch.empty(out_features, local_size(split, "row-parallel input")))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.tp_splits = {"weight": split}
        self.lora: nn.Module | None = None  # low-rank adapters (ironcore/layers/lora.py), added by models/lora.py
        mark_sequence_parallel_grads(self, ["bias"])  # added after the reduce-scatter: to this rank's positions

    def reset_parameters(self, std: float) -> None:
        init_from_full(self.weight, (self.out_features, self.in_features), std, self.tp_splits["weight"])
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.lora is not None and self.lora.enabled:  # a partial sum like the base's: one reduction for both
            y = self.lora(y, x)
        y = row_output(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across ranks; each rank looks up its own rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        split = TPSplit(0, (num_embeddings,), padded=padded_vocab_size(num_embeddings))
        local = local_size(split, "vocabulary")
        self.vocab_start = state.tp_rank() * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        self.tp_splits = {"weight": split}

    def reset_parameters(self, std: float) -> None:
        init_from_full(self.weight, (self.num_embeddings, self.embedding_dim), std, self.tp_splits["weight"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if state.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection with this (tied) weight: this rank's vocab-parallel logits, padding at -inf."""
        return vocab_logits(x, self.weight, None, self.num_embeddings)


class VocabParallelOutput(ColumnParallelLinear):
    """The untied output projection: padded vocabulary rows split across ranks, padding logits at -inf."""

    def __init__(self, in_features: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__(in_features, vocab_size, bias=bias, pad_vocab=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_logits(x, self.weight, self.bias, self.out_features)


def real_vocab_rows(vocab_size: int, local: int) -> int:
    """How many of this rank's ``local`` rows of the padded vocabulary are real classes (the rest is padding)."""
    return min(max(vocab_size - state.tp_rank() * local, 0), local)


def vocab_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """This rank's logits ``x @ weight.T (+ bias)`` over its slice of the padded vocabulary; padding at -inf."""
    real = real_vocab_rows(vocab_size, weight.shape[0])
    return _VocabProjection.apply(column_input(x), weight, bias, real)


class _VocabProjection(torch.autograd.Function):
    """The output projection onto ``real`` vocabulary rows followed by padding rows.

    The padding logits are written as -inf into the fresh output (a constant:
    no gradient flows through them), and the backward reads only the real
    columns of the incoming gradient, so masking costs no copy of the
    [tokens x vocab] gradient. The weight gradient comes back as one fresh
    contiguous tensor: autograd's own linear returns a transposed view, which
    cannot take a tied embedding's lookup gradient in place (every step would
    allocate a third vocabulary x hidden tensor to add the two). Casts like
    autocast's own linear when autocast is on.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, real: int) -> torch.Tensor:  # noqa: D102
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.real, ctx.dtypes = real, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        logits = F.linear(x_c, w_c, None if bias is None else bias.to(dtype))
        if real < logits.shape[-1]:
            logits[..., real:] = float("-inf")
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        real, (x_dtype, weight_dtype, bias_dtype) = ctx.real, ctx.dtypes
        grad = grad.to(x.dtype).flatten(0, -2)[:, :real]  # a strided view: BLAS reads it in place
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight[:real]).view(x.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            torch.mm(grad.t(), x.reshape(-1, x.shape[-1]), out=grad_weight[:real])
            grad_weight[real:] = 0
            grad_weight = grad_weight.to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.new_zeros(weight.shape[0], dtype=bias_dtype)
            grad_bias[:real] = grad.sum(dim=0)
        return grad_x, grad_weight, grad_bias, None


def residual_std(std: float, num_layers: int) -> float:
    """GPT-2/Megatron scaling of output projections that write into the residual stream."""
    return std / math.sqrt(2 * num_layers)

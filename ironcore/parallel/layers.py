"""Tensor-parallel linear and embedding layers (Megatron-LM's column/row split).

Each layer owns only its shard, but is *initialised* by drawing the full
tensor from the global RNG and keeping its slice, so the same seed gives the
same network for every TP size. With one rank they are plain Linear/Embedding.

A column-parallel weight may be the concatenation of several logical parts
along its output dimension (fused q/k/v, fused gate/up); ``output_parts``
records their full sizes so each part is split across ranks separately and a
rank holds matching slices of every part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.parallel import state
from ironcore.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp


def _shard_size(full: int, what: str) -> int:
    size = state.tp_size()
    if full % size:
        raise ValueError(f"{what} of size {full} is not divisible by the tensor-parallel size {size}")
    return full // size


def shard_parts(full: torch.Tensor, parts: list[int], dim: int) -> torch.Tensor:
    """This rank's slice of each part of ``full`` along ``dim``, concatenated."""
    size, rank = state.tp_size(), state.tp_rank()
    if size == 1:
        return full
    pieces = [p.chunk(size, dim=dim)[rank] for p in full.split(parts, dim=dim)]
    return torch.cat(pieces, dim=dim)


def _init_from_full(param: torch.Tensor, full_shape: tuple[int, ...], std: float, parts: list[int], dim: int) -> None:
    if param.is_meta:
        return
    full = torch.empty(full_shape, dtype=torch.float32, device=param.device).normal_(0.0, std)
    with torch.no_grad():
        param.copy_(shard_parts(full, parts, dim))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; output stays sharded unless ``gather_output``."""

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = True,
        gather_output: bool = False,
    ) -> None:
        super().__init__()
        self.output_parts = list(out_features) if isinstance(out_features, list) else [out_features]
        self.in_features = in_features
        self.out_features = sum(self.output_parts)
        local = sum(_shard_size(p, "column-parallel output") for p in self.output_parts)
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.out_features, self.in_features), std, self.output_parts, 0)
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
        local = _shard_size(in_features, "row-parallel input")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.out_features, self.in_features), std, [self.in_features], 1)
        if self.bias is not None and not self.bias.is_meta:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks; each rank looks up its own rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _shard_size(num_embeddings, "vocabulary")
        self.vocab_start = state.tp_rank() * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))

    def reset_parameters(self, std: float) -> None:
        _init_from_full(self.weight, (self.num_embeddings, self.embedding_dim), std, [self.num_embeddings], 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if state.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0))


def residual_std(std: float, num_layers: int) -> float:
    """GPT-2/Megatron scaling of output projections that write into the residual stream."""
    return std / math.sqrt(2 * num_layers)

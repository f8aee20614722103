"""Causal self-attention: MHA, GQA and MQA, optional q/k norm, RoPE, a sliding window and a logit soft-cap.

One fused column-parallel projection produces q, k and v (each split over
tensor-parallel ranks by heads), the scores go through PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them), and a row-parallel projection brings the heads back.
Gemma 2's soft-capped scores (``cap * tanh(score / cap)`` before the
softmax) have no fused kernel in PyTorch: those layers compute the scores
explicitly.

With fewer key/value heads than tensor-parallel ranks (MQA, small GQA) the
key/value heads are *replicated*: each rank holds the one key/value head its
query heads read, shared by ``tp / kv_heads`` neighbouring ranks. Each copy
only sees the gradient of its rank's queries, so
``ironcore.parallel.grad.sync_tensor_parallel_grads`` sums the copies'
gradients, as it sums those of the q/k norms, which every rank applies to
its own heads only.

For generation, a :class:`KVCache` keeps every layer's keys and values so
that each new token attends to the stored prefix instead of recomputing it.
The cache holds what this rank computed (its shard of the key/value heads),
so it works unchanged under tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ironcore import kernels
from ironcore.config.model import ModelConfig
from ironcore.layers.norm import RMSNorm
from ironcore.layers.rope import apply_rotary
from ironcore.parallel import state
from ironcore.parallel.grad import mark_partial_grads
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear


class LayerKVCache:
    """One layer's keys and values, in buffers of ``capacity`` positions filled left to right.

    The buffers are allocated at the first write, from that write's batch size,
    heads, dtype and device (so autocast and TP shards need no configuration);
    after that a decode step copies its one position in place instead of
    concatenating the whole history into a new tensor.

    With a ``slot`` tensor (static decoding) a single new position is written
    at the index ``slot`` holds and *all* ``capacity`` slots are returned, so a
    decode step has the same shapes and addresses at every position and can be
    captured in a CUDA graph; the caller's mask hides the slots not written yet.
    """

    def __init__(self, capacity: int, slot: torch.Tensor | None = None) -> None:
        self.capacity = capacity
        self.length = 0
        self.slot = slot
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, H, T, D]; return the keys and values of every position so far (static: of every slot)."""
        if self.slot is not None and self.keys is not None and k.shape[2] == 1:
            self.keys.index_copy_(2, self.slot, k)
            self.values.index_copy_(2, self.slot, v)
            return self.keys, self.values
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions do not fit its capacity of {self.capacity}")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            # Static decoding attends to unwritten slots too (masked): they must hold numbers, not garbage
            # that could be NaN (0 x NaN is NaN).
            make = torch.zeros if self.slot is not None else torch.empty
            self.keys = make(shape, dtype=k.dtype, device=k.device)
            self.values = make(shape, dtype=v.dtype, device=v.device)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (new, smaller buffers): finished sequences stop costing compute."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]  # (index_select is slower on CPU)

    def splice(self, start: int, other: LayerKVCache, length: int, capacity: int) -> None:
        """New buffers of ``capacity`` positions: this cache's rows with their positions from ``start`` on, then
        ``other``'s rows, both moved to end at position ``length`` (zeros before them). Rows that join a running
        batch (continuous batching) line up with it so that every row writes its next token at ``length``."""
        mine, theirs = self.length - start, other.length

        def joined(t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(t.shape[0] + o.shape[0], t.shape[1], capacity, t.shape[3])
            out[: t.shape[0], :, length - mine : length] = t[:, :, start : self.length]
            out[t.shape[0] :, :, length - theirs : length] = o[:, :, :theirs]
            return out

        self.keys, self.values = joined(self.keys, other.keys), joined(self.values, other.values)
        self.capacity, self.length = capacity, length


class KVCache:
    """The keys and values of every layer, for prefill + incremental decoding of up to ``capacity`` positions.

    ``slot`` (a one-element LongTensor) makes it static: decode steps write at the slot it holds and attend
    to every slot (see :class:`LayerKVCache`); the prefill still fills the first positions as usual.
    """

    def __init__(self, num_layers: int, capacity: int, slot: torch.Tensor | None = None) -> None:
        self.layers = [LayerKVCache(capacity, slot) for _ in range(num_layers)]
        self.slot = slot

    @property
    def length(self) -> int:
        """Positions stored so far (the same in every layer); static decode steps do not count."""
        return self.layers[0].length

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a LongTensor of indices) in every layer."""
        for layer in self.layers:
            layer.keep(rows)

    def splice(self, start: int, other: KVCache, length: int, capacity: int) -> None:
        """:meth:`LayerKVCache.splice` in every layer: ``other``'s rows join this batch, all ending at ``length``."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.splice(start, theirs, length, capacity)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold (measured from their storages; 0 before the first write)."""
        return sum(t.untyped_storage().nbytes() for layer in self.layers if layer.keys is not None
                   for t in (layer.keys, layer.values))


def kv_cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype) -> int:
    """The KV cache's size on this rank, computed: layers x 2 x batch x kv heads x head dim x capacity x bytes.

    Under TP each rank holds its share of the key/value heads (one head when there are fewer heads than ranks).
    """
    tp = state.tp_size()
    kv_heads = cfg.kv_heads * max(1, tp // cfg.kv_heads) // tp
    return cfg.num_layers * 2 * batch * kv_heads * cfg.head_size * capacity * torch.finfo(dtype).bits // 8


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float,
    dropout: float,
) -> torch.Tensor:
    """Attention with scores ``cap * tanh(q.k * scale / cap)``, softmax in fp32 (Gemma 2); ``mask`` None: causal."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = cap * torch.tanh(scores / cap)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), dropout)
    return probs @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        tp = state.tp_size()
        kv_replicas = max(1, tp // cfg.kv_heads)  # ranks sharing one key/value head
        self.head_dim = cfg.head_size
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.kv_heads * kv_replicas // tp
        self.dropout = cfg.dropout
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcap
        q_size, kv_size = cfg.num_attention_heads * self.head_dim, cfg.kv_heads * self.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.attention_bias, replicas=[1, kv_replicas, kv_replicas]
        )
        # q/k norms over each head (Qwen3, Gemma 3), or over the whole projection (OLMo 2) before the head split.
        self.qk_norm_per_head = cfg.qk_norm_per_head
        cfg.check_tensor_parallel(tp)  # e.g. q/k norms over all heads: their statistic would need the ranks' sum
        q_dim, k_dim = (self.head_dim, self.head_dim) if cfg.qk_norm_per_head else (q_size, kv_size)
        norm = kernels.selected(cfg, "norm")
        self.q_norm = mark_partial_grads(RMSNorm(q_dim, cfg.norm_eps, cfg.norm_unit_offset, norm)) if cfg.qk_norm else None
        self.k_norm = mark_partial_grads(RMSNorm(k_dim, cfg.norm_eps, cfg.norm_unit_offset, norm)) if cfg.qk_norm else None
        self.rope_kernel = kernels.selected(cfg, "rope")
        self.out = RowParallelLinear(q_size, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; ``mask`` is a bool [.., T, S] (True = may attend) over the S keys.

        Without a cache S = T. With ``kv_cache`` this call's keys and values are
        appended to it and the queries attend to all S stored positions. A
        ``mask`` of None means causal when S = T, and every key for a single
        query (a decode step).
        """
        qkv = self.qkv(x)  # under sequence parallelism x holds this rank's positions, qkv all of them
        B, T, _ = qkv.shape
        fused_rope = rope is not None and kernels.runs_triton(self.rope_kernel, qkv.device)
        if fused_rope and self.q_norm is None:  # rotate the q and k heads where the projection wrote them
            heads = self.num_heads + self.num_kv_heads
            kernels.module("rope").rotate_(qkv.view(B, T, heads + self.num_kv_heads, self.head_dim)[:, :, :heads],
                                           *rope)  # fmt: skip
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused_rope and self.q_norm is not None:  # the norms' outputs are fresh tensors: rotated in place
            kernels.module("rope").rotate_(q.transpose(1, 2), *rope)
            kernels.module("rope").rotate_(k.transpose(1, 2), *rope)
        elif rope is not None and not fused_rope:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        if self.softcap is not None:
            scale = self.scale if self.scale is not None else self.head_dim**-0.5
            y = softcapped_attention(q, k, v, mask, scale, self.softcap, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T == k.shape[2],
                enable_gqa=self.num_kv_heads != self.num_heads, scale=self.scale,
            )
        return self.out(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

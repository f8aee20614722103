"""Causal self-attention: MHA, GQA and MQA, optional q/k norm, RoPE and a sliding window.

One fused column-parallel projection produces q, k and v (each split over
tensor-parallel ranks by heads), the scores go through PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels where the
device has them), and a row-parallel projection brings the heads back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.config.model import ModelConfig
from ironcore.layers.norm import RMSNorm
from ironcore.layers.rope import apply_rotary
from ironcore.parallel import state
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        tp = state.tp_size()
        self.head_dim = cfg.head_size
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.kv_heads // tp
        self.dropout = cfg.dropout
        q_size, kv_size = cfg.num_attention_heads * self.head_dim, cfg.kv_heads * self.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.out = RowParallelLinear(q_size, cfg.hidden_size, bias=cfg.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; ``mask`` is a bool [.., T, T] (True = may attend) or None for causal."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

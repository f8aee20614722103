"""The feed-forward block: plain (GPT-2, Phi) or gated (SwiGLU in LLaMA, GeGLU in Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ironcore.config.model import ModelConfig
from ironcore.parallel import state
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) when gated.

    Gate and up share one column-parallel weight ``[gate; up]``; each rank
    holds matching slices of both halves, so the product is local.
    """

    def __init__(self, cfg: ModelConfig, ffn: int | None = None) -> None:
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.activation]
        ffn = ffn or cfg.ffn_size
        parts = [ffn, ffn] if self.gated else [ffn]
        self.up = ColumnParallelLinear(cfg.hidden_size, parts, bias=cfg.mlp_bias)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, bias=cfg.mlp_bias)
        self.local_ffn = ffn // state.tp_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.split(self.local_ffn, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)

"""The feed-forward block: plain (GPT-2, Phi) or gated (SwiGLU in LLaMA, GeGLU in Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ironcore import kernels
from ironcore.config.model import ModelConfig
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
        self.gated, self.activation, self.glu_kernel = cfg.gated_mlp, cfg.activation, glu_kernel(cfg)
        ffn = ffn or cfg.ffn_size
        parts = [ffn, ffn] if self.gated else [ffn]
        self.up = ColumnParallelLinear(cfg.hidden_size, parts, bias=cfg.mlp_bias)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(activate(self.up(x), self.activation, self.gated, self.glu_kernel))


def activate(h: torch.Tensor, activation: str, gated: bool, kernel: str = "torch") -> torch.Tensor:
    """act(h), or act(gate) * up of h = [gate | up] (this rank's matching halves; one fused kernel in Triton)."""
    if not gated:
        return ACTIVATIONS[activation](h)
    if kernels.runs_triton(kernel, h.device):
        return kernels.module("glu").gated_activation(h, activation)
    gate, up = h.split(h.shape[-1] // 2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def glu_kernel(cfg: ModelConfig) -> str:
    """The gated activation's kernel choice; the fused kernel has SwiGLU and GeGLU (tanh) only."""
    return kernels.selected(cfg, "glu") if cfg.activation in ("silu", "gelu_tanh") else "torch"

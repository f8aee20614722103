"""LayerNorm and RMSNorm (including Gemma's ``(1 + weight)`` form); with ``kernel`` Triton's fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ironcore import kernels
from ironcore.config.model import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 like the reference implementations.

    With ``unit_offset`` the scale is ``1 + w`` and ``w`` starts at zero
    (Gemma), so weight decay pulls the scale towards one rather than zero.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False, kernel: str = "torch") -> None:
        super().__init__()
        self.eps, self.unit_offset, self.kernel = eps, unit_offset, kernel
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.runs_triton(self.kernel, x.device):
            return kernels.module("norm").rms_norm(x, self.weight, self.eps, self.unit_offset)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters), or Triton's fused kernel with ``kernel``."""

    def __init__(self, dim: int, eps: float = 1e-5, kernel: str = "torch") -> None:
        super().__init__(dim, eps=eps)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.runs_triton(self.kernel, x.device):
            return kernels.module("norm").layer_norm(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm the config asks for, over ``dim`` features (default: hidden_size)."""
    dim = dim or cfg.hidden_size
    kernel = kernels.selected(cfg, "norm")
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset, kernel)
    return LayerNorm(dim, cfg.norm_eps, kernel)

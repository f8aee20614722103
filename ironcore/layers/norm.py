"""LayerNorm and RMSNorm (including Gemma's ``(1 + weight)`` form)."""

from __future__ import annotations

import torch
from torch import nn

from ironcore.config.model import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 like the reference implementations.

    With ``unit_offset`` the scale is ``1 + w`` and ``w`` starts at zero
    (Gemma), so weight decay pulls the scale towards one rather than zero.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def build_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm the config asks for, over ``dim`` features (default: hidden_size)."""
    dim = dim or cfg.hidden_size
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)

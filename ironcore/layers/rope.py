"""Rotary position embeddings (RoPE): full or partial rotation; Llama-3, linear and LongRoPE scaling.

We use the "rotate half" layout of GPT-NeoX and HF Transformers (the first
and second halves of the rotated dimensions form the pairs), so imported HF
weights need no permutation.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ironcore.config.model import ModelConfig, RopeScaling


def inverse_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None, long: bool = False) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, adjusted as ``scaling`` says (LongRoPE: its ``long`` factors or short ones)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if scaling is not None and scaling.type == "longrope":
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        return 1.0 / (factors * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def longrope_attention_factor(cfg: ModelConfig, scaling: RopeScaling) -> float:
    """LongRoPE's scale of cos and sin, sqrt(1 + ln(s) / ln(original context)) for s = context / original context."""
    factor = cfg.max_position_embeddings / scaling.original_max_position_embeddings
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(scaling.original_max_position_embeddings))


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [B, 1, T, rotary_dim] for the given positions.

    ``theta`` and ``scaling`` default to the config's; Gemma 3's sliding-window
    layers have a second, unscaled embedding with ``rope_local_theta``.
    LongRoPE switches to its long factors for the whole call once a position
    passes the original context, as HF's does.
    """

    def __init__(self, cfg: ModelConfig, theta: float | None = None, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.rotary_dim = cfg.rotary_dim
        self.theta, self.scaling = theta or cfg.rope_theta, scaling
        longrope = scaling is not None and scaling.type == "longrope"
        self.attention_factor = longrope_attention_factor(cfg, scaling) if longrope else 1.0
        self.switch_at = scaling.original_max_position_embeddings if longrope else None
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. when weights were loaded onto a meta-built model."""
        device = torch.device(device or self.inv_freq.device)
        # A meta-built model's frequencies are computed on the CPU and then made meta: arithmetic on the meta
        # device imports torch._dynamo, a second at the start of every command that loads a RoPE model.
        with torch.device("cpu") if device.type == "meta" else contextlib.nullcontext():
            self.inv_freq = inverse_frequencies(self.rotary_dim, self.theta, self.scaling).to(device)
            # Without LongRoPE an empty placeholder, but on ``device`` too: a meta one left behind makes the
            # loaded model's ``.to(device)`` fail (a meta tensor has no data to copy, however small).
            self.long_inv_freq = (torch.empty(0) if self.switch_at is None else inverse_frequencies(
                self.rotary_dim, self.theta, self.scaling, long=True)).to(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.switch_at is not None:  # on the device, no host sync (a CUDA graph may capture it)
            inv_freq = torch.where(position_ids.max() >= self.switch_at, self.long_inv_freq, inv_freq)
        freqs = position_ids.unsqueeze(-1).float() * inv_freq  # [B, T, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, T, rot]
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of each head of x [B, H, T, D]; pass the rest through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return (x * cos + _rotate_half(x) * sin).type_as(x)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat(((x_rot * cos + _rotate_half(x_rot) * sin).type_as(x), x_pass), dim=-1)

"""The one decoder-only TransformerModel; GPT-2, LLaMA, Gemma, Qwen, Phi and Mistral are configs of it."""

from __future__ import annotations

import torch
from torch import nn

from ironcore.config.model import ModelConfig
from ironcore.layers.attention import Attention
from ironcore.layers.mlp import MLP
from ironcore.layers.norm import RMSNorm, build_norm
from ironcore.layers.rope import RotaryEmbedding
from ironcore.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    mask_vocab_padding,
    residual_std,
)
from ironcore.parallel.mappings import copy_to_tp, gather_from_tp


class TransformerBlock(nn.Module):
    """Attention and MLP with residuals, wired pre-norm, post-norm or in parallel (Phi)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_position, self.parallel = cfg.norm_position, cfg.parallel_attn_mlp
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = None if self.parallel else build_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.parallel:
            h = self.attn_norm(x)
            return x + self.drop(self.attn(h, rope, mask)) + self.drop(self.mlp(h))
        if self.norm_position == "post":
            x = self.attn_norm(x + self.drop(self.attn(x, rope, mask)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class TransformerModel(nn.Module):
    """token ids [B, T] -> logits [B, T, V].

    Built under tensor parallelism, every layer holds its shard and the
    forward pass is unchanged; ``parallel_output=True`` keeps the logits
    vocab-sharded for the vocab-parallel loss instead of gathering them.
    The embedding and output projection hold a vocabulary padded to a
    multiple of 128 x tp; the padding never leaves the model: gathered logits
    have exactly ``vocab_size`` columns, sharded ones show it as -inf.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg.validate()
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position_embedding == "learned" else None
        )
        self.rope = RotaryEmbedding(cfg) if cfg.position_embedding == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = build_norm(cfg) if cfg.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias, pad_vocab=True)
        )
        self._mask_cache: tuple[int, torch.device, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2/Megatron init from the global RNG, in a fixed order, whatever the TP layout."""
        cfg = self.config
        std, out_std = cfg.init_std, residual_std(cfg.init_std, cfg.num_layers)
        self.embed.reset_parameters(std)
        if self.pos_embed is not None and not self.pos_embed.weight.is_meta:
            nn.init.normal_(self.pos_embed.weight, 0.0, std)
        if self.rope is not None:
            self.rope.reset_parameters()
        for block in self.layers:
            block.attn.qkv.reset_parameters(std)
            block.attn.out.reset_parameters(out_std)
            block.mlp.up.reset_parameters(std)
            block.mlp.down.reset_parameters(out_std)
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        if self.lm_head is not None:
            self.lm_head.reset_parameters(std)

    def _mask(self, T: int, device: torch.device, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """None (plain causal, the fast path) or a bool mask [.., T, T] with True where attention is allowed."""
        window = self.config.sliding_window
        if attention_mask is None and (window is None or window >= T):
            return None
        if self._mask_cache is None or self._mask_cache[:2] != (T, device):
            i = torch.arange(T, device=device)
            allowed = i[None, :] <= i[:, None]
            if window is not None:
                allowed &= i[None, :] > i[:, None] - window
            self._mask_cache = (T, device, allowed)  # one entry: the length rarely changes within a run
        mask = self._mask_cache[2]
        return mask if attention_mask is None else mask & attention_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        parallel_output: bool = False,
    ) -> torch.Tensor:
        """Logits for every position.

        ``position_ids`` [B, T] restart per document when sequences are packed;
        ``attention_mask`` bool [B, 1, T, T] further restricts the causal
        (and sliding-window) mask, e.g. to keep packed documents apart.
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
        x = self.embed(input_ids)
        if self.config.embedding_multiplier is not None:
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        rope = self.rope(position_ids) if self.rope is not None else None
        mask = self._mask(T, input_ids.device, attention_mask)
        for block in self.layers:
            x = block(x, rope, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            logits = torch.nn.functional.linear(copy_to_tp(x), self.embed.weight)
        if parallel_output:
            return mask_vocab_padding(logits, self.config.vocab_size)
        return gather_from_tp(logits)[..., : self.config.vocab_size]

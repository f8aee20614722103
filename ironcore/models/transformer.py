"""The one decoder-only TransformerModel; GPT-2, LLaMA, Gemma, Qwen, Phi and Mistral are configs of it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ironcore.config.base import validated
from ironcore.config.model import ModelConfig
from ironcore.layers.attention import Attention, KVCache, LayerKVCache
from ironcore.layers.mlp import MLP
from ironcore.layers.norm import RMSNorm, build_norm
from ironcore.layers.rope import RotaryEmbedding
from ironcore.parallel import state
from ironcore.parallel.grad import mark_sequence_parallel_grads
from ironcore.parallel.layers import VocabParallelEmbedding, VocabParallelOutput, residual_std
from ironcore.parallel.mappings import gather_from_sequence, gather_from_tp, scatter_to_sequence


class TransformerBlock(nn.Module):
    """Attention and MLP with residuals, wired pre-norm, post-norm or in parallel (Phi)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_position, self.parallel = cfg.norm_position, cfg.parallel_attn_mlp
        self.attn_norm = mark_sequence_parallel_grads(build_norm(cfg))
        self.attn = Attention(cfg)
        self.mlp_norm = None if self.parallel else mark_sequence_parallel_grads(build_norm(cfg))
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        if self.parallel:
            h = self.attn_norm(x)
            return x + self.drop(self.attn(h, rope, mask, kv_cache)) + self.drop(self.mlp(h))
        if self.norm_position == "post":
            x = self.attn_norm(x + self.drop(self.attn(x, rope, mask, kv_cache)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, kv_cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class TransformerModel(nn.Module):
    """token ids [B, T] -> logits [B, T, V] (a reward model, ``score_head``: scores [B, T, 1]).

    Built under tensor parallelism, every layer holds its shard and the
    forward pass is unchanged; ``parallel_output=True`` keeps the logits
    vocab-sharded for the vocab-parallel loss instead of gathering them.
    The embedding and output projection hold a vocabulary padded to a
    multiple of 128 x tp; the padding never leaves the model: gathered logits
    have exactly ``vocab_size`` columns, sharded ones show it as -inf.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = validated(cfg, "model")
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position_embedding == "learned" else None
        )
        self.rope = RotaryEmbedding(cfg) if cfg.position_embedding == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = mark_sequence_parallel_grads(build_norm(cfg)) if cfg.final_norm else None
        self.lm_head = (
            None if cfg.tie_word_embeddings or cfg.score_head
            else VocabParallelOutput(cfg.hidden_size, cfg.vocab_size, cfg.lm_head_bias)
        )
        # A reward model's scalar head: small, so every TP rank holds all of it (replicated, like the norms).
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.score_head else None
        self._mask_cache: tuple[int, int, torch.device, torch.Tensor] | None = None
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
        if self.score is not None and not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, 0.0, std)

    def _mask(
        self, T: int, device: torch.device, attention_mask: torch.Tensor | None, past: int = 0
    ) -> torch.Tensor | None:
        """Bool mask [.., T, past + T], True where T queries after ``past`` cached positions may attend.

        None on the fast paths that attention handles without a mask: plain
        causal (nothing cached) and a single query that may see every key.
        """
        window = self.config.sliding_window
        windowed = window is not None and window < past + T
        if T == 1 and not windowed:
            return attention_mask  # a decode step: the causal part allows every key
        if attention_mask is None and past == 0 and not windowed:
            return None
        if self._mask_cache is None or self._mask_cache[:3] != (T, past, device):
            query = torch.arange(past, past + T, device=device)[:, None]
            key = torch.arange(past + T, device=device)
            allowed = key <= query
            if window is not None:
                allowed &= key > query - window
            self._mask_cache = (T, past, device, allowed)  # one entry: the length rarely changes within a run
        mask = self._mask_cache[3]
        return mask if attention_mask is None else mask & attention_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        parallel_output: bool = False,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits for every position (for the last ``logits_to_keep`` ones when that is not 0).

        ``position_ids`` [B, T] restart per document when sequences are packed;
        ``attention_mask`` bool [B, 1, T, T] further restricts the causal
        (and sliding-window) mask, e.g. to keep packed documents apart.

        With ``kv_cache`` (generation) the tokens continue the ``kv_cache.length``
        positions stored there, their keys and values are added to it, and
        ``attention_mask`` spans all keys: [B, 1, T or 1, kv_cache.length + T]
        (e.g. False on left padding); positions default to continuing the cache.
        A static cache (``kv_cache.slot``) takes the caller's mask over all its slots as it is.
        Generation keeps the logits of the last position only: the output
        projection of a whole prompt would cost more than its last layer.
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        past = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        x = self.embed(input_ids)
        if self.config.embedding_multiplier is not None:
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        rope = self.rope(position_ids) if self.rope is not None else None
        static = kv_cache is not None and kv_cache.slot is not None and T == 1 and past > 0  # a static decode step
        mask = attention_mask if static else self._mask(T, input_ids.device, attention_mask, past)
        caches = [None] * len(self.layers) if kv_cache is None else kv_cache.layers
        generating = kv_cache is not None and state.sequence_parallel()  # one position at a time: no SP
        with state.sequence_parallel_paused() if generating else contextlib.nullcontext():
            x = self.drop(scatter_to_sequence(x))  # sequence parallel: this rank's positions from here on
            for block, cache in zip(self.layers, caches):
                x = block(x, rope, mask, cache)
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            if self.final_norm is not None:
                x = self.final_norm(x)
            if self.score is not None:
                return self.score(gather_from_sequence(x))  # [B, T, 1]: reward models read the last token's
            logits = self.embed.project(x) if self.lm_head is None else self.lm_head(x)
        if parallel_output:
            return logits
        return gather_from_tp(logits)[..., : self.config.vocab_size]

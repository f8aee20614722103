"""The one decoder-only TransformerModel; GPT-2, LLaMA, Gemma, Qwen, Phi, Mistral, OLMo, SmolLM and the
mixture-of-experts families are configs of it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ironcore import kernels
from ironcore.config.base import validated
from ironcore.config.model import ModelConfig
from ironcore.kernels.cross_entropy import linear_cross_entropy
from ironcore.layers.attention import Attention, KVCache, LayerKVCache
from ironcore.layers.mlp import MLP
from ironcore.layers.moe import MoE, attach_loss
from ironcore.layers.norm import RMSNorm, build_norm
from ironcore.layers.rope import RotaryEmbedding
from ironcore.models.lora import add_adapters, reset_adapters
from ironcore.parallel import state
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.grad import mark_sequence_parallel_grads
from ironcore.parallel.layers import VocabParallelEmbedding, VocabParallelOutput, residual_std
from ironcore.parallel.mappings import gather_from_sequence, gather_from_tp, scatter_to_sequence


class TransformerBlock(nn.Module):
    """Attention and MLP with residuals, the norms placed as ``norm_position`` says, or in parallel (Phi).

    Layer ``layer``'s own variant of the config: its sliding window (None:
    global), whether it rotates queries and keys, a dense or MoE MLP.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm_position, self.parallel = cfg.norm_position, cfg.parallel_attn_mlp
        self.window, self.uses_rope = cfg.layer_window(layer), cfg.layer_has_rope(layer)
        inputs = self.norm_position != "output"  # OLMo 2 normalises the branch outputs only
        outputs = self.norm_position in ("sandwich", "output")
        self.attn_norm = mark_sequence_parallel_grads(build_norm(cfg)) if inputs else None
        self.attn = Attention(cfg)
        self.attn_out_norm = mark_sequence_parallel_grads(build_norm(cfg)) if outputs else None
        self.mlp_norm = mark_sequence_parallel_grads(build_norm(cfg)) if inputs and not self.parallel else None
        self.mlp = MLP(cfg) if cfg.num_experts is None else MoE(cfg)
        self.mlp_out_norm = mark_sequence_parallel_grads(build_norm(cfg)) if outputs else None
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
        x = x + self.drop(_maybe(self.attn_out_norm, self.attn(_maybe(self.attn_norm, x), rope, mask, kv_cache)))
        return x + self.drop(_maybe(self.mlp_out_norm, self.mlp(_maybe(self.mlp_norm, x))))


def _maybe(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


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
        # On the meta device (a model built to load weights into) nn.Embedding's own init is skipped: there it
        # imports torch._dynamo, a second at the start of every command that reads a checkpoint. Elsewhere it
        # runs, as before, so a seed draws the same weights (reset_parameters draws them again in a fixed order).
        positions = (cfg.max_position_embeddings, cfg.hidden_size)
        uninitialised = torch.empty(positions) if torch.get_default_device().type == "meta" else None
        learned = cfg.position_embedding == "learned"
        self.pos_embed = nn.Embedding(*positions, _weight=uninitialised) if learned else None
        rope = cfg.position_embedding == "rope"
        self.rope = RotaryEmbedding(cfg, scaling=cfg.rope_scaling) if rope else None
        # Gemma 3: the sliding-window layers rotate with their own, unscaled base.
        self.local_rope = RotaryEmbedding(cfg, cfg.rope_local_theta) if rope and cfg.rope_local_theta else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = mark_sequence_parallel_grads(build_norm(cfg)) if cfg.final_norm else None
        self.lm_head = (
            None if cfg.tie_word_embeddings or cfg.score_head
            else VocabParallelOutput(cfg.hidden_size, cfg.vocab_size, cfg.lm_head_bias)
        )
        # A reward model's scalar head: small, so every TP rank holds all of it (replicated, like the norms).
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.score_head else None
        self._mask_cache: dict[tuple[int, int, torch.device, int | None], torch.Tensor] = {}
        # Mixture of experts: the weight of the auxiliary losses in the backward pass (the MoE step hook,
        # training/router_log.py, sets it to 1 / (micro-batches x DP size), each pass's share of the global
        # batch, since the DP reduction sums the ranks' gradients; under TP each rank adds 1/tp of it,
        # _moe_losses), and their values of the last forward pass, for logging.
        self.aux_loss_scale = 1.0
        self.aux_losses: dict[str, torch.Tensor] = {}
        if cfg.lora is not None:  # low-rank adapters on the targeted layers, everything else frozen
            add_adapters(self, cfg.lora)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2/Megatron init from the global RNG, in a fixed order, whatever the TP layout."""
        cfg = self.config
        std, out_std = cfg.init_std, residual_std(cfg.init_std, cfg.num_layers)
        self.embed.reset_parameters(std)
        if self.pos_embed is not None and not self.pos_embed.weight.is_meta:
            nn.init.normal_(self.pos_embed.weight, 0.0, std)
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.reset_parameters()
        for block in self.layers:
            block.attn.qkv.reset_parameters(std)
            block.attn.out.reset_parameters(out_std)
            if isinstance(block.mlp, MoE):
                block.mlp.reset_parameters(std, out_std)
            else:
                block.mlp.up.reset_parameters(std)
                block.mlp.down.reset_parameters(out_std)
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        if self.lm_head is not None:
            self.lm_head.reset_parameters(std)
        if self.score is not None and not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, 0.0, std)
        reset_adapters(self)  # last: the base draws the same numbers with or without adapters

    def _mask(
        self, T: int, device: torch.device, attention_mask: torch.Tensor | None, past: int, window: int | None
    ) -> torch.Tensor | None:
        """Bool mask [.., T, past + T], True where T queries after ``past`` cached positions may attend.

        None on the fast paths that attention handles without a mask: plain
        causal (nothing cached) and a single query that may see every key.
        """
        windowed = window is not None and window < past + T
        if T == 1 and not windowed:
            return attention_mask  # a decode step: the causal part allows every key
        if attention_mask is None and past == 0 and not windowed:
            return None
        key = (T, past, device, window)
        if key not in self._mask_cache:
            if any(k[:3] != key[:3] for k in self._mask_cache):
                self._mask_cache.clear()  # one length at a time: it rarely changes within a run
            query = torch.arange(past, past + T, device=device)[:, None]
            keys = torch.arange(past + T, device=device)
            allowed = keys <= query
            if window is not None:
                allowed &= keys > query - window
            self._mask_cache[key] = allowed
        mask = self._mask_cache[key]
        return mask if attention_mask is None else mask & attention_mask

    @staticmethod
    def _static_mask(mask: torch.Tensor, slot: torch.Tensor, window: int | None) -> torch.Tensor:
        """A static decode step's mask over every cache slot, narrowed to the ``window`` slots up to ``slot``."""
        if window is None:
            return mask
        return mask & (torch.arange(mask.shape[-1], device=mask.device) > slot - window)

    def _moe_losses(self, x: torch.Tensor) -> torch.Tensor:
        """x, carrying the load-balancing and z-losses of this pass's routing into the backward pass.

        HF's formula (Switch Transformer's): the assignment counts and router
        probabilities of *all* layers are summed, then E x sum_e f_e P_e with
        f and P their means over layers x tokens.
        """
        cfg = self.config
        stats = [block.mlp.stats for block in self.layers if isinstance(block.mlp, MoE)]
        rows = sum(s.tokens for s in stats)
        fraction = sum(s.counts for s in stats).float() / rows
        probability = sum(s.prob_sums for s in stats) / rows
        aux = cfg.num_experts * (fraction * probability).sum()
        z = sum(s.z_sum for s in stats) / rows
        self.aux_losses = {"aux_loss": aux.detach(), "z_loss": z.detach(),
                           "expert_load": torch.stack([s.counts for s in stats])}  # fmt: skip
        if not torch.is_grad_enabled():
            return x
        loss = cfg.moe_aux_loss_coef * aux + cfg.moe_z_loss_coef * z
        # Every TP rank computes the same loss, and sums the router's gradients over the ranks: 1/tp each.
        return attach_loss(x, loss, self.aux_loss_scale / state.tp_size())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's vocab-parallel logits of the final hidden states (Gemma 2: soft-capped, padding still -inf)."""
        logits = self.embed.project(x) if self.lm_head is None else self.lm_head(x)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = torch.where(logits.isneginf(), logits, cap * torch.tanh(logits / cap))
        return logits

    def _loss(self, x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The weighted cross-entropy of the final hidden states ``x`` (see :meth:`forward`)."""
        cfg = self.config
        weights = torch.ones(labels.shape, device=labels.device) if weights is None else weights
        backend = kernels.choice(cfg, "cross_entropy", x.device)
        if backend == "torch":
            return (vocab_parallel_cross_entropy(self._logits(x), labels) * weights).sum()
        head = self.embed if self.lm_head is None else self.lm_head
        return linear_cross_entropy(x, head.weight, getattr(head, "bias", None), labels, weights, cfg.vocab_size,
                                    backend, cfg.kernel_options.chunk_tokens)  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        parallel_output: bool = False,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position (for the last ``logits_to_keep`` ones when that is not 0).

        With ``labels`` [B, T] (and ``loss_weights`` [B, T]) the language-model
        loss ``sum(loss_weights * cross-entropy)`` instead, a scalar, computed
        as ``model.kernel_options.cross_entropy`` says: from the logits
        (torch), or fused with the output projection in chunks of tokens so
        that the logits never exist whole (chunked, triton).

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
        local_rope = self.local_rope(position_ids) if self.local_rope is not None else rope
        # A static decode step: one position written at the cache's slot, the caller's mask over every slot.
        static = kv_cache is not None and kv_cache.slot is not None and T == 1 and kv_cache.layers[0].keys is not None
        masks = {
            window: self._static_mask(attention_mask, kv_cache.slot, window) if static
            else self._mask(T, input_ids.device, attention_mask, past, window)
            for window in {block.window for block in self.layers}
        }  # fmt: skip
        caches = [None] * len(self.layers) if kv_cache is None else kv_cache.layers
        generating = kv_cache is not None and state.sequence_parallel()  # one position at a time: no SP
        with state.sequence_parallel_paused() if generating else contextlib.nullcontext():
            x = self.drop(scatter_to_sequence(x))  # sequence parallel: this rank's positions from here on
            for block, cache in zip(self.layers, caches):
                block_rope = None if not block.uses_rope else local_rope if block.window is not None else rope
                x = block(x, block_rope, masks[block.window], cache)
            if self.config.num_experts is not None:
                x = self._moe_losses(x)
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            if self.final_norm is not None:
                x = self.final_norm(x)
            if self.score is not None:
                return self.score(gather_from_sequence(x))  # [B, T, 1]: reward models read the last token's
            if labels is not None:
                return self._loss(x, labels, loss_weights)
            logits = self._logits(x)
        if parallel_output:
            return logits
        return gather_from_tp(logits)[..., : self.config.vocab_size]

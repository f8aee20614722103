"""Parameter counts and FLOPs per token, computed on the meta device (no memory, instant for 70B)."""

from __future__ import annotations

import dataclasses

import torch

from ironcore.config.model import ModelConfig
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_shapes


@dataclasses.dataclass
class ModelStats:
    params: int  # unique parameters (tied weights once)
    active_params: int  # parameters one token uses (mixture of experts: its top-k experts' only)
    embedding_params: int  # token + position embedding tables
    matmul_params: int  # weights that multiply activations, incl. the output projection
    attention_flops_per_token: int  # forward QK^T and AV at the given sequence length
    forward_flops_per_token: int
    train_flops_per_token: int  # forward + backward = 3 x forward


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> ModelStats:
    """Sizes and FLOPs per token, the PaLM / nanoGPT convention.

    Forward FLOPs per token = 2 x (weights used in matmuls, output projection
    included) + attention 2 x 2 x layers x heads x head_dim x seq_len (scores and
    weighted sum over the full sequence, as PaLM counts it). Training = 3 x forward.
    A mixture of experts counts the router and the top-k experts a token uses.
    """
    seq_len = seq_len or cfg.max_position_embeddings
    with torch.device("meta"):
        model = TransformerModel(cfg)
    shapes = full_shapes(model)  # the model's own sizes, without the vocabulary padding parallelism adds
    params = sum(s.numel() for s in shapes.values())
    embedding = sum(s.numel() for name, s in shapes.items() if name in ("embed.weight", "pos_embed.weight"))
    matmul = sum(s.numel() for name, s in shapes.items() if name.endswith(("qkv.weight", "out.weight", "up.weight",
                                                                        "down.weight")))
    matmul += (1 if cfg.score_head else cfg.vocab_size) * cfg.hidden_size  # the output projection, tied or not
    experts = sum(s.numel() for name, s in shapes.items() if name.endswith(("mlp.up", "mlp.down")))
    unused = experts - experts * cfg.num_experts_per_token // cfg.num_experts if cfg.num_experts else 0
    matmul += experts - unused + sum(s.numel() for name, s in shapes.items() if name.endswith("router.weight"))
    attention = 4 * cfg.num_layers * cfg.num_attention_heads * cfg.head_size * seq_len
    forward = 2 * matmul + attention
    return ModelStats(params, params - unused, embedding, matmul, attention, forward, 3 * forward)

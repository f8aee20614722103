"""The model architecture as data: one dataclass describes GPT-2, LLaMA, Gemma, Qwen, Phi and Mistral."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ironcore.config.base import InvalidValue, field


@dataclasses.dataclass
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: llama3`` in HF)."""

    factor: float = field(8.0, help="How much longer than the original context the model runs.")
    low_freq_factor: float = field(1.0, help="Wavelengths above original_max/low_freq_factor are scaled fully.")
    high_freq_factor: float = field(4.0, help="Wavelengths below original_max/high_freq_factor are kept.")
    original_max_position_embeddings: int = field(8192, help="Context length the base model was trained at.")


@dataclasses.dataclass
class ModelConfig:
    """Everything that decides the network's shape and its forward pass."""

    name: str = field("custom", help="Human-readable model name (logged and tagged).")
    vocab_size: int = field(50257, help="Tokenizer vocabulary size (the embedding may be padded above it).")
    hidden_size: int = field(768, help="Width of the residual stream.")
    num_layers: int = field(12, help="Number of transformer blocks.")
    num_attention_heads: int = field(12, help="Query heads per attention layer.")
    num_key_value_heads: int | None = field(
        None, help="Key/value heads: = heads for MHA, 1 for MQA, in between for GQA (null: = heads)."
    )
    head_dim: int | None = field(None, help="Per-head width (null: hidden_size / num_attention_heads).")
    ffn_hidden_size: int | None = field(None, help="MLP inner width (null: 4 * hidden_size).")
    max_position_embeddings: int = field(1024, help="Longest sequence the model supports.")

    norm_type: Literal["layernorm", "rmsnorm"] = field("layernorm", help="Normalisation layer.")
    norm_eps: float = field(1e-5, help="Epsilon inside the norm.")
    norm_unit_offset: bool = field(False, help="RMSNorm scales by (1 + weight) as in Gemma; weights start at 0.")
    norm_position: Literal["pre", "post"] = field(
        "pre", help="pre: x + f(norm(x)) (GPT-2 onwards); post: norm(x + f(x)) (original Transformer)."
    )
    final_norm: bool = field(True, help="Apply a norm after the last block (usual for pre-norm).")
    qk_norm: bool = field(False, help="RMSNorm over each query and key head before RoPE (Qwen3).")

    position_embedding: Literal["learned", "rope", "none"] = field(
        "learned", help="learned absolute positions (GPT-2) or rotary embeddings (LLaMA and later)."
    )
    rope_theta: float = field(10000.0, help="RoPE base frequency.")
    rotary_percent: float = field(1.0, help="Share of each head's dimensions that rotate (Phi: 0.5).")
    rope_scaling: RopeScaling | None = field(None, help="Llama-3 style RoPE scaling (null: none).")

    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = field("gelu_tanh", help="MLP non-linearity.")
    gated_mlp: bool = field(False, help="Gated MLP: act(gate(x)) * up(x) (SwiGLU with silu, GeGLU with gelu).")
    parallel_attn_mlp: bool = field(
        False, help="x + attn(norm(x)) + mlp(norm(x)) with one shared norm (Phi, GPT-J)."
    )
    attention_bias: bool = field(False, help="Bias on the query/key/value projections (GPT-2, Qwen2, Phi).")
    attention_out_bias: bool = field(False, help="Bias on the attention output projection (GPT-2, Phi).")
    mlp_bias: bool = field(False, help="Biases in the MLP projections (GPT-2, Phi).")
    lm_head_bias: bool = field(False, help="Bias on the output projection (Phi).")
    sliding_window: int | None = field(
        None, help="Each token attends to itself and the previous window-1 tokens (Mistral); null: full causal."
    )

    tie_word_embeddings: bool = field(True, help="Output projection shares the input embedding matrix.")
    score_head: bool = field(
        False, help="A reward model: a scalar head (hidden -> 1, HF's ForSequenceClassification 'score') replaces "
        "the output projection, and the forward pass gives one score per position [B, T, 1].",
    )
    embedding_multiplier: float | None = field(
        None, help="Scale token embeddings by this (Gemma: sqrt(hidden_size)); null: no scaling."
    )
    init_std: float = field(0.02, help="Std of the normal initialisation (output projections get /sqrt(2L)).")
    dropout: float = field(0.0, help="Dropout on attention probabilities and residual branches.")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_percent)

    def validate(self) -> None:
        """Raise InvalidValue naming the first field whose size does not fit the others."""

        def fail(key: str, why: str) -> None:
            raise InvalidValue(key, why)

        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail(
                "num_attention_heads",
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads "
                "(set head_dim explicitly if that is intended)",
            )
        if self.kv_heads <= 0 or self.num_attention_heads % self.kv_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_attention_heads} query heads are not divisible into {self.kv_heads} key/value groups",
            )
        if self.position_embedding == "rope":
            if not 0 < self.rotary_percent <= 1:
                fail("rotary_percent", f"must be in (0, 1], got {self.rotary_percent}")
            if self.rotary_dim % 2:
                fail("rotary_percent", f"rotary dimension {self.rotary_dim} of head_dim {self.head_size} must be even")
        if self.sliding_window is not None and self.sliding_window <= 0:
            fail("sliding_window", f"must be positive or null, got {self.sliding_window}")
        if self.norm_unit_offset and self.norm_type != "rmsnorm":
            fail("norm_unit_offset", "the (1 + weight) form is only defined for rmsnorm")
        if self.parallel_attn_mlp and self.norm_position != "pre":
            fail("parallel_attn_mlp", "parallel attention + MLP blocks need norm_position: pre")
        if self.lm_head_bias and self.tie_word_embeddings:
            fail("lm_head_bias", "an output bias needs an untied output projection (tie_word_embeddings: false)")
        if not 0 <= self.dropout < 1:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")

"""The model architecture as data: one dataclass describes GPT-2, LLaMA, Gemma, Qwen, Phi, Mistral, OLMo,
SmolLM and the mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal

from ironcore.config.base import InvalidValue, field, validated
from ironcore.errors import ConfigError


@dataclasses.dataclass
class RopeScaling:
    """RoPE scaling for contexts longer than pre-training's: HF's ``rope_type`` llama3, linear or longrope."""

    type: Literal["llama3", "linear", "longrope"] = field(
        "llama3", help="llama3: per-wavelength (Llama 3.1); linear: positions / factor (Gemma 3's global layers); "
        "longrope: per-dimension factors, long ones past the original context (Phi-3, Phi-4-mini).",
    )
    factor: float = field(8.0, help="How much longer than the original context the model runs (llama3, linear).")
    low_freq_factor: float = field(1.0, help="llama3: wavelengths above original_max/low_freq_factor scale fully.")
    high_freq_factor: float = field(4.0, help="llama3: wavelengths below original_max/high_freq_factor are kept.")
    original_max_position_embeddings: int = field(8192, help="Context length the base model was trained at.")
    short_factor: list[float] | None = field(
        None, help="longrope: one divisor per rotary frequency, used up to original_max_position_embeddings."
    )
    long_factor: list[float] | None = field(
        None, help="longrope: the divisors used once a position passes original_max_position_embeddings."
    )


@dataclasses.dataclass
class KernelOptions:
    """Per-kernel choices over ``model.kernels`` (null: follow it); see ``ironcore/kernels``."""

    norm: Literal["torch", "triton"] | None = field(None, help="RMSNorm and LayerNorm.")
    rope: Literal["torch", "triton"] | None = field(None, help="RoPE on queries and keys (Triton: in place).")
    glu: Literal["torch", "triton"] | None = field(None, help="The gated activation of SwiGLU / GeGLU MLPs.")
    cross_entropy: Literal["torch", "chunked", "triton"] | None = field(
        None, help="The language-model loss: torch computes all logits, then the loss; chunked (pure PyTorch, any "
        "device) and triton compute output projection and loss for chunks of tokens, so the [tokens x vocabulary] "
        "logits never exist at once.",
    )
    chunk_tokens: int | None = field(
        None, help="Tokens per chunk of the fused loss (null: chunk x vocabulary ~ tokens x hidden, Liger's rule)."
    )


# The projections LoRA can adapt, by the names every family shares (ironcore/models/lora.py maps them onto the
# fused layers), and PEFT's target_modules names for them.
LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
PEFT_TARGETS = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
    "up_proj": ("up",), "down_proj": ("down",), "qkv_proj": ("qkv",), "gate_up_proj": ("gate_up",),
    "c_attn": ("qkv",), "c_proj": ("o", "down"), "c_fc": ("up",), "dense": ("o",), "fc1": ("up",), "fc2": ("down",),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on the linear layers, the base weights frozen (PEFT's LoRA; docs/lora.md)."""

    rank: int = field(8, help="r: the adapters' inner dimension.")
    alpha: float = field(16.0, help="The update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora).")
    dropout: float = field(0.0, help="Dropout on the adapters' input (PEFT's lora_dropout).")
    targets: list[str] = field(
        ["q", "k", "v", "o", "gate", "up", "down"],
        help="Projections to adapt: q k v o gate up down (each its own adapter), qkv and gate_up (one adapter over "
        "the fused projection, as PEFT on GPT-2's c_attn or Phi-3's qkv_proj), or PEFT's target_modules names "
        "(q_proj, ..., all-linear).",
    )
    use_rslora: bool = field(False, help="Rank-stabilised scaling alpha / sqrt(rank) (PEFT's use_rslora).")
    modules_to_save: list[str] = field(
        [], help="Base modules trained in full beside the adapters: embed, lm_head, norm, score (a reward model's "
        "score head is always trained); PEFT's embed_tokens is embed.",
    )
    quantize_base: Literal["nf4"] | None = field(
        None, help="QLoRA: the frozen base's linear weights stored in 4-bit NF4 with double quantisation (torchao)."
    )

    def projections(self) -> list[str]:
        """``targets`` as our projection names (PEFT's names translated), in a fixed order, without repeats."""
        names = {n for target in self.targets for n in PEFT_TARGETS.get(target, (target,))}
        return [n for n in LORA_TARGETS if n in names]

    def validate(self) -> None:
        if self.rank <= 0:
            raise InvalidValue("rank", f"must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InvalidValue("dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS and t not in PEFT_TARGETS]
        if unknown or not self.targets:
            raise InvalidValue("targets", f"unknown projection {unknown[0]!r} ({', '.join(LORA_TARGETS)}, or PEFT's "
                               "names such as q_proj)" if unknown else "names no projection")
        names = self.projections()
        for fused, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
            if fused in names and set(parts) & set(names):
                raise InvalidValue("targets", f"{fused} is one adapter over {', '.join(parts)}: not both")
        saved = [m for m in self.modules_to_save if m not in ("embed", "embed_tokens", "lm_head", "norm", "score")]
        if saved:
            raise InvalidValue("modules_to_save", f"unknown module {saved[0]!r} (embed, lm_head, norm, score)")


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
    norm_position: Literal["pre", "post", "sandwich", "output"] = field(
        "pre", help="pre: x + f(norm(x)) (GPT-2 onwards); post: norm(x + f(x)) (original Transformer); "
        "sandwich: x + norm(f(norm(x))) (Gemma 2 and 3); output: x + norm(f(x)) (OLMo 2).",
    )
    final_norm: bool = field(True, help="Apply a norm after the last block (usual for pre-norm).")
    qk_norm: bool = field(False, help="RMSNorm over the queries and keys before RoPE (Qwen3, Gemma 3, OLMo 2).")
    qk_norm_per_head: bool = field(
        True, help="true: one norm over each head (Qwen3, Gemma 3); false: over the whole q and k projections "
        "(OLMo 2, OLMoE).",
    )

    position_embedding: Literal["learned", "rope", "none"] = field(
        "learned", help="learned absolute positions (GPT-2) or rotary embeddings (LLaMA and later)."
    )
    rope_theta: float = field(10000.0, help="RoPE base frequency.")
    rotary_percent: float = field(1.0, help="Share of each head's dimensions that rotate (Phi: 0.5).")
    rope_scaling: RopeScaling | None = field(None, help="RoPE scaling (null: none); with rope_local_theta, of the "
                                             "global layers only.")
    rope_local_theta: float | None = field(
        None, help="RoPE base of the sliding-window layers, unscaled (Gemma 3: 10000); null: rope_theta for all."
    )
    no_rope_layer_interval: int | None = field(
        None, help="Every Nth layer (N, 2N, ...) uses no position embedding at all (SmolLM3: 4); null: none."
    )

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
    sliding_window_pattern: int | None = field(
        None, help="Every Nth layer (N, 2N, ...) attends globally, the others through sliding_window "
        "(Gemma 2: 2, Gemma 3: 6); null: sliding_window applies to every layer.",
    )
    query_pre_attn_scalar: int | None = field(
        None, help="Attention scores are scaled by this^-0.5 (Gemma 2 and 3); null: head_dim^-0.5."
    )
    attn_logit_softcap: float | None = field(
        None, help="Attention scores become cap * tanh(score / cap) before the softmax (Gemma 2); null: none."
    )
    final_logit_softcap: float | None = field(
        None, help="Output logits become cap * tanh(logit / cap) (Gemma 2); null: none."
    )

    num_experts: int | None = field(
        None, help="Mixture of experts: each MLP becomes this many experts and a router (null: dense MLP)."
    )
    num_experts_per_token: int = field(2, help="Experts each token is sent to (top-k).")
    moe_ffn_hidden_size: int | None = field(None, help="Inner width of each expert (null: ffn_hidden_size).")
    moe_renormalize: bool = field(
        True, help="Renormalise the top-k routing probabilities to sum to 1 (Mixtral, Qwen3-MoE); false: keep the "
        "softmax's (OLMoE).",
    )
    num_shared_experts: int = field(
        0, help="Experts every token goes through besides its routed ones, as one dense MLP of this many times "
        "moe_ffn_hidden_size (DeepSeek-style); 0: none.",
    )
    moe_capacity_factor: float | None = field(
        None, help="Token dropping: each expert takes at most factor x tokens x top-k / experts assignments, the "
        "rest pass by on the residual; null: no dropping.",
    )
    moe_aux_loss_coef: float = field(
        0.01, help="Weight of the load-balancing loss (HF's router_aux_loss_coef) added to the objective."
    )
    moe_z_loss_coef: float = field(0.0, help="Weight of the router z-loss (ST-MoE) added to the objective.")

    tie_word_embeddings: bool = field(True, help="Output projection shares the input embedding matrix.")
    score_head: bool = field(
        False, help="A reward model: a scalar head (hidden -> 1, HF's ForSequenceClassification 'score') replaces "
        "the output projection, and the forward pass gives one score per position [B, T, 1].",
    )
    embedding_multiplier: float | None = field(
        None, help="Scale token embeddings by this (Gemma: sqrt(hidden_size)); null: no scaling."
    )
    hf_model_type: str | None = field(
        None, help="The HF model_type export writes (set on import where the network alone does not say, e.g. "
        "phi3: LLaMA's network in fused tensors); null: the one HF family whose features the config has.",
    )
    kernels: Literal["auto", "torch", "triton"] = field(
        "auto", help="Fused Triton kernels (norms, RoPE, gated activation, linear + cross-entropy) or the torch "
        "code; auto: Triton on a CUDA device when Triton imports, torch otherwise.",
    )
    kernel_options: KernelOptions = field(KernelOptions(), help="Per-kernel overrides of kernels.")
    init_std: float = field(0.02, help="Std of the normal initialisation (output projections get /sqrt(2L)).")
    dropout: float = field(0.0, help="Dropout on attention probabilities and residual branches.")
    lora: LoRAConfig | None = field(
        None, help="Train low-rank adapters instead of the weights (null: every weight trains); see docs/lora.md."
    )

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
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (0-based), None where it attends globally."""
        if self.sliding_window_pattern is not None and (layer + 1) % self.sliding_window_pattern == 0:
            return None
        return self.sliding_window

    def layer_has_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) rotates its queries and keys."""
        if self.position_embedding != "rope":
            return False
        return self.no_rope_layer_interval is None or (layer + 1) % self.no_rope_layer_interval != 0

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
        for key in ("sliding_window_pattern", "no_rope_layer_interval", "num_experts"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                fail(key, f"must be positive or null, got {getattr(self, key)}")
        if self.sliding_window_pattern is not None and self.sliding_window is None:
            fail("sliding_window_pattern", "alternates sliding-window and global layers: set sliding_window too")
        if self.rope_local_theta is not None and self.sliding_window_pattern is None:
            fail("rope_local_theta", "is the RoPE base of the sliding-window layers: set sliding_window_pattern too")
        for key in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "moe_capacity_factor"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                fail(key, f"must be positive or null, got {getattr(self, key)}")
        if self.num_experts is not None and not 0 < self.num_experts_per_token <= self.num_experts:
            fail("num_experts_per_token", f"must be in [1, num_experts={self.num_experts}], got "
                 f"{self.num_experts_per_token}")
        scaling = self.rope_scaling
        if scaling is not None and scaling.type == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = getattr(scaling, key)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    fail(f"rope_scaling.{key}", f"longrope needs one factor per rotary frequency "
                         f"({self.rotary_dim // 2}), got {None if factors is None else len(factors)}")
        asked = [k for k in ("norm", "rope", "glu", "cross_entropy") if getattr(self.kernel_options, k) == "triton"]
        if (self.kernels == "triton" or asked) and importlib.util.find_spec("triton") is None:
            fail("kernels", "Triton kernels asked for, but triton is not installed (pip install triton)")
        if self.final_logit_softcap is not None and self.kernel_options.cross_entropy in ("chunked", "triton"):
            fail("kernel_options.cross_entropy", "the fused loss takes plain logits: not with final_logit_softcap")
        if self.kernel_options.chunk_tokens is not None and self.kernel_options.chunk_tokens <= 0:
            fail("kernel_options.chunk_tokens", f"must be positive or null, got {self.kernel_options.chunk_tokens}")
        if self.norm_unit_offset and self.norm_type != "rmsnorm":
            fail("norm_unit_offset", "the (1 + weight) form is only defined for rmsnorm")
        if self.parallel_attn_mlp and self.num_experts is not None:
            fail("num_experts", "mixture-of-experts MLPs in parallel attention + MLP blocks are not supported")
        if self.parallel_attn_mlp and self.norm_position != "pre":
            fail("parallel_attn_mlp", "parallel attention + MLP blocks need norm_position: pre")
        if self.lm_head_bias and self.tie_word_embeddings:
            fail("lm_head_bias", "an output bias needs an untied output projection (tie_word_embeddings: false)")
        if not 0 <= self.dropout < 1:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.lora is not None:
            validated(self.lora, "lora")
            mlp = {"gate", "up", "gate_up", "down"} & set(self.lora.projections())
            if mlp and self.num_experts is not None:
                fail("lora.targets", f"{sorted(mlp)[0]}: adapters on the experts' MLPs are not supported (adapt the "
                     "attention: q, k, v, o)")
            if {"gate", "gate_up"} & set(self.lora.projections()) and not self.gated_mlp:
                fail("lora.targets", "gate: this model's MLP has no gate (up and down only)")

    def check_tensor_parallel(self, tp: int, setting: str = "trainer.tensor_model_parallel_size") -> None:
        """A one-line ConfigError naming ``setting`` (the TP size as the user gave it: a config key, ``--tp``)
        when this model cannot be split over ``tp`` ranks: every check that the trainer's model makes, in the
        one place the config loader, the trainer's layout check, the attention layer and the memory planner
        share."""
        if tp < 1:
            raise ConfigError(f"{setting} must be >= 1, got {tp}")
        size = f"{setting} {tp}"
        if self.num_attention_heads % tp:
            raise ConfigError(f"model.num_attention_heads {self.num_attention_heads} is not divisible by {size}")
        if self.kv_heads % tp and tp % self.kv_heads:
            raise ConfigError(f"model.num_key_value_heads {self.kv_heads} must divide or be divisible by {size}")
        if self.ffn_size % tp:
            raise ConfigError(f"model.ffn_hidden_size {self.ffn_size} is not divisible by {size}")
        if self.num_experts is not None and self.expert_ffn_size % tp:
            raise ConfigError(f"model.moe_ffn_hidden_size {self.expert_ffn_size} (an expert's width) is not "
                              f"divisible by {size}")  # fmt: skip
        if self.qk_norm and not self.qk_norm_per_head and tp > 1:  # its statistic would need a sum over the ranks
            raise ConfigError(f"model.qk_norm_per_head: false (a norm over all heads) is not supported under tensor "
                              f"parallelism yet ({size})")  # fmt: skip

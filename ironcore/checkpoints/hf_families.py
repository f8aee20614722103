"""The HF model families IronCore reads and writes, one record each.

A record says everything family-specific about an HF checkpoint folder:

* ``model_type`` and ``architecture`` -- what ``config.json`` calls it;
* ``weights`` -- for every module of ours, the HF module(s) holding the same
  weights and how they combine: ``copy``, ``cat`` (our fused q/k/v and gate/up
  projections, concatenated along the output dimension) or ``conv1d``
  (GPT-2's transposed ``Conv1D``); for our stacked expert weights
  (``layers.{i}.mlp.up``, a parameter, not a module) ``experts``: expert
  ``{j}``'s HF tensors, concatenated, stacked over the experts; loading and
  saving read the same table;
* ``read`` -- ``config.json`` -> the :class:`ModelConfig` fields;
* ``write`` -- :class:`ModelConfig` -> the ``config.json`` keys;
* ``expresses`` -- whether a config is saved as this family (the first
  record in :data:`FAMILIES` that says yes is used, and a round trip through
  ``write`` and ``read`` must give the config back, else export refuses).

Most families are variations of a few layouts (GPT-2's, LLaMA's, Phi's), so
the records share the layout helpers below and state only what differs.
Adding a family is one record plus its parity test in
``tests/test_hf_parity.py`` (see ``docs/adding-a-model-family.md``). Nothing
here imports torch or ``transformers``: the config loader reads HF folders
through these records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ironcore.config.base import from_dict
from ironcore.config.model import ModelConfig, RopeScaling
from ironcore.errors import CheckpointError, ConfigError
from ironcore.files import read_json

WeightTable = dict[str, tuple[list[str], str]]  # our module ("layers.{i}.attn.qkv") -> (HF modules, how)
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}  # HF's layer_types -> windowed

# HF activation names -> ours; and ours -> the name each layout writes.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
               "swish": "silu", "relu": "relu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}
GEMMA_ACTIVATION = {**HF_ACTIVATION, "gelu_tanh": "gelu_pytorch_tanh"}
OPENAI_GPT_ACTIVATION = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}  # GPT-1's "gelu" is the tanh form


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """One HF ``model_type`` (see the module doc)."""

    model_type: str
    architecture: str
    weights: WeightTable
    read: Callable[[Mapping[str, Any], str], dict[str, Any]]
    write: Callable[[ModelConfig], dict[str, Any]]
    expresses: Callable[[ModelConfig], bool]


# ---- weight tables -------------------------------------------------------------------------------------------
LLAMA_WEIGHTS: WeightTable = {
    "embed": (["model.embed_tokens"], "copy"),
    "layers.{i}.attn_norm": (["model.layers.{i}.input_layernorm"], "copy"),
    "layers.{i}.attn.qkv": (["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                             "model.layers.{i}.self_attn.v_proj"], "cat"),
    "layers.{i}.attn.q_norm": (["model.layers.{i}.self_attn.q_norm"], "copy"),
    "layers.{i}.attn.k_norm": (["model.layers.{i}.self_attn.k_norm"], "copy"),
    "layers.{i}.attn.out": (["model.layers.{i}.self_attn.o_proj"], "copy"),
    "layers.{i}.mlp_norm": (["model.layers.{i}.post_attention_layernorm"], "copy"),
    "layers.{i}.mlp.up": (["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"], "cat"),
    "layers.{i}.mlp.down": (["model.layers.{i}.mlp.down_proj"], "copy"),
    "final_norm": (["model.norm"], "copy"),
    "lm_head": (["lm_head"], "copy"),
}
# Gemma 2 and 3: a norm before and after attention and MLP (HF's post_attention_layernorm follows attention).
GEMMA2_WEIGHTS: WeightTable = {
    **LLAMA_WEIGHTS,
    "layers.{i}.attn_out_norm": (["model.layers.{i}.post_attention_layernorm"], "copy"),
    "layers.{i}.mlp_norm": (["model.layers.{i}.pre_feedforward_layernorm"], "copy"),
    "layers.{i}.mlp_out_norm": (["model.layers.{i}.post_feedforward_layernorm"], "copy"),
}
# OLMo 2: the norms act on the attention and MLP outputs only.
OLMO2_WEIGHTS: WeightTable = {
    **{k: v for k, v in LLAMA_WEIGHTS.items() if k not in ("layers.{i}.attn_norm", "layers.{i}.mlp_norm")},
    "layers.{i}.attn_out_norm": (["model.layers.{i}.post_attention_layernorm"], "copy"),
    "layers.{i}.mlp_out_norm": (["model.layers.{i}.post_feedforward_layernorm"], "copy"),
}
# Phi-3 / Phi-4-mini: LLaMA's network with q/k/v and gate/up fused in the checkpoint, as in our modules.
PHI3_WEIGHTS: WeightTable = {
    **LLAMA_WEIGHTS,
    "layers.{i}.attn.qkv": (["model.layers.{i}.self_attn.qkv_proj"], "copy"),
    "layers.{i}.mlp.up": (["model.layers.{i}.mlp.gate_up_proj"], "copy"),
}
# Mixture of experts: a router and experts {j} with their own gate/up/down projections (Qwen3-MoE, OLMoE).
MOE_WEIGHTS: WeightTable = {
    **{k: v for k, v in LLAMA_WEIGHTS.items() if not k.startswith("layers.{i}.mlp.")},
    "layers.{i}.mlp.router": (["model.layers.{i}.mlp.gate"], "copy"),
    "layers.{i}.mlp.up": (["model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
                           "model.layers.{i}.mlp.experts.{j}.up_proj.weight"], "experts"),
    "layers.{i}.mlp.down": (["model.layers.{i}.mlp.experts.{j}.down_proj.weight"], "experts"),
}
MIXTRAL_WEIGHTS: WeightTable = {
    **MOE_WEIGHTS,
    "layers.{i}.mlp.router": (["model.layers.{i}.block_sparse_moe.gate"], "copy"),
    "layers.{i}.mlp.up": (["model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
                           "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight"], "experts"),
    "layers.{i}.mlp.down": (["model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight"], "experts"),
}
GPT2_WEIGHTS: WeightTable = {
    "embed": (["transformer.wte"], "copy"),
    "pos_embed": (["transformer.wpe"], "copy"),
    "layers.{i}.attn_norm": (["transformer.h.{i}.ln_1"], "copy"),
    "layers.{i}.attn.qkv": (["transformer.h.{i}.attn.c_attn"], "conv1d"),
    "layers.{i}.attn.out": (["transformer.h.{i}.attn.c_proj"], "conv1d"),
    "layers.{i}.mlp_norm": (["transformer.h.{i}.ln_2"], "copy"),
    "layers.{i}.mlp.up": (["transformer.h.{i}.mlp.c_fc"], "conv1d"),
    "layers.{i}.mlp.down": (["transformer.h.{i}.mlp.c_proj"], "conv1d"),
    "final_norm": (["transformer.ln_f"], "copy"),
    "lm_head": (["lm_head"], "copy"),
}
# GPT-1 (post-norm, no final norm): GPT-2's layout under other names.
OPENAI_GPT_WEIGHTS: WeightTable = {
    **GPT2_WEIGHTS,
    "embed": (["transformer.tokens_embed"], "copy"),
    "pos_embed": (["transformer.positions_embed"], "copy"),
}
PHI_WEIGHTS: WeightTable = {
    "embed": (["model.embed_tokens"], "copy"),
    "layers.{i}.attn_norm": (["model.layers.{i}.input_layernorm"], "copy"),
    "layers.{i}.attn.qkv": (["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                             "model.layers.{i}.self_attn.v_proj"], "cat"),
    "layers.{i}.attn.out": (["model.layers.{i}.self_attn.dense"], "copy"),
    "layers.{i}.mlp.up": (["model.layers.{i}.mlp.fc1"], "copy"),
    "layers.{i}.mlp.down": (["model.layers.{i}.mlp.fc2"], "copy"),
    "final_norm": (["model.final_layernorm"], "copy"),
    "lm_head": (["lm_head"], "copy"),
}


# ---- layouts: config.json <-> ModelConfig fields -------------------------------------------------------------
def activation(name: str | None, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where}: unsupported activation '{name}' (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def read_gpt2(hf: Mapping[str, Any], where: str, gpt1: bool = False) -> dict[str, Any]:
    """GPT-2's layout; GPT-1 is the same, post-norm without a final norm, its "gelu" being the tanh form."""
    if gpt1:
        act = "gelu_new" if hf.get("afn", "gelu") == "gelu" else hf["afn"]
    else:
        act = hf.get("activation_function", "gelu_new")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_attention_heads=hf["n_head"],
        ffn_hidden_size=(None if gpt1 else hf.get("n_inner")) or 4 * hf["n_embd"],
        max_position_embeddings=hf["n_positions"],
        norm_type="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        norm_position="post" if gpt1 else "pre",
        final_norm=not gpt1,
        position_embedding="learned",
        activation=activation(act, where),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def write_gpt2(cfg: ModelConfig, gpt1: bool = False) -> dict[str, Any]:
    hf: dict[str, Any] = dict(
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
        n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
    )
    if gpt1:
        hf["afn"] = OPENAI_GPT_ACTIVATION.get(cfg.activation, cfg.activation)
    else:
        hf.update(n_inner=cfg.ffn_size, n_ctx=cfg.max_position_embeddings,
                  activation_function=HF_ACTIVATION[cfg.activation])
    return hf


def rope_parameters(hf: Mapping[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters of ``rope_parameters`` (transformers 5; per layer type for Gemma 3) or the older keys."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if layer_type in params:
        params = dict(params[layer_type])
    return params


def read_rope(hf: Mapping[str, Any], where: str, layer_type: str = "full_attention") -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling of the layers of ``layer_type`` (the same for all layers but in Gemma 3)."""
    params = rope_parameters(hf, layer_type)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or hf.get("max_position_embeddings") or 0)  # fmt: skip (Phi-3 keeps it beside the RoPE parameters)
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=original,
        )
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(params["factor"]))
    if kind in ("longrope", "su"):
        if params.get("attention_factor") is not None or params.get("factor") is not None:
            raise ConfigError(f"{where}: longrope with an explicit factor or attention_factor is not supported")
        return theta, RopeScaling(
            type="longrope", original_max_position_embeddings=original,
            short_factor=[float(f) for f in params["short_factor"]], long_factor=[float(f) for f in params["long_factor"]],
        )
    raise ConfigError(f"{where}: unsupported rope type '{kind}' (supported: default, llama3, linear, longrope)")


def write_rope(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """HF's ``rope_parameters`` for one kind of layer."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.type == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    if scaling.type == "longrope":
        return {"rope_type": "longrope", "rope_theta": theta, "short_factor": scaling.short_factor,
                "long_factor": scaling.long_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return {"rope_type": "llama3", "rope_theta": theta,
            **{k: v for k, v in dataclasses.asdict(scaling).items()
               if k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}


def read_layer_windows(hf: Mapping[str, Any], where: str, pattern: int) -> dict[str, Any]:
    """sliding_window and sliding_window_pattern from HF's ``layer_types`` (every Nth layer global); configs
    older than ``layer_types`` have every ``sliding_window_pattern``-th layer global (default ``pattern``)."""
    types = hf.get("layer_types")
    if not types:
        every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or pattern
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(hf["num_hidden_layers"])]
    windowed = [LAYER_TYPES.get(t) for t in types]
    if None in windowed:
        raise ConfigError(f"{where}: layer_types {types} (supported: {', '.join(LAYER_TYPES)})")
    if not any(windowed):
        return dict(sliding_window=None, sliding_window_pattern=None)
    if all(windowed):
        return dict(sliding_window=hf["sliding_window"], sliding_window_pattern=None)
    pattern = windowed.index(False) + 1
    if any(w != bool((i + 1) % pattern) for i, w in enumerate(windowed)):
        raise ConfigError(f"{where}: layer_types {types} are not every Nth layer global, the rest "
                          "sliding (the patterns supported)")
    return dict(sliding_window=hf["sliding_window"], sliding_window_pattern=pattern)


def write_layer_windows(cfg: ModelConfig) -> dict[str, Any]:
    types = [("sliding_attention" if cfg.layer_window(i) else "full_attention") for i in range(cfg.num_layers)]
    return dict(sliding_window=cfg.sliding_window, layer_types=types)


def read_rotary_decoder(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields every RoPE decoder (LLaMA's and Phi's layouts) names the same way."""
    theta, scaling = read_rope(hf, where)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        position_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        init_std=hf.get("initializer_range", 0.02),
    )


def write_rotary_decoder(cfg: ModelConfig) -> dict[str, Any]:
    rope = write_rope(cfg.rope_theta, cfg.rope_scaling)
    hf = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta, rope_parameters=rope,
        attention_dropout=cfg.dropout,
    )
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = rope  # transformers 4 reads this key
    return hf


def read_llama(
    hf: Mapping[str, Any], where: str, head_dim: int | None = None, qkv_bias: bool = False, tied: bool = False
) -> dict[str, Any]:
    """LLaMA's layout (RMSNorm, gated MLP); the arguments are the defaults a family's config.json leaves out."""
    return dict(
        read_rotary_decoder(hf, where),
        head_dim=hf.get("head_dim") or head_dim or hf["hidden_size"] // hf["num_attention_heads"],
        norm_type="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation(hf.get("hidden_activation") or hf.get("hidden_act", "silu"), where),
        gated_mlp=True,
        attention_bias=bool(hf.get("attention_bias", False)) or qkv_bias,
        attention_out_bias=bool(hf.get("attention_bias", False)) and not qkv_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", tied),
    )


def write_llama(cfg: ModelConfig, activations: Mapping[str, str] = HF_ACTIVATION) -> dict[str, Any]:
    return dict(
        write_rotary_decoder(cfg), head_dim=cfg.head_size, rms_norm_eps=cfg.norm_eps,
        hidden_act=activations[cfg.activation], attention_bias=cfg.attention_out_bias, mlp_bias=cfg.mlp_bias,
    )


def read_qwen(hf: Mapping[str, Any], where: str, **defaults: Any) -> dict[str, Any]:
    """Qwen2/3: LLaMA's layout with a sliding window that may cover all layers (not some of them)."""
    window = None
    if hf.get("use_sliding_window"):
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "sliding_attention" for t in layer_types):
            raise ConfigError(
                f"{where}: sliding window on only some layers (max_window_layers) is not supported; "
                "use_sliding_window: false or all layers sliding are"
            )
        window = hf.get("sliding_window")
    return dict(read_llama(hf, where, **defaults), sliding_window=window)


def write_qwen(cfg: ModelConfig) -> dict[str, Any]:
    return dict(write_llama(cfg), sliding_window=cfg.sliding_window,
                use_sliding_window=cfg.sliding_window is not None, max_window_layers=0)


def read_phi(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    if hf.get("qk_layernorm"):
        raise ConfigError(f"{where}: Phi with qk_layernorm is not supported")
    return dict(
        read_rotary_decoder(hf, where),
        norm_type="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        rotary_percent=hf.get("partial_rotary_factor", 0.5),
        activation=activation(hf.get("hidden_act", "gelu_new"), where),
        parallel_attn_mlp=True,
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def write_phi(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        write_rotary_decoder(cfg), layer_norm_eps=cfg.norm_eps, partial_rotary_factor=cfg.rotary_percent,
        hidden_act=HF_ACTIVATION[cfg.activation], qk_layernorm=False, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
    )


def read_gemma2(hf: Mapping[str, Any], where: str, gemma3: bool = False) -> dict[str, Any]:
    """Gemma 2 and 3: Gemma's network with sandwich norms, local/global layers, scaled (Gemma 2: capped) scores."""
    out = dict(
        read_llama(hf, where, head_dim=256, tied=True), **read_layer_windows(hf, where, 6 if gemma3 else 2),
        norm_unit_offset=True, norm_position="sandwich", embedding_multiplier=math.sqrt(hf["hidden_size"]),
        query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=hf.get("attn_logit_softcapping"), final_logit_softcap=hf.get("final_logit_softcapping"),
    )
    if gemma3:
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))  # the config.json before transformers 5
        if "sliding_attention" in (hf.get("rope_parameters") or {}):
            local_theta, local_scaling = read_rope(hf, where, "sliding_attention")
            if local_scaling is not None:
                raise ConfigError(f"{where}: scaled RoPE on the sliding-window layers is not supported")
        out.update(qk_norm=True, rope_local_theta=local_theta if out["sliding_window_pattern"] else None)
    return out


def write_gemma2(cfg: ModelConfig) -> dict[str, Any]:
    hf = dict(write_llama(cfg, GEMMA_ACTIVATION), hidden_activation=GEMMA_ACTIVATION[cfg.activation],
              query_pre_attn_scalar=cfg.query_pre_attn_scalar, attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap, **write_layer_windows(cfg))  # fmt: skip
    if cfg.qk_norm:  # Gemma 3: RoPE per layer type
        local = write_rope(cfg.rope_local_theta or cfg.rope_theta, None)
        hf["rope_parameters"] = {"full_attention": hf["rope_parameters"], "sliding_attention": local}
        hf.pop("rope_scaling", None)
    return hf


def read_phi3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: LLaMA's network (fused weights), partial rotation, LongRoPE."""
    rotary = rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return dict(read_llama(hf, where), rotary_percent=float(rotary), sliding_window=hf.get("sliding_window"),
                hf_model_type="phi3")


def write_phi3(cfg: ModelConfig) -> dict[str, Any]:
    hf = dict(write_llama(cfg), sliding_window=cfg.sliding_window, partial_rotary_factor=cfg.rotary_percent)
    hf["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
    if cfg.rope_scaling is not None:
        hf["original_max_position_embeddings"] = cfg.rope_scaling.original_max_position_embeddings
    return hf


def read_smollm3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """SmolLM3: LLaMA's network with every Nth layer without RoPE (``no_rope_layers``: 0 there)."""
    uses_rope = hf.get("no_rope_layers") or [1] * hf["num_hidden_layers"]
    interval = None
    if not all(uses_rope):
        interval = uses_rope.index(0) + 1
        if any(bool(r) != bool((i + 1) % interval) for i, r in enumerate(uses_rope)):
            raise ConfigError(f"{where}: no_rope_layers {uses_rope} are not every Nth layer (the pattern supported)")
    return dict(read_qwen(hf, where, tied=True), no_rope_layer_interval=interval)


def write_smollm3(cfg: ModelConfig) -> dict[str, Any]:
    uses_rope = [int(cfg.layer_has_rope(i)) for i in range(cfg.num_layers)]
    return dict(write_qwen(cfg), no_rope_layers=uses_rope, no_rope_layer_interval=cfg.no_rope_layer_interval)


def read_moe(hf: Mapping[str, Any], where: str, experts_key: str, renormalize: bool, **defaults: Any) -> dict[str, Any]:
    """The mixture-of-experts fields every MoE family names alike (Mixtral, Qwen3-MoE, OLMoE)."""
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(f"{where}: dense layers between the MoE layers (mlp_only_layers, decoder_sparse_step) are "
                          "not supported")
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"{where}: clip_qkv is not supported")
    return dict(
        read_qwen(hf, where, **defaults),
        num_experts=hf.get(experts_key) or hf["num_local_experts"],  # (transformers 5 saves Qwen3-MoE's so)
        num_experts_per_token=hf.get("num_experts_per_tok", 2),
        moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
        moe_renormalize=bool(hf.get("norm_topk_prob", renormalize)),
        moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def write_moe(cfg: ModelConfig, experts_key: str) -> dict[str, Any]:
    return dict(write_qwen(cfg), **{experts_key: cfg.num_experts}, num_experts_per_tok=cfg.num_experts_per_token,
                norm_topk_prob=cfg.moe_renormalize,
                router_aux_loss_coef=cfg.moe_aux_loss_coef, output_router_logits=False)


# ---- the records, most specific first (export uses the first that expresses a config) ----------------------------
FAMILIES: dict[str, HFFamily] = {
    family.model_type: family
    for family in (
        HFFamily(
            "olmoe", "OlmoeForCausalLM", MOE_WEIGHTS,
            read=lambda hf, where: dict(read_moe(hf, where, "num_experts", False), qk_norm=True,
                                        qk_norm_per_head=False),
            write=lambda cfg: dict(write_moe(cfg, "num_experts"), intermediate_size=cfg.expert_ffn_size),
            expresses=lambda cfg: cfg.num_experts is not None and cfg.qk_norm and not cfg.qk_norm_per_head,
        ),
        HFFamily(
            "qwen3_moe", "Qwen3MoeForCausalLM", MOE_WEIGHTS,
            read=lambda hf, where: dict(read_moe(hf, where, "num_experts", False, head_dim=128), qk_norm=True),
            write=lambda cfg: dict(write_moe(cfg, "num_experts"), moe_intermediate_size=cfg.expert_ffn_size),
            expresses=lambda cfg: cfg.num_experts is not None and cfg.qk_norm,
        ),
        HFFamily(
            "mixtral", "MixtralForCausalLM", MIXTRAL_WEIGHTS,
            read=lambda hf, where: dict(read_moe(hf, where, "num_local_experts", True),
                                        sliding_window=hf.get("sliding_window")),
            write=lambda cfg: dict(write_moe(cfg, "num_local_experts"), sliding_window=cfg.sliding_window),
            expresses=lambda cfg: cfg.num_experts is not None and cfg.moe_renormalize,
        ),
        HFFamily(
            "gemma3_text", "Gemma3ForCausalLM", GEMMA2_WEIGHTS,
            read=lambda hf, where: read_gemma2(hf, where, gemma3=True),
            write=write_gemma2,
            expresses=lambda cfg: cfg.norm_position == "sandwich" and cfg.qk_norm,
        ),
        HFFamily(
            "gemma2", "Gemma2ForCausalLM", GEMMA2_WEIGHTS, read=read_gemma2, write=write_gemma2,
            expresses=lambda cfg: cfg.norm_position == "sandwich",
        ),
        HFFamily(
            "olmo2", "Olmo2ForCausalLM", OLMO2_WEIGHTS,
            read=lambda hf, where: dict(read_llama(hf, where), norm_position="output", qk_norm=True,
                                        qk_norm_per_head=False),
            write=write_llama,
            expresses=lambda cfg: cfg.norm_position == "output",
        ),
        HFFamily(
            "smollm3", "SmolLM3ForCausalLM", LLAMA_WEIGHTS, read=read_smollm3, write=write_smollm3,
            expresses=lambda cfg: cfg.no_rope_layer_interval is not None,
        ),
        HFFamily(
            "phi3", "Phi3ForCausalLM", PHI3_WEIGHTS, read=read_phi3, write=write_phi3,
            expresses=lambda cfg: cfg.hf_model_type == "phi3",
        ),
        HFFamily(
            "openai-gpt", "OpenAIGPTLMHeadModel", OPENAI_GPT_WEIGHTS,
            read=lambda hf, where: read_gpt2(hf, where, gpt1=True),
            write=lambda cfg: write_gpt2(cfg, gpt1=True),
            expresses=lambda cfg: cfg.position_embedding == "learned" and cfg.norm_position == "post",
        ),
        HFFamily(
            "gpt2", "GPT2LMHeadModel", GPT2_WEIGHTS, read=read_gpt2, write=write_gpt2,
            expresses=lambda cfg: cfg.position_embedding == "learned",
        ),
        HFFamily(
            "phi", "PhiForCausalLM", PHI_WEIGHTS, read=read_phi, write=write_phi,
            expresses=lambda cfg: cfg.parallel_attn_mlp,
        ),
        HFFamily(
            "gemma", "GemmaForCausalLM", LLAMA_WEIGHTS,
            read=lambda hf, where: dict(
                read_llama(hf, where, head_dim=256, tied=True), norm_unit_offset=True,
                embedding_multiplier=math.sqrt(hf["hidden_size"]),
            ),
            write=lambda cfg: dict(write_llama(cfg, GEMMA_ACTIVATION),
                                   hidden_activation=GEMMA_ACTIVATION[cfg.activation]),
            expresses=lambda cfg: cfg.norm_unit_offset,
        ),
        HFFamily(
            "qwen3", "Qwen3ForCausalLM", LLAMA_WEIGHTS,
            read=lambda hf, where: dict(read_qwen(hf, where, head_dim=128), qk_norm=True),
            write=write_qwen,
            expresses=lambda cfg: cfg.qk_norm,
        ),
        HFFamily(
            "qwen2", "Qwen2ForCausalLM", LLAMA_WEIGHTS,
            read=lambda hf, where: read_qwen(hf, where, qkv_bias=True),
            write=write_qwen,
            expresses=lambda cfg: cfg.attention_bias and not cfg.attention_out_bias,
        ),
        HFFamily(
            "mistral", "MistralForCausalLM", LLAMA_WEIGHTS,
            read=lambda hf, where: dict(read_llama(hf, where), sliding_window=hf.get("sliding_window")),
            write=lambda cfg: dict(write_llama(cfg), sliding_window=cfg.sliding_window),
            expresses=lambda cfg: cfg.sliding_window is not None,
        ),
        HFFamily(
            "llama", "LlamaForCausalLM", LLAMA_WEIGHTS, read=read_llama, write=write_llama,
            expresses=lambda cfg: True,
        ),
    )
}
SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_of(hf: Mapping[str, Any], where: str) -> HFFamily:
    """The record of a parsed ``config.json``; ConfigError listing the supported ones otherwise."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{where}: unsupported architecture '{model_type}' (architectures {hf.get('architectures')}); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return FAMILIES[model_type]


def is_hf_folder(path: str | Path) -> bool:
    """The one test of "is this an HF checkpoint folder?": a folder with a config.json (reading it says whether
    that is a good one)."""
    return (Path(path) / "config.json").exists()


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of an HF checkpoint folder, with a one-line error naming the file."""
    return read_json(Path(folder) / "config.json", "HF model config", CheckpointError)


def model_config_from_hf(source: str | Path | Mapping[str, Any], where: str | None = None) -> ModelConfig:
    """The ModelConfig of an HF checkpoint folder, or of its parsed config.json."""
    if isinstance(source, Mapping):
        hf, where = source, where or "config.json"
    else:
        hf, where = read_hf_config(source), where or str(Path(source) / "config.json")
    family = family_of(hf, where)
    name = Path(str(hf.get("_name_or_path") or family.model_type)).name or family.model_type
    try:
        return from_dict(ModelConfig, {"name": name, **family.read(hf, where)}, "model")
    except KeyError as err:
        raise ConfigError(f"{where}: missing key {err.args[0]!r} for model_type '{family.model_type}'") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for ``cfg`` in its ``hf_model_type`` or else the first HF family that expresses it exactly;
    ConfigError when that family cannot."""
    if cfg.hf_model_type is not None and cfg.hf_model_type not in FAMILIES:
        raise ConfigError(f"model.hf_model_type: '{cfg.hf_model_type}' is none of {', '.join(SUPPORTED_FAMILIES)}")
    family = FAMILIES[cfg.hf_model_type] if cfg.hf_model_type else next(f for f in FAMILIES.values() if f.expresses(cfg))
    hf = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "pad_token_id": None,  # a tokenizer's id, not the network's (some families' defaults lie past small vocabularies)
        "torch_dtype": "float32",
        **family.write(cfg),
    }
    _check_round_trip(cfg, hf, family.model_type)
    return hf


# Training settings (HF has no token dropping: an exported MoE model routes every token).
_NOT_ARCHITECTURE = ("name", "init_std", "dropout", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_capacity_factor",
                     "kernels", "kernel_options")


def _check_round_trip(cfg: ModelConfig, hf: dict[str, Any], family: str) -> None:
    back = model_config_from_hf(hf)
    diffs = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name not in _NOT_ARCHITECTURE and _normalised(cfg, f.name) != _normalised(back, f.name)
    ]
    if diffs:
        raise ConfigError(
            f"model '{cfg.name}' has no HF equivalent: the closest family, {family}, cannot express "
            + ", ".join(f"{d}={getattr(cfg, d)!r}" for d in diffs)
        )


def _normalised(cfg: ModelConfig, name: str) -> Any:
    """Field value with defaults made explicit, so e.g. head_dim None and 64 compare equal."""
    derived = {"num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "ffn_hidden_size": cfg.ffn_size,
               "moe_ffn_hidden_size": cfg.expert_ffn_size if cfg.num_experts else None}
    value = derived.get(name, getattr(cfg, name))
    if name == "embedding_multiplier" and value is not None:
        return round(value, 6)
    return value

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
* ``keys`` -- for every :class:`ModelConfig` field that ``config.json`` keeps
  under a key of its own, that key, its default and how its values are spelt;
  reading and writing read the same table;
* ``read`` and ``write`` -- the rest of the translation, both ways: the
  fields the family fixes (LLaMA: RMSNorm) and the settings spread over
  several keys (RoPE, sliding-window layers);
* ``expresses`` -- the configs saved as this family: those with the network
  features it requires, any of those it allows, and no other
  (:class:`Expresses`). No two records express one config
  (``tests/test_hf_families.py``), so the records' order decides nothing. A
  round trip through ``write`` and ``read`` must give the config back, else
  export refuses, naming what the family (for a config no record expresses,
  the family whose round trip loses the fewest fields) cannot say.

Most families are variations of a few layouts (GPT-2's, LLaMA's, Phi's), so
the records share the layout tables and helpers below and state only what
differs. Adding a family is one record plus its parity test in
``tests/test_hf_parity.py`` (see ``docs/adding-a-model-family.md``). Nothing
here imports torch or ``transformers``: a training config's ``model:`` may be
an HF folder, read by :func:`model_config_from_folder`, which the commands hand
to the config loader (it sits below this package).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ironcore.checkpoints import pointers
from ironcore.config.base import from_dict
from ironcore.config.loader import load_model_config
from ironcore.config.model import ModelConfig, RopeScaling
from ironcore.errors import CheckpointError, ConfigError
from ironcore.files import read_json

WeightTable = dict[str, tuple[list[str], str]]  # our module ("layers.{i}.attn.qkv") -> (HF modules, how)
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}  # HF's layer_types -> windowed


# ---- config.json keys: one declaration per field, read and written -------------------------------------------
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
               "swish": "silu", "relu": "relu"}  # HF's activation names -> ours


@dataclasses.dataclass(frozen=True)
class Activations:
    """How a layout spells our activations: ``read`` HF's names -> ours, ``write`` ours -> HF's (one without an
    HF name is written as ours, and the round trip refuses it)."""

    write: Mapping[str, str]
    read: Mapping[str, str] = dataclasses.field(default_factory=lambda: ACTIVATIONS)

    def ours(self, name: Any, where: str) -> str:
        """Our name of HF's activation ``name``; a ConfigError naming ``where`` (the file) for one we lack."""
        if name not in self.read:
            raise ConfigError(f"{where}: unsupported activation '{name}' (supported: {', '.join(self.read)})")
        return self.read[name]


HF_ACTIVATIONS = Activations({"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"})
GEMMA_ACTIVATIONS = Activations({**HF_ACTIVATIONS.write, "gelu_tanh": "gelu_pytorch_tanh"})
GPT1_ACTIVATIONS = Activations({"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"},  # GPT-1's "gelu": tanh form
                               {**ACTIVATIONS, "gelu": "gelu_tanh"})


REQUIRED: Any = object()  # the default of a key config.json must have


@dataclasses.dataclass(frozen=True)
class HFKey:
    """Where ``config.json`` keeps one of our fields.

    ``default`` is what a missing or null key means, as config.json would spell it (a function of the whole
    config.json where it depends on other keys; none: the key is required). ``also``: more keys written with
    the same value, and read where ``name`` is missing. ``written``: False for a field read from a key that
    another field writes.
    """

    name: str
    default: Any = REQUIRED
    names: Activations | None = None
    also: tuple[str, ...] = ()
    written: bool = True


KeyTable = dict[str, HFKey]  # our field -> its config.json key
# Fields written as the size they resolve to (null there means: derived from other fields).
DERIVED: dict[str, Callable[[ModelConfig], Any]] = {
    "num_key_value_heads": lambda cfg: cfg.kv_heads, "head_dim": lambda cfg: cfg.head_size,
    "ffn_hidden_size": lambda cfg: cfg.ffn_size,
    "moe_ffn_hidden_size": lambda cfg: cfg.expert_ffn_size if cfg.num_experts else None,
}


def read_keys(hf: Mapping[str, Any], where: str, table: KeyTable) -> dict[str, Any]:
    """Our fields from ``config.json`` by ``table``."""
    fields = {}
    for ours, key in table.items():
        value = next((hf[name] for name in (key.name, *key.also) if hf.get(name) is not None), None)
        if value is None:
            if key.default is REQUIRED:
                value = hf[key.name]  # KeyError: "missing key"; a null stays null
            else:
                value = key.default(hf) if callable(key.default) else key.default
        fields[ours] = key.names.ours(value, where) if key.names else value
    return fields


def write_keys(cfg: ModelConfig, table: KeyTable) -> dict[str, Any]:
    """The ``config.json`` keys of ``cfg``'s fields by ``table``."""
    hf: dict[str, Any] = {}
    for ours, key in table.items():
        if key.written:
            value = DERIVED[ours](cfg) if ours in DERIVED else getattr(cfg, ours)
            if key.names:
                value = key.names.write.get(value, value)
            hf.update(dict.fromkeys((key.name, *key.also), value))
    return hf


COMMON_KEYS: KeyTable = {"vocab_size": HFKey("vocab_size"), "init_std": HFKey("initializer_range", 0.02)}
GPT_KEYS: KeyTable = {
    "hidden_size": HFKey("n_embd"), "num_layers": HFKey("n_layer"), "num_attention_heads": HFKey("n_head"),
    "max_position_embeddings": HFKey("n_positions"), "norm_eps": HFKey("layer_norm_epsilon", 1e-5),
    "tie_word_embeddings": HFKey("tie_word_embeddings", True),
}
GPT2_KEYS: KeyTable = {
    **GPT_KEYS, "max_position_embeddings": HFKey("n_positions", also=("n_ctx",)),
    "ffn_hidden_size": HFKey("n_inner", lambda hf: 4 * hf["n_embd"]),
    "activation": HFKey("activation_function", "gelu_new", HF_ACTIVATIONS),
}
GPT1_KEYS: KeyTable = {**GPT_KEYS, "activation": HFKey("afn", "gelu", GPT1_ACTIVATIONS)}
ROTARY_KEYS: KeyTable = {  # every RoPE decoder (LLaMA's and Phi's layouts)
    "hidden_size": HFKey("hidden_size"), "num_layers": HFKey("num_hidden_layers"),
    "num_attention_heads": HFKey("num_attention_heads"),
    "num_key_value_heads": HFKey("num_key_value_heads", lambda hf: hf["num_attention_heads"]),
    "ffn_hidden_size": HFKey("intermediate_size"), "max_position_embeddings": HFKey("max_position_embeddings"),
}
LLAMA_KEYS: KeyTable = {
    **ROTARY_KEYS, "head_dim": HFKey("head_dim", lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
    "norm_eps": HFKey("rms_norm_eps", 1e-6), "activation": HFKey("hidden_act", "silu", HF_ACTIVATIONS),
    # LLaMA's one attention_bias biases q, k, v and the output (Qwen2 fixes both of ours in its read).
    "attention_bias": HFKey("attention_bias", False, written=False),
    "attention_out_bias": HFKey("attention_bias", False), "mlp_bias": HFKey("mlp_bias", False),
    "tie_word_embeddings": HFKey("tie_word_embeddings", False),
}
MISTRAL_KEYS: KeyTable = {**LLAMA_KEYS, "sliding_window": HFKey("sliding_window", None)}
QWEN3_KEYS: KeyTable = {**LLAMA_KEYS, "head_dim": HFKey("head_dim", 128)}
SMOLLM3_KEYS: KeyTable = {**LLAMA_KEYS, "tie_word_embeddings": HFKey("tie_word_embeddings", True)}
GEMMA_KEYS: KeyTable = {
    **LLAMA_KEYS, "head_dim": HFKey("head_dim", 256), "tie_word_embeddings": HFKey("tie_word_embeddings", True),
    "activation": HFKey("hidden_activation", "silu", GEMMA_ACTIVATIONS, also=("hidden_act",)),
}
GEMMA2_KEYS: KeyTable = {
    **GEMMA_KEYS, "query_pre_attn_scalar": HFKey("query_pre_attn_scalar", 256),
    "attn_logit_softcap": HFKey("attn_logit_softcapping", None),
    "final_logit_softcap": HFKey("final_logit_softcapping", None),
}
PHI_KEYS: KeyTable = {
    **ROTARY_KEYS, "norm_eps": HFKey("layer_norm_eps", 1e-5), "rotary_percent": HFKey("partial_rotary_factor", 0.5),
    "activation": HFKey("hidden_act", "gelu_new", HF_ACTIVATIONS),
    "tie_word_embeddings": HFKey("tie_word_embeddings", False),
}
MOE_KEYS: KeyTable = {
    **LLAMA_KEYS, "num_experts_per_token": HFKey("num_experts_per_tok", 2),
    "moe_aux_loss_coef": HFKey("router_aux_loss_coef", 0.001),
    # transformers 5 saves Qwen3-MoE's and OLMoE's expert count as num_local_experts
    "num_experts": HFKey("num_experts", lambda hf: hf["num_local_experts"]),
    "moe_renormalize": HFKey("norm_topk_prob", False),
}
MIXTRAL_KEYS: KeyTable = {
    **MOE_KEYS, "num_experts": HFKey("num_local_experts"), "moe_renormalize": HFKey("norm_topk_prob", True),
    "sliding_window": HFKey("sliding_window", None),
}
QWEN3_MOE_KEYS: KeyTable = {
    **MOE_KEYS, "head_dim": HFKey("head_dim", 128), "moe_ffn_hidden_size": HFKey("moe_intermediate_size", None),
}


# ---- which family a config is saved as -----------------------------------------------------------------------
# The network features that tell the families apart.
FEATURES: dict[str, Callable[[ModelConfig], bool]] = {
    "experts": lambda cfg: cfg.num_experts is not None,
    "experts_not_renormalized": lambda cfg: cfg.num_experts is not None and not cfg.moe_renormalize,
    "qk_norm": lambda cfg: cfg.qk_norm and cfg.qk_norm_per_head,
    "qk_norm_over_heads": lambda cfg: cfg.qk_norm and not cfg.qk_norm_per_head,
    "sandwich_norms": lambda cfg: cfg.norm_position == "sandwich",
    "output_norms": lambda cfg: cfg.norm_position == "output",
    "post_norm": lambda cfg: cfg.norm_position == "post",
    "learned_positions": lambda cfg: cfg.position_embedding == "learned",
    "parallel_blocks": lambda cfg: cfg.parallel_attn_mlp,
    "unit_offset_norm": lambda cfg: cfg.norm_unit_offset,
    "no_rope_layers": lambda cfg: cfg.no_rope_layer_interval is not None,
    "sliding_window": lambda cfg: cfg.sliding_window is not None,
    "qkv_bias": lambda cfg: cfg.attention_bias and not cfg.attention_out_bias,
}


def features(cfg: ModelConfig) -> frozenset[str]:
    """The :data:`FEATURES` ``cfg`` has."""
    return frozenset(name for name, has in FEATURES.items() if has(cfg))


@dataclasses.dataclass(frozen=True, init=False)
class Expresses:
    """The configs a family is saved as: those with every ``required`` feature, any ``optional`` ones and no
    other (:data:`FEATURES`)."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    def __init__(self, required: Iterable[str], optional: Iterable[str] = ()) -> None:
        required, optional = frozenset(required), frozenset(optional)
        unknown = (required | optional) - FEATURES.keys()
        if unknown:  # a misspelt feature would silently express nothing
            raise ValueError(f"unknown features {sorted(unknown)} (known: {', '.join(FEATURES)})")
        object.__setattr__(self, "required", required)
        object.__setattr__(self, "optional", optional)

    def __call__(self, cfg: ModelConfig) -> bool:
        return self.holds(features(cfg))

    def holds(self, found: Iterable[str]) -> bool:
        """Whether a config with the features ``found`` (and no other) is saved as this family."""
        return self.required <= frozenset(found) <= self.required | self.optional


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """One HF ``model_type`` (see the module doc); ``expresses`` None: saved as it only where a config's
    ``hf_model_type`` names it."""

    model_type: str
    architecture: str
    weights: WeightTable
    keys: KeyTable
    read: Callable[[Mapping[str, Any], str], dict[str, Any]]
    write: Callable[[ModelConfig], dict[str, Any]]
    expresses: Expresses | None


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


# ---- layouts: what the key tables cannot say -----------------------------------------------------------------
def read_gpt2(hf: Mapping[str, Any], where: str, gpt1: bool = False) -> dict[str, Any]:
    """GPT-2's layout; GPT-1 is the same, post-norm without a final norm and its MLP 4x wide."""
    return dict(
        norm_type="layernorm", norm_position="post" if gpt1 else "pre", final_norm=not gpt1,
        position_embedding="learned", attention_bias=True, attention_out_bias=True, mlp_bias=True,
        **({"ffn_hidden_size": 4 * hf["n_embd"]} if gpt1 else {}),
    )


def write_gpt2(cfg: ModelConfig) -> dict[str, Any]:
    """GPT-1/2's dropout keys (written for HF's training defaults; an imported model starts without dropout)."""
    return dict(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


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



def read_rotary(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What every RoPE decoder (LLaMA's and Phi's layouts) says the same way beyond :data:`ROTARY_KEYS`."""
    theta, scaling = read_rope(hf, where)
    return dict(position_embedding="rope", rope_theta=theta, rope_scaling=scaling)


def write_rotary(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE in both spellings of it, and the attention dropout."""
    rope = write_rope(cfg.rope_theta, cfg.rope_scaling)
    hf = dict(rope_theta=cfg.rope_theta, rope_parameters=rope, attention_dropout=cfg.dropout)
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = rope  # transformers 4 reads this key
    return hf


def read_llama(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """LLaMA's layout: RMSNorm, gated MLP."""
    return dict(read_rotary(hf, where), norm_type="rmsnorm", gated_mlp=True)


def read_qwen(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
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
    return dict(read_llama(hf, where), sliding_window=window)


def write_qwen(cfg: ModelConfig) -> dict[str, Any]:
    """The window on every layer (``max_window_layers: 0``) or on none: the only patterns read back."""
    return dict(write_rotary(cfg), sliding_window=cfg.sliding_window,
                use_sliding_window=cfg.sliding_window is not None, max_window_layers=0)


def read_phi(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Phi-1/2: LayerNorm, attention and MLP in parallel from one norm, biases everywhere."""
    if hf.get("qk_layernorm"):
        raise ConfigError(f"{where}: Phi with qk_layernorm is not supported")
    return dict(read_rotary(hf, where), norm_type="layernorm", parallel_attn_mlp=True,
                attention_bias=True, attention_out_bias=True, mlp_bias=True, lm_head_bias=True)


def write_phi(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE, no q/k norms, the dropout keys."""
    return dict(write_rotary(cfg), qk_layernorm=False, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout)


def read_gemma(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Gemma: LLaMA's network with (1 + weight) norms and embeddings scaled by sqrt(hidden_size)."""
    return dict(read_llama(hf, where), norm_unit_offset=True, embedding_multiplier=math.sqrt(hf["hidden_size"]))


def read_gemma2(hf: Mapping[str, Any], where: str, gemma3: bool = False) -> dict[str, Any]:
    """Gemma 2 and 3: Gemma's network with sandwich norms, local/global layers, scaled (Gemma 2: capped) scores."""
    out = dict(read_gemma(hf, where), **read_layer_windows(hf, where, 6 if gemma3 else 2), norm_position="sandwich")
    if gemma3:
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))  # the config.json before transformers 5
        if "sliding_attention" in (hf.get("rope_parameters") or {}):
            local_theta, local_scaling = read_rope(hf, where, "sliding_attention")
            if local_scaling is not None:
                raise ConfigError(f"{where}: scaled RoPE on the sliding-window layers is not supported")
        out.update(qk_norm=True, rope_local_theta=local_theta if out["sliding_window_pattern"] else None)
    return out


def write_gemma2(cfg: ModelConfig) -> dict[str, Any]:
    """The layer types; for Gemma 3 the local layers' RoPE as well."""
    hf = dict(write_rotary(cfg), **write_layer_windows(cfg))
    if cfg.qk_norm:  # Gemma 3: RoPE per layer type
        local = write_rope(cfg.rope_local_theta or cfg.rope_theta, None)
        hf["rope_parameters"] = {"full_attention": hf["rope_parameters"], "sliding_attention": local}
        hf.pop("rope_scaling", None)
    return hf


def read_phi3(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: LLaMA's network (fused weights), partial rotation, LongRoPE."""
    rotary = rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return dict(read_llama(hf, where), rotary_percent=float(rotary), hf_model_type="phi3")


def write_phi3(cfg: ModelConfig) -> dict[str, Any]:
    """The rotated share in both places transformers reads it, and LongRoPE's original context."""
    hf = dict(write_rotary(cfg), partial_rotary_factor=cfg.rotary_percent)
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
    return dict(read_qwen(hf, where), no_rope_layer_interval=interval)


def write_smollm3(cfg: ModelConfig) -> dict[str, Any]:
    """The layers without RoPE, per layer and as the interval."""
    uses_rope = [int(cfg.layer_has_rope(i)) for i in range(cfg.num_layers)]
    return dict(write_qwen(cfg), no_rope_layers=uses_rope, no_rope_layer_interval=cfg.no_rope_layer_interval)


def read_moe(hf: Mapping[str, Any], where: str, layout: Callable[..., dict[str, Any]] = read_qwen) -> dict[str, Any]:
    """A mixture-of-experts family's ``layout`` (the expert fields are in :data:`MOE_KEYS`), where it has only
    MoE layers."""
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(f"{where}: dense layers between the MoE layers (mlp_only_layers, decoder_sparse_step) are "
                          "not supported")
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"{where}: clip_qkv is not supported")
    return layout(hf, where)


def write_moe(cfg: ModelConfig, layout: Callable[[ModelConfig], dict[str, Any]] = write_qwen) -> dict[str, Any]:
    """``layout``'s keys, and no router logits in HF's outputs (its default)."""
    return dict(layout(cfg), output_router_logits=False)


# ---- the records (no two express one config: their order decides nothing) ------------------------------------
FAMILIES: dict[str, HFFamily] = {
    family.model_type: family
    for family in (
        HFFamily(
            "olmoe", "OlmoeForCausalLM", MOE_WEIGHTS, MOE_KEYS,
            read=lambda hf, where: dict(read_moe(hf, where), qk_norm=True, qk_norm_per_head=False),
            # OLMoE's one MLP width is its experts'
            write=lambda cfg: dict(write_moe(cfg), intermediate_size=cfg.expert_ffn_size),
            expresses=Expresses({"experts", "qk_norm_over_heads"}, {"experts_not_renormalized", "sliding_window"}),
        ),
        HFFamily(
            "qwen3_moe", "Qwen3MoeForCausalLM", MOE_WEIGHTS, QWEN3_MOE_KEYS,
            read=lambda hf, where: dict(read_moe(hf, where), qk_norm=True), write=write_moe,
            expresses=Expresses({"experts", "qk_norm"}, {"experts_not_renormalized", "sliding_window"}),
        ),
        HFFamily(
            "mixtral", "MixtralForCausalLM", MIXTRAL_WEIGHTS, MIXTRAL_KEYS,
            read=lambda hf, where: read_moe(hf, where, read_llama), write=lambda cfg: write_moe(cfg, write_rotary),
            expresses=Expresses({"experts"}, {"sliding_window"}),
        ),
        HFFamily(
            "gemma3_text", "Gemma3ForCausalLM", GEMMA2_WEIGHTS, GEMMA2_KEYS,
            read=lambda hf, where: read_gemma2(hf, where, gemma3=True), write=write_gemma2,
            expresses=Expresses({"sandwich_norms", "unit_offset_norm", "qk_norm"}, {"sliding_window"}),
        ),
        HFFamily(
            "gemma2", "Gemma2ForCausalLM", GEMMA2_WEIGHTS, GEMMA2_KEYS, read=read_gemma2, write=write_gemma2,
            expresses=Expresses({"sandwich_norms", "unit_offset_norm"}, {"sliding_window"}),
        ),
        HFFamily(
            "olmo2", "Olmo2ForCausalLM", OLMO2_WEIGHTS, LLAMA_KEYS,
            read=lambda hf, where: dict(read_llama(hf, where), norm_position="output", qk_norm=True,
                                        qk_norm_per_head=False),
            write=write_rotary, expresses=Expresses({"output_norms", "qk_norm_over_heads"}),
        ),
        HFFamily(
            "smollm3", "SmolLM3ForCausalLM", LLAMA_WEIGHTS, SMOLLM3_KEYS, read=read_smollm3, write=write_smollm3,
            expresses=Expresses({"no_rope_layers"}, {"sliding_window"}),
        ),
        HFFamily(  # LLaMA's network in fused tensors: saved as Phi-3 where its hf_model_type says so (set on import)
            "phi3", "Phi3ForCausalLM", PHI3_WEIGHTS, MISTRAL_KEYS, read=read_phi3, write=write_phi3, expresses=None,
        ),
        HFFamily(
            "openai-gpt", "OpenAIGPTLMHeadModel", OPENAI_GPT_WEIGHTS, GPT1_KEYS,
            read=lambda hf, where: read_gpt2(hf, where, gpt1=True), write=write_gpt2,
            expresses=Expresses({"learned_positions", "post_norm"}),
        ),
        HFFamily(
            "gpt2", "GPT2LMHeadModel", GPT2_WEIGHTS, GPT2_KEYS, read=read_gpt2, write=write_gpt2,
            expresses=Expresses({"learned_positions"}),
        ),
        HFFamily(
            "phi", "PhiForCausalLM", PHI_WEIGHTS, PHI_KEYS, read=read_phi, write=write_phi,
            expresses=Expresses({"parallel_blocks"}),
        ),
        HFFamily(
            "gemma", "GemmaForCausalLM", LLAMA_WEIGHTS, GEMMA_KEYS, read=read_gemma, write=write_rotary,
            expresses=Expresses({"unit_offset_norm"}),
        ),
        HFFamily(
            "qwen3", "Qwen3ForCausalLM", LLAMA_WEIGHTS, QWEN3_KEYS,
            read=lambda hf, where: dict(read_qwen(hf, where), qk_norm=True), write=write_qwen,
            expresses=Expresses({"qk_norm"}, {"sliding_window"}),
        ),
        HFFamily(
            "qwen2", "Qwen2ForCausalLM", LLAMA_WEIGHTS, LLAMA_KEYS,  # q, k and v biased, the output not
            read=lambda hf, where: dict(read_qwen(hf, where), attention_bias=True, attention_out_bias=False),
            write=write_qwen, expresses=Expresses({"qkv_bias"}, {"sliding_window"}),
        ),
        HFFamily(
            "mistral", "MistralForCausalLM", LLAMA_WEIGHTS, MISTRAL_KEYS, read=read_llama, write=write_rotary,
            expresses=Expresses({"sliding_window"}),
        ),
        HFFamily(
            "llama", "LlamaForCausalLM", LLAMA_WEIGHTS, LLAMA_KEYS, read=read_llama, write=write_rotary,
            expresses=Expresses(()),
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
    folder = None if isinstance(source, Mapping) else Path(source)
    if folder is None:
        hf, where = source, where or "config.json"
    else:
        hf, where = read_hf_config(folder), where or str(folder / "config.json")
    family = family_of(hf, where)
    name = model_name(hf, folder) or family.model_type
    try:
        fields = {**read_keys(hf, where, COMMON_KEYS), **read_keys(hf, where, family.keys), **family.read(hf, where)}
        return from_dict(ModelConfig, {"name": name, **fields}, "model")
    except KeyError as err:
        raise ConfigError(f"{where}: missing key {err.args[0]!r} for model_type '{family.model_type}'") from None
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None



def model_name(hf: Mapping[str, Any], folder: Path | None = None) -> str | None:
    """What the model is called (MLflow's ``model_name`` tag): ``_name_or_path``'s last part, else the folder's
    name, read through the hub cache's ``models--ORG--NAME/snapshots/HASH``; None when neither says."""
    recorded = Path(str(hf.get("_name_or_path") or "")).name
    if recorded or folder is None:
        return recorded or None
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name or None


def model_config_from_folder(path: Path) -> ModelConfig:
    """The ``model:`` of a training config that names a folder: an HF checkpoint's ModelConfig, or the one an
    IronCore checkpoint, run folder or ``latest`` pointer saved (the config loader's ``read_folder``; it sits
    below this module, so the commands hand this to it)."""
    if is_hf_folder(path):
        return model_config_from_hf(path)
    if pointers.is_checkpoint_source(path):
        try:
            folder = pointers.resolve(path)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        return load_model_config(folder / pointers.MODEL_CONFIG)
    raise ConfigError(f"{path}: a folder that is neither an HF checkpoint (config.json) nor an IronCore checkpoint "
                      "or run folder")

def export_family(cfg: ModelConfig) -> HFFamily | None:
    """The family ``cfg`` is saved as: the one its ``hf_model_type`` names, else the one record that expresses
    it; None where none does."""
    if cfg.hf_model_type is not None:
        if cfg.hf_model_type not in FAMILIES:
            raise ConfigError(f"model.hf_model_type: '{cfg.hf_model_type}' is none of {', '.join(SUPPORTED_FAMILIES)}")
        return FAMILIES[cfg.hf_model_type]
    expressing = [f for f in FAMILIES.values() if f.expresses is not None and f.expresses(cfg)]
    (family,) = expressing or [None]  # (two would be a ValueError: the records forbid it)
    return family


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for ``cfg`` as its :func:`export_family`; a ConfigError naming what HF cannot say where that
    family's round trip loses fields, or where no family expresses ``cfg`` (naming the closest one)."""
    family = export_family(cfg)
    if family is None:
        closest = min(FAMILIES.values(), key=lambda f: len(_round_trip(cfg, f)[1]))
        lost = _round_trip(cfg, closest)[1]
        if not lost:  # its read could say it, its HF model cannot (Mixtral renormalizes the routing)
            raise ConfigError(f"model '{cfg.name}' has no HF equivalent: no HF family has the features "
                              f"{', '.join(sorted(features(cfg)))} together")
        raise ConfigError(_no_equivalent(cfg, closest, lost))
    hf, lost = _round_trip(cfg, family)
    if lost:
        raise ConfigError(_no_equivalent(cfg, family, lost))
    return hf


def _no_equivalent(cfg: ModelConfig, family: HFFamily, lost: list[str]) -> str:
    return (f"model '{cfg.name}' has no HF equivalent: the closest family, {family.model_type}, cannot express "
            + ", ".join(f"{name}={getattr(cfg, name)!r}" for name in lost))


# Training settings (HF has no token dropping: an exported MoE model routes every token; LoRA adapters are
# exported as a PEFT folder beside the base, or merged into its weights).
_NOT_ARCHITECTURE = ("name", "init_std", "dropout", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_capacity_factor",
                     "kernels", "kernel_options", "lora")


def _round_trip(cfg: ModelConfig, family: HFFamily) -> tuple[dict[str, Any], list[str]]:
    """config.json for ``cfg`` as ``family``, and the fields of ``cfg`` that reading it back loses (all where
    it cannot be read back)."""
    hf = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **write_keys(cfg, COMMON_KEYS),
        "pad_token_id": None,  # a tokenizer's id, not the network's (some families' defaults lie past small vocabularies)
        "torch_dtype": "float32",
        **write_keys(cfg, family.keys),
        **family.write(cfg),
    }
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_ARCHITECTURE]
    try:
        back = model_config_from_hf(hf)
    except ConfigError:
        return hf, names
    return hf, [name for name in names if _normalised(cfg, name) != _normalised(back, name)]


def _normalised(cfg: ModelConfig, name: str) -> Any:
    """Field value with defaults made explicit, so e.g. head_dim None and 64 compare equal."""
    value = DERIVED[name](cfg) if name in DERIVED else getattr(cfg, name)
    if name == "embedding_multiplier" and value is not None:
        return round(value, 6)
    return value

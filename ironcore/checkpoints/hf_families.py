"""The HF model families IronCore reads and writes, one record each.

A record says everything family-specific about an HF checkpoint folder:

* ``model_type`` and ``architecture`` -- what ``config.json`` calls it;
* ``weights`` -- for every module of ours, the HF module(s) holding the same
  weights and how they combine: ``copy``, ``cat`` (our fused q/k/v and gate/up
  projections, concatenated along the output dimension) or ``conv1d``
  (GPT-2's transposed ``Conv1D``); loading and saving read the same table;
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


def read_rope(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from ``rope_parameters`` (transformers 5) or the older ``rope_theta``/``rope_scaling``."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError(f"{where}: unsupported rope type '{kind}' (supported: default, llama3)")


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
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
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


# ---- the records, most specific first (export uses the first that expresses a config) ----------------------------
FAMILIES: dict[str, HFFamily] = {
    family.model_type: family
    for family in (
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
    """config.json for ``cfg`` in the one HF family that expresses it exactly, else ConfigError."""
    family = next(f for f in FAMILIES.values() if f.expresses(cfg))
    hf = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        **family.write(cfg),
    }
    _check_round_trip(cfg, hf, family.model_type)
    return hf


_NOT_ARCHITECTURE = ("name", "init_std", "dropout")


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
    derived = {"num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "ffn_hidden_size": cfg.ffn_size}
    value = derived.get(name, getattr(cfg, name))
    if name == "embedding_multiplier" and value is not None:
        return round(value, 6)
    return value

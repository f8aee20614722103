"""HF Transformers checkpoints in and out: config.json + safetensors <-> ModelConfig + TransformerModel.

Each supported family is a config translation plus a table that names, for
every module of ours, the HF module(s) holding the same weights and how they
are combined: copied, concatenated along the output dimension (our fused
q/k/v and gate/up projections) or transposed (GPT-2's Conv1D). Loading and
saving both read the same table, so the two directions cannot disagree.
``transformers`` itself is never imported here: it is only a test dependency.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ironcore.config.model import ModelConfig, RopeScaling
from ironcore.errors import CheckpointError, ConfigError
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_shapes, full_state_dict, load_full_state_dict

SUPPORTED_FAMILIES = ("gpt2", "openai-gpt", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi")

_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "openai-gpt": "OpenAIGPTLMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi": "PhiForCausalLM",
}
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_OPENAI_GPT_ACTIVATION = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}  # its "gelu" is the tanh form
_GEMMA_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}
# HF keys that hold no weights of their own (old GPT-2 mask buffers, cached RoPE frequencies).
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")

# ---- weight tables: our module -> (HF module(s), how) -------------------------------------------------------
_LLAMA_TABLE = {
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
_GPT2_TABLE = {
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
_PHI_TABLE = {
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
# GPT-1 (post-norm, no final norm): GPT-2's layout under other names.
_OPENAI_GPT_TABLE = {
    **_GPT2_TABLE,
    "embed": (["transformer.tokens_embed"], "copy"),
    "pos_embed": (["transformer.positions_embed"], "copy"),
}
_TABLES = {"gpt2": _GPT2_TABLE, "openai-gpt": _OPENAI_GPT_TABLE, "phi": _PHI_TABLE}


def _table(family: str) -> dict[str, tuple[list[str], str]]:
    return _TABLES.get(family, _LLAMA_TABLE)


# ---- config translation -------------------------------------------------------------------------------------
def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of an HF checkpoint folder, with a one-line error naming the file."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (expected an HF checkpoint folder)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}:{err.lineno}: invalid JSON: {err.msg}") from None


def _family(hf: Mapping[str, Any], where: str) -> str:
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{where}: unsupported architecture '{family}' (architectures {hf.get('architectures')}); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return family


def _activation(name: str | None, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"{where}: unsupported activation '{name}' (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
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


def _sliding_window(hf: Mapping[str, Any], family: str, where: str) -> int | None:
    if family == "mistral":
        return hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "sliding_attention" for t in layer_types):
            raise ConfigError(
                f"{where}: sliding window on only some layers (max_window_layers) is not supported; "
                "use_sliding_window: false or all layers sliding are"
            )
        return hf.get("sliding_window")
    return None


def model_config_from_hf(source: str | Path | Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of an HF checkpoint folder (or of its parsed config.json)."""
    if isinstance(source, Mapping):
        return _config_from_hf(source, "config.json")
    return _config_from_hf(read_hf_config(source), str(Path(source) / "config.json"))


def _config_from_hf(hf: Mapping[str, Any], where: str) -> ModelConfig:
    family = _family(hf, where)
    name = Path(str(hf.get("_name_or_path") or family)).name or family
    try:
        if family in ("gpt2", "openai-gpt"):
            # GPT-1 is GPT-2's layout, post-norm without a final norm; its "gelu" is the tanh form.
            gpt1 = family == "openai-gpt"
            act = ("gelu_new" if hf.get("afn", "gelu") == "gelu" else hf["afn"]) if gpt1 else hf.get(
                "activation_function", "gelu_new")
            return ModelConfig(
                name=name,
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
                activation=_activation(act, where),
                attention_bias=True,
                attention_out_bias=True,
                mlp_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                init_std=hf.get("initializer_range", 0.02),
            ).validate()
        theta, scaling = _rope(hf, where)
        common = dict(
            name=name,
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
        if family == "phi":
            if hf.get("qk_layernorm"):
                raise ConfigError(f"{where}: Phi with qk_layernorm is not supported")
            return ModelConfig(
                **common,
                norm_type="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5),
                rotary_percent=hf.get("partial_rotary_factor", 0.5),
                activation=_activation(hf.get("hidden_act", "gelu_new"), where),
                parallel_attn_mlp=True,
                attention_bias=True,
                attention_out_bias=True,
                mlp_bias=True,
                lm_head_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
            ).validate()
        default_head_dim = {"qwen3": 128, "gemma": 256}.get(family)
        head_dim = hf.get("head_dim") or default_head_dim or hf["hidden_size"] // hf["num_attention_heads"]
        qkv_bias = bool(hf.get("attention_bias", False)) or family == "qwen2"
        act_name = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        return ModelConfig(
            **common,
            head_dim=head_dim,
            norm_type="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm_unit_offset=family == "gemma",
            qk_norm=family == "qwen3",
            activation=_activation(act_name, where),
            gated_mlp=True,
            attention_bias=qkv_bias,
            attention_out_bias=bool(hf.get("attention_bias", False)) and family != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window(hf, family, where),
            tie_word_embeddings=hf.get("tie_word_embeddings", family == "gemma"),
            embedding_multiplier=math.sqrt(hf["hidden_size"]) if family == "gemma" else None,
        ).validate()
    except KeyError as err:
        raise ConfigError(f"{where}: missing key {err.args[0]!r} for model_type '{family}'") from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _pick_family(cfg: ModelConfig) -> str:
    if cfg.position_embedding == "learned":
        return "openai-gpt" if cfg.norm_position == "post" else "gpt2"
    if cfg.parallel_attn_mlp:
        return "phi"
    if cfg.norm_unit_offset:
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.attention_bias and not cfg.attention_out_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for ``cfg`` in the one HF family that expresses it exactly, else ConfigError."""
    family = _pick_family(cfg)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }
    if family in ("gpt2", "openai-gpt"):
        hf.update(
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads,
            n_positions=cfg.max_position_embeddings,
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
        )
        if family == "gpt2":
            hf.update(n_inner=cfg.ffn_size, n_ctx=cfg.max_position_embeddings,
                      activation_function=_HF_ACTIVATION[cfg.activation])
        else:
            hf["afn"] = _OPENAI_GPT_ACTIVATION.get(cfg.activation, cfg.activation)
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
        hf.update(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            rope_parameters=rope,
            attention_dropout=cfg.dropout,
        )
        if cfg.rope_scaling is not None:
            hf["rope_scaling"] = rope
        if family == "phi":
            hf.update(
                layer_norm_eps=cfg.norm_eps,
                partial_rotary_factor=cfg.rotary_percent,
                hidden_act=_HF_ACTIVATION[cfg.activation],
                qk_layernorm=False,
                resid_pdrop=cfg.dropout,
                embd_pdrop=cfg.dropout,
            )
        else:
            activation = (_GEMMA_ACTIVATION if family == "gemma" else _HF_ACTIVATION)[cfg.activation]
            hf.update(
                head_dim=cfg.head_size,
                rms_norm_eps=cfg.norm_eps,
                hidden_act=activation,
                attention_bias=cfg.attention_out_bias,
                mlp_bias=cfg.mlp_bias,
            )
            if family == "gemma":
                hf["hidden_activation"] = activation
            if family in ("mistral", "qwen2", "qwen3"):
                hf["sliding_window"] = cfg.sliding_window
            if family in ("qwen2", "qwen3"):
                hf["use_sliding_window"] = cfg.sliding_window is not None
                hf["max_window_layers"] = 0
    _check_round_trip(cfg, hf, family)
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


# ---- weights --------------------------------------------------------------------------------------------------
def _hf_sources(family: str, our_name: str) -> tuple[list[str], str]:
    """HF tensor names holding our parameter ``our_name`` and how they combine."""
    module, _, kind = our_name.rpartition(".")
    match = re.match(r"layers\.(\d+)\.(.*)", module)
    key = f"layers.{{i}}.{match.group(2)}" if match else module
    if key not in _table(family):
        raise CheckpointError(f"no HF name for parameter '{our_name}' in family {family}")
    modules, how = _table(family)[key]
    index = match.group(1) if match else ""
    return [f"{m.format(i=index)}.{kind}" for m in modules], ("copy" if how == "conv1d" and kind == "bias" else how)


class _TensorFiles:
    """Lazy reader over one or several (sharded) safetensors files."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files (only safetensors checkpoints are supported)")
        self.location: dict[str, Path] = {}
        for name in files:
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():
                    self.location[key] = folder / name

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.location[key], framework="pt") as f:
            return f.get_tensor(key)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                  ) -> TransformerModel:
    """A TransformerModel with the weights of the HF checkpoint folder ``path``.

    A folder that does not exist locally is tried as a hub name (needs network).
    Missing or unexpected tensors raise CheckpointError naming them. Under
    tensor parallelism each rank builds its shard (vocab padding included).
    """
    folder = _local_folder(path)
    hf = read_hf_config(folder)
    cfg = _config_from_hf(hf, str(folder / "config.json"))
    family = hf["model_type"]
    files = _TensorFiles(folder)
    with torch.device("meta"):
        model = TransformerModel(cfg)
    state, used, missing = {}, set(), []
    for name, shape in full_shapes(model).items():
        sources, how = _hf_sources(family, name)
        absent = [s for s in sources if s not in files.location]
        if absent:
            missing.extend(absent)
            continue
        tensors = [files.get(s) for s in sources]
        used.update(sources)
        tensor = tensors[0].t() if how == "conv1d" else torch.cat(tensors, dim=0)
        if tensor.shape != shape:
            raise CheckpointError(f"{folder}: tensor {sources} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        state[name] = tensor.to(dtype=dtype, device=device).contiguous()
    unexpected = [
        k for k in files.location
        if k not in used and not _IGNORED.search(k) and not (cfg.tie_word_embeddings and k == "lm_head.weight")
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_preview(unexpected)}")
        raise CheckpointError(f"{folder}: {'; '.join(problems)}")
    load_full_state_dict(model, state)
    if model.rope is not None:
        model.rope.reset_parameters(device)
    return model.eval()


def _preview(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _local_folder(path: str | Path) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise CheckpointError(f"{path}: not an HF checkpoint folder")
    from huggingface_hub import snapshot_download  # a hub name such as "gpt2/..." : needs network

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))


def save_hf_model(
    model: TransformerModel, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write ``model`` as an HF checkpoint folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Tensors larger in total than ``max_shard_bytes`` are split into several
    files with a ``model.safetensors.index.json``, as HF does. Under tensor
    parallelism the full tensors are gathered first: every rank must call it,
    and global rank 0 writes.
    """
    cfg = model.config
    hf_config = hf_config_from_model(cfg)
    family = hf_config["model_type"]
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in full_state_dict(model).items():
        sources, how = _hf_sources(family, name)
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
        if how == "conv1d":
            pieces = [tensor.t()]
        elif how == "cat":
            pieces = tensor.split(modules[name.rpartition(".")[0]].output_parts, dim=0)
        else:
            pieces = [tensor]
        tensors.update({s: p.contiguous() for s, p in zip(sources, pieces, strict=True)})
    folder = Path(path)
    if dist.is_initialized() and dist.get_rank() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder

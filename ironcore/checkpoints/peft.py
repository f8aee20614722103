"""PEFT adapter folders in and out: ``adapter_config.json`` + ``adapter_model.safetensors`` <-> our LoRA tensors.

PEFT names an adapter by the HF module it sits on (``model.layers.0.self_attn.q_proj.lora_A.weight``, under
``base_model.model.``); ours sit on fused layers (``layers.0.attn.qkv.lora.A.weight`` holds the A of q, k and
v stacked). The HF family record's weight table (:mod:`ironcore.checkpoints.hf_families`) says which HF
modules make up each of our layers, and in which order; an adapter group of one part maps to the HF module of
that part, a group of all parts to the one fused HF module (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``). What
has no PEFT equivalent (an adapter over q, k and v together on a family with separate q/k/v modules) is a
one-line error. ``peft`` itself is never imported: it is a test dependency.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ironcore.checkpoints.hf import hf_sources
from ironcore.checkpoints.hf_families import hf_config_from_model
from ironcore.checkpoints.native import read_safetensors
from ironcore.config.model import LoRAConfig
from ironcore.errors import CheckpointError
from ironcore.files import read_json, write_text_atomically
from ironcore.layers.lora import LoRA
from ironcore.models.transformer import TransformerModel

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _tensor_names(model: TransformerModel) -> dict[str, tuple[str, slice]]:
    """PEFT key -> (our full-form tensor name, the rows of it that key holds), for every adapter of ``model``."""
    family = hf_config_from_model(model.config)["model_type"]
    names: dict[str, tuple[str, slice]] = {}
    for layer_name, layer in model.named_modules():
        lora = getattr(layer, "lora", None)
        if not isinstance(lora, LoRA):
            continue
        modules = [s.removesuffix(".weight") for s in hf_sources(family, f"{layer_name}.weight")[0]]
        parts = list(getattr(layer, "output_parts", [layer.out_features]))
        b_row = 0
        for g, group in enumerate(lora.groups):
            if len(modules) == len(parts) and len(group) == 1:
                module = modules[group[0]]
            elif len(modules) == 1 and len(group) == len(parts):
                module = modules[0]
            else:
                raise CheckpointError(f"{layer_name}: an adapter over parts {list(group)} has no PEFT equivalent in "
                                      f"{family} (its HF modules: {', '.join(modules)})")
            rows = sum(parts[p] for p in group)
            names[f"{PREFIX}{module}.lora_A.weight"] = (f"{layer_name}.lora.A.weight", slice(g * lora.rank,
                                                                                              (g + 1) * lora.rank))
            names[f"{PREFIX}{module}.lora_B.weight"] = (f"{layer_name}.lora.B.weight", slice(b_row, b_row + rows))
            b_row += rows
    return names


def _saved_names(model: TransformerModel, names: Iterable[str]) -> dict[str, str]:
    """PEFT key -> our name for the base tensors ``names`` trained in full (``modules_to_save``)."""
    family = hf_config_from_model(model.config)["model_type"]
    out = {}
    for name in names:
        sources, how = hf_sources(family, name)
        if len(sources) != 1 or how != "copy":
            raise CheckpointError(f"{name}: a fused tensor trained in full has no PEFT equivalent")
        out[f"{PREFIX}{sources[0]}"] = name
    return out


def peft_config(model: TransformerModel, base: str | None) -> dict[str, Any]:
    """``adapter_config.json`` for ``model``'s adapters."""
    cfg = model.config.lora
    family = hf_config_from_model(model.config)["model_type"]
    modules = sorted({key.removeprefix(PREFIX).rsplit(".", 2)[0].rpartition(".")[2] for key in _tensor_names(model)})
    saved = {"embed": "embed_tokens"}
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if model.config.score_head else "CAUSAL_LM",
        "base_model_name_or_path": base, "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": family == "gpt2", "init_lora_weights": True,
        "modules_to_save": [saved.get(m, m) for m in cfg.modules_to_save] or None,
    }


def write_peft_adapter(model: TransformerModel, full: dict[str, torch.Tensor], folder: str | Path,
                       base: str | None = None) -> Path:  # fmt: skip
    """Write ``model``'s adapters (``full``: its trainable tensors in full form) as a PEFT folder."""
    folder = Path(folder)
    tensors = {key: full[name][rows].contiguous() for key, (name, rows) in _tensor_names(model).items()}
    for key, name in _saved_names(model, (n for n in full if ".lora." not in n)).items():
        tensors[key] = full[name].contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().cpu() for k, t in tensors.items()}, folder / WEIGHTS, metadata={"format": "pt"})
    write_text_atomically(folder / CONFIG, json.dumps(peft_config(model, base), indent=2) + "\n")
    return folder


def lora_config_from_peft(folder: str | Path) -> tuple[LoRAConfig, str | None]:
    """The :class:`LoRAConfig` of a PEFT folder, and the base it names (``base_model_name_or_path``)."""
    path = Path(folder) / CONFIG
    hf = read_json(path, "PEFT adapter config", CheckpointError)
    if hf.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {hf.get('peft_type')!r}: only LORA adapters load")
    for key in ("use_dora", "lora_bias"):
        if hf.get(key):
            raise CheckpointError(f"{path}: {key} is not supported")
    targets = hf.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise CheckpointError(f"{path}: target_modules as a regular expression ({targets!r}) is not supported")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    saved = [{"embed_tokens": "embed"}.get(m, m) for m in hf.get("modules_to_save") or []]
    try:
        cfg = LoRAConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]), dropout=float(hf.get("lora_dropout", 0)),
                         targets=targets, use_rslora=bool(hf.get("use_rslora")),
                         modules_to_save=[m for m in saved if m != "score"])  # fmt: skip
        cfg.validate()
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a LoRA adapter config ({err})") from None
    return cfg, hf.get("base_model_name_or_path")


def read_peft_adapter(folder: str | Path, model: TransformerModel) -> dict[str, torch.Tensor]:
    """The adapter tensors of a PEFT folder in full form under our names, for ``model`` (built with its
    :func:`lora_config_from_peft`). Missing or unexpected tensors are one CheckpointError naming them."""
    path = Path(folder) / WEIGHTS
    found = {key.replace(".default.", "."): t for key, t in read_safetensors(path).items()}
    names = _tensor_names(model)
    missing = sorted(set(names) - set(found))
    if missing:
        raise CheckpointError(f"{path}: missing adapter tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    pieces: dict[str, list[torch.Tensor]] = {}
    for key, (name, _) in names.items():  # in row order: groups are listed first to last
        pieces.setdefault(name, []).append(found.pop(key))
    full = {name: torch.cat(parts) for name, parts in pieces.items()}
    saved = (n for n, p in model.named_parameters() if p.requires_grad and ".lora." not in n)
    for key, name in _saved_names(model, saved).items():
        if key in found:
            full[name] = found.pop(key)
    if found:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(found)[:3]}")
    return full

"""HF Transformers checkpoint folders in and out: config.json + safetensors <-> ModelConfig + full weights.

What differs between families (config translation, tensor names) is in
the records of :mod:`ironcore.checkpoints.hf_families`; this module applies
a record's weight table in both directions: copied, concatenated along the
output dimension (our fused q/k/v and gate/up projections) or transposed
(GPT-2's Conv1D). ``transformers`` itself is never imported here: it is only
a test dependency. To load a model from any source (HF folder, IronCore
checkpoint, run folder) use :func:`ironcore.checkpoints.load.load_model`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ironcore.checkpoints import native
from ironcore.checkpoints.hf_families import FAMILIES, hf_config_from_model
from ironcore.checkpoints.native import open_safetensors
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import CheckpointError
from ironcore.files import read_json
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_state_dict

# HF keys that hold no weights of their own (old GPT-2 mask buffers, cached RoPE frequencies).
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


def hf_sources(family: str, our_name: str, experts: int = 0) -> tuple[list[str], str]:
    """HF tensor names holding our parameter ``our_name`` and how they combine (``experts``: expert-major)."""
    table = FAMILIES[family].weights
    match = re.match(r"layers\.(\d+)\.(.*)", our_name)
    index = match.group(1) if match else ""
    generic = f"layers.{{i}}.{match.group(2)}" if match else our_name
    if generic in table:  # a parameter of its own: the experts' stacked weights
        modules, how = table[generic]
        return [m.format(i=index, j=j) for j in range(experts) for m in modules], how
    key, _, kind = generic.rpartition(".")
    if key not in table:
        raise CheckpointError(f"no HF name for parameter '{our_name}' in family {family}")
    modules, how = table[key]
    return [f"{m.format(i=index)}.{kind}" for m in modules], ("copy" if how == "conv1d" and kind == "bias" else how)


class _TensorFiles:
    """Lazy reader over one or several (sharded) safetensors files."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "safetensors index", CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map (not a safetensors index)")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files (only safetensors checkpoints are supported)")
        self.location: dict[str, Path] = {}
        for name in files:
            with open_safetensors(folder / name) as f:
                for key in f.keys():
                    self.location[key] = folder / name

    def get(self, key: str) -> torch.Tensor:
        with open_safetensors(self.location[key]) as f:
            return f.get_tensor(key)


def read_hf_weights(
    folder: Path, family: str, shapes: dict[str, torch.Size], dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Full state dict (our names and ``shapes``) from an HF folder's tensors.

    Missing, unexpected or misshapen tensors raise CheckpointError naming them.
    """
    files = _TensorFiles(folder)
    tied = "lm_head.weight" not in shapes
    state, used, missing = {}, set(), []
    for name, shape in shapes.items():
        sources, how = hf_sources(family, name, experts=shape[0])
        absent = [s for s in sources if s not in files.location]
        if absent:
            missing.extend(absent)
            continue
        tensors = [files.get(s) for s in sources]
        used.update(sources)
        if how == "experts":  # each expert's tensors concatenated, then stacked over the experts
            tensor = torch.stack([torch.cat(group) for group in _groups(tensors, shape[0])])
        else:
            tensor = tensors[0].t() if how == "conv1d" else torch.cat(tensors, dim=0)
        if tensor.shape != shape:
            raise CheckpointError(f"{folder}: tensor {sources} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        state[name] = tensor.to(dtype=dtype, device=device).contiguous()
    unexpected = [
        k for k in files.location
        if k not in used and not _IGNORED.search(k) and not (tied and k == "lm_head.weight")
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_preview(unexpected)}")
        raise CheckpointError(f"{folder}: {'; '.join(problems)}")
    return state


def export_token_ids(folder: str | Path) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` for the ``config.json`` of an export of ``folder``.

    What the HF folder the weights came from said (:func:`~ironcore.checkpoints.native.recorded_token_ids`,
    carried from the import through training), else the tokenizer's own: the BOS and EOS it declares, else its
    end-of-document token (a new document starts after it: GPT-2's convention, and what IronCore's generation
    starts an empty prompt from), the PAD it declares, else null. Without a tokenizer, only what was recorded.
    Without these, ``transformers`` takes the family's defaults (LLaMA: BOS 1, EOS 2), other tokens or none.
    """
    recorded = native.recorded_token_ids(folder)
    tokenizer = _tokenizer(folder)
    if tokenizer is None:
        return recorded
    own = {f"{name}_id": _token_id(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token")}
    for name in ("bos_token_id", "eos_token_id"):
        own[name] = tokenizer.eod_id if own[name] is None else own[name]
    return {**own, **recorded}


def generation_config(folder: str | Path, token_ids: Mapping[str, Any]) -> dict[str, Any]:
    """A ``generation_config.json`` for an export of ``folder`` that came without one: its token ids, ending
    generation where IronCore's does (at the EOS and at the tokenizer's end-of-document token)."""
    config = {key: token_ids[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
              if token_ids.get(key) is not None}  # fmt: skip
    tokenizer = _tokenizer(folder)
    eos = config.get("eos_token_id")
    if tokenizer is not None and isinstance(eos, int) and eos != tokenizer.eod_id:
        config["eos_token_id"] = [eos, tokenizer.eod_id]
    return config


def _tokenizer(folder: str | Path) -> Tokenizer | None:
    return Tokenizer.from_path(folder) if (Path(folder) / "tokenizer.json").is_file() else None


def _token_id(tokenizer: Tokenizer, name: str) -> int | None:
    token = tokenizer.special_tokens.get(name)
    return tokenizer.backend.token_to_id(token) if token else None


def _groups(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` equal consecutive groups."""
    size = len(items) // n
    return [items[k * size : (k + 1) * size] for k in range(n)]


def _preview(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def save_hf_model(
    model: TransformerModel, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
    token_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an HF checkpoint folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Tensors larger in total than ``max_shard_bytes`` are split into several
    files with a ``model.safetensors.index.json``, as HF does. Under tensor
    parallelism the full tensors are gathered first: every rank must call it,
    and global rank 0 writes. ``token_ids`` (``bos_token_id``, ``eos_token_id``,
    ``pad_token_id``; see :func:`export_token_ids`) go into ``config.json``.
    """
    cfg = model.config
    hf_config = {**hf_config_from_model(cfg), **(token_ids or {})}
    family = hf_config["model_type"]
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in full_state_dict(model).items():
        sources, how = hf_sources(family, name, experts=tensor.shape[0])
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
        owner, _, kind = name.rpartition(".")
        if how == "conv1d":
            pieces = [tensor.t()]
        elif how == "cat":
            pieces = tensor.split(modules[owner].output_parts, dim=0)
        elif how == "experts":  # [E, rows, cols] -> each expert's parts ([gate; up] split like the TP shards)
            parts = modules[owner].tp_splits[kind].parts if kind == "up" else (tensor.shape[1],)
            pieces = [p for expert in tensor for p in expert.split(list(parts), dim=0)]
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

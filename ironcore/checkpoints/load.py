"""Loading a model from anywhere: one function for HF folders, IronCore checkpoints and run folders.

A *source* is

* an HF checkpoint folder (``config.json`` + ``*.safetensors``, see
  :mod:`ironcore.checkpoints.hf`), or a hub name such as ``Qwen/Qwen3-0.6B``
  when no local folder has that name (downloaded: needs network);
* an IronCore checkpoint folder (``model.safetensors`` + ``model_config.yaml``,
  see :mod:`ironcore.checkpoints.native`), a run's ``checkpoints/`` folder or a
  run folder (its ``latest`` checkpoint).

:func:`load_model` builds the model on the meta device (no memory, no
initialisation) and assigns the weights, each rank taking its tensor-parallel
shard (:func:`load_language_model`: the same, refusing a reward model); :func:`load_weights` gives the full weights alone (for ``init.init_from``,
which the trainer assigns the same way: :func:`meta_model`, :func:`init_unloaded`),
and :func:`weight_files` the files they come from (to fingerprint them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ironcore.checkpoints import hf, native
from ironcore.checkpoints.hf_families import family_of, is_hf_folder, model_config_from_hf, read_hf_config
from ironcore.checkpoints.peft import is_peft_folder, lora_config_from_peft, read_peft_adapter
from ironcore.config.model import ModelConfig
from ironcore.errors import CheckpointError
from ironcore.models.lora import LoRA, quantize_base
from ironcore.models.transformer import TransformerModel
from ironcore.parallel.sharding import full_shapes, load_full_state_dict


def locate(source: str | Path, expect: str | None = None) -> tuple[str, Path]:
    """``("hf" | "ironcore", folder)``: what kind of source this is, and the folder holding its files.

    ``expect="hf"`` refuses anything but an HF folder or hub name (CheckpointError naming ``source``).
    """
    path = Path(source)
    if is_hf_folder(path):
        return "hf", path
    if is_peft_folder(path):
        return "peft", path
    if is_hub_name(str(source)):
        from huggingface_hub import snapshot_download  # a hub name "owner/model": needs network

        return "hf", Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
    if expect == "hf":
        raise CheckpointError(f"{source}: not an HF checkpoint folder (no config.json)")
    if not path.exists():
        raise CheckpointError(f"{source}: not found (expected an HF checkpoint folder, an IronCore checkpoint or a "
                              "run folder)")
    if not native.is_checkpoint_source(path):
        raise CheckpointError(
            f"{source}: neither an HF checkpoint folder (config.json) nor an IronCore checkpoint "
            f"({native.WEIGHTS} + {native.MODEL_CONFIG}) or run folder"
        )
    return "ironcore", native.resolve(path)


def meta_model(cfg: ModelConfig) -> TransformerModel:
    """``cfg``'s model on the meta device: no memory, nothing drawn; load weights into it (they are assigned),
    then :func:`init_unloaded`."""
    with torch.device("meta"):
        return TransformerModel(cfg)


@torch.no_grad()
def init_unloaded(model: TransformerModel, device: str | torch.device = "cpu") -> list[str]:
    """Make a meta-built model whole once its weights are loaded: the parameters the weights did not hold
    (fresh LoRA adapters, a reward model's new score head) drawn on ``device`` as ``reset_parameters`` draws
    them, and RoPE's frequencies computed. Returns the names drawn."""
    fresh = []
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(torch.empty_like(param, device=device),
                                                                   requires_grad=param.requires_grad))  # fmt: skip
            fresh.append(name)
    if "score.weight" in fresh:
        nn.init.normal_(model.score.weight, 0.0, model.config.init_std)
    for name, module in model.named_modules():
        if isinstance(module, LoRA) and f"{name}.A.weight" in fresh:
            module.reset_parameters()
    for rope in (model.rope, model.local_rope):
        if rope is not None:
            rope.reset_parameters(device)
    return fresh


def _read(
    source: str | Path, device: str | torch.device, dtype: torch.dtype | None
) -> tuple[TransformerModel, dict[str, torch.Tensor], Path]:
    """The model on the meta device, its full weights and the folder they came from (LoRA: base + adapters)."""
    kind, folder = locate(source)
    if kind == "hf":
        config = read_hf_config(folder)
        where = str(folder / "config.json")
        model = meta_model(model_config_from_hf(config, where))
        family = family_of(config, where).model_type
        state = hf.read_hf_weights(folder, family, full_shapes(model), dtype or torch.float32, device)
        return model, state, folder
    if kind == "peft":
        return _read_peft(folder, device, dtype)
    cfg, state = native.read_model(folder, device)
    if cfg.lora is not None:  # the adapters, on the base they were trained on
        record = native.read_base_record(folder)
        base = _base_source(folder, record)
        base_state = {n: t for n, t in _read(base, device, None)[1].items() if n not in state}
        native.check_base(folder, native.base_record(None, base_state)["fingerprint"], base)
        state = {**base_state, **state}
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    return meta_model(cfg), state, folder


def _base_source(folder: Path, record: dict[str, str]) -> str:
    """Where a LoRA checkpoint's base is now: as recorded (relative to the working folder), else its
    recorded absolute path; CheckpointError naming both when neither exists."""
    if not record.get("base"):
        raise CheckpointError(f"{folder / native.ADAPTER_BASE}: the adapters were trained on a seed-initialised base "
                              "(no init.init_from): there are no base weights to load them on")
    for candidate in (record.get("base"), record.get("base_path")):
        if candidate and (Path(candidate).exists() or is_hub_name(candidate)):
            return candidate
    raise CheckpointError(f"{folder / native.ADAPTER_BASE}: the base model {record.get('base')!r} "
                          f"({record.get('base_path')}) is not found: the adapters need it")


def is_hub_name(source: str) -> bool:
    """Whether ``source`` reads as an HF hub name (``owner/model``) rather than a local path."""
    path = Path(source)
    return not path.exists() and not source.startswith((".", "/")) and source.count("/") == 1


def _read_peft(folder: Path, device: str | torch.device,
               dtype: torch.dtype | None) -> tuple[TransformerModel, dict[str, torch.Tensor], Path]:  # fmt: skip
    """A PEFT adapter folder on its base (``base_model_name_or_path``, an HF folder or hub name)."""
    lora, base = lora_config_from_peft(folder)
    if not base:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: names no base_model_name_or_path")
    base_model, state, _ = _read(base, device, dtype)
    model = meta_model(dataclasses.replace(base_model.config, lora=lora))
    return model, {**state, **read_peft_adapter(folder, model)}, folder


def load_model(
    source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TransformerModel:
    """The model of ``source`` (see the module doc) in eval mode, built for the current TP layout.

    ``dtype`` converts the weights (default: as stored for IronCore
    checkpoints, float32 for HF folders).
    """
    model, state, folder = _read(source, device, dtype)
    try:
        load_full_state_dict(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    init_unloaded(model, device)
    if model.config.lora is not None and model.config.lora.quantize_base == "nf4":
        quantize_base(model)
    return model.eval()


def load_language_model(
    source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TransformerModel:
    """:func:`load_model` for what reads next-token logits (generation, evaluation): a reward model, whose
    score head gives one number per position instead, is refused in one line."""
    model = load_model(source, device, dtype)
    if model.score is not None:
        raise CheckpointError(f"{source}: a reward model (score_head), not a language model")
    return model


def load_weights(source: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The full (TP=1) weights of ``source`` under IronCore's parameter names."""
    return _read(source, device, None)[1]


def reward_model_start(weights: dict[str, torch.Tensor], model: TransformerModel) -> dict[str, torch.Tensor]:
    """A language model's weights as the start of ``model``, a reward model (``score_head``).

    As HF's ``AutoModelForSequenceClassification.from_pretrained`` of a causal LM does: the output projection
    is dropped and the score head is left to its fresh initialisation (``score.weight`` missing: load with it
    ``absent``). Weights that already have a score head are returned as they are.
    """
    if "score.weight" in weights or model.score is None:
        return weights
    return {name: tensor for name, tensor in weights.items() if not name.startswith("lm_head.")}


def weight_files(source: str | Path) -> list[Path]:
    """The files that hold ``source``'s architecture and weights (what a digest of its weights reads)."""
    kind, folder = locate(source)
    if kind == "hf":
        return [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    weights = native.weights_path(folder)
    return [folder / native.MODEL_CONFIG, *(sorted(weights.iterdir()) if weights.is_dir() else [weights])]

"""Load a training config: YAML file -> model reference resolved -> KEY=VALUE overrides -> validated Config.

Relative paths inside a config (``data.config_path``, a model YAML or HF
folder) are taken relative to the current working directory, as the README's
commands run from the repository root. A model *name* is looked up as
``model/NAME.yaml`` beside the training config, then ``configs/model/`` in the
working directory, then in the IronCore checkout itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ironcore.config.base import did_you_mean, from_dict, to_dict
from ironcore.config.model import ModelConfig
from ironcore.config.training import Config
from ironcore.errors import ConfigError
from ironcore.files import DuplicateKeyError, load_yaml_text, read_yaml

PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _model_dirs(config_dir: Path | None) -> list[Path]:
    dirs = [config_dir / "model"] if config_dir else []
    return dirs + [Path.cwd() / "configs" / "model", PACKAGE_CONFIGS / "model"]


def known_models(config_dir: Path | None = None) -> list[str]:
    """Names of the model YAMLs reachable by name."""
    names = {p.stem for d in _model_dirs(config_dir) if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


# Reads an HF checkpoint folder's model config (checkpoints.hf_families.model_config_from_folder): passed in by
# the callers that accept a folder, as the HF family records sit above the config package.
FolderReader = Callable[[Path], ModelConfig]


def load_model_config(
    spec: str | Path | Mapping[str, Any], config_dir: Path | None = None, read_folder: FolderReader | None = None
) -> ModelConfig:
    """A validated ModelConfig from a name, a model YAML, a mapping or (with ``read_folder``) an HF
    checkpoint folder, an IronCore checkpoint, run folder or ``latest`` pointer."""
    if isinstance(spec, Mapping):
        return from_dict(ModelConfig, spec, "model")
    path = Path(spec)
    if path.is_dir() or (read_folder is not None and path.is_file() and path.suffix not in (".yaml", ".yml")):
        if read_folder is None:
            raise ConfigError(f"model: {path} is a folder; an HF checkpoint folder is not accepted here "
                              "(name a model YAML or a known model)")
        return read_folder(path)
    if path.is_file():
        return _model_from_yaml(path)
    for directory in _model_dirs(config_dir):
        candidate = directory / f"{spec}.yaml"
        if candidate.is_file():
            return _model_from_yaml(candidate)
    raise ConfigError(
        f"model: '{spec}' is neither a file, an HF checkpoint folder nor a known model name"
        + (did_you_mean(str(spec), known_models(config_dir)) or f" (known: {', '.join(known_models(config_dir))})")
    )


def _model_from_yaml(path: Path) -> ModelConfig:
    data = read_yaml(path)
    try:
        return from_dict(ModelConfig, data, "model")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML: numbers, booleans, null, lists)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. optim.max_lr=3e-4")
        try:
            value = load_yaml_text(text) if text else ""
        except DuplicateKeyError as err:
            raise ConfigError(f"override '{item}': {err}") from None
        except yaml.YAMLError:
            value = text
        parsed.append((key.split("."), value))
    return parsed


def _set(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(keys)}': '{'.'.join(keys[: depth + 1])}' is not a group")
        node = child
    node[keys[-1]] = value


def build_config(
    raw: Mapping[str, Any],
    overrides: Iterable[str] = (),
    config_dir: Path | None = None,
    world_size: int | None = None,
    read_folder: FolderReader | None = None,
) -> Config:
    """Resolve the model reference (an HF folder only with ``read_folder``; ``model: {from: NAME, ...}`` is that
    model with the fields given changed), apply overrides, type-check and validate.

    With ``read_folder`` and no ``model:``, the model is the one ``init.init_from`` names (an HF folder, an
    IronCore checkpoint or run): continuing a run needs no second copy of its architecture.
    """
    raw = dict(raw)
    parsed = parse_overrides(overrides)
    for keys, value in parsed:
        if keys == ["model"]:
            raw["model"] = value
    if "model" not in raw and read_folder is not None:
        init = dict(raw["init"]) if isinstance(raw.get("init"), Mapping) else {}
        for keys, value in parsed:
            if keys == ["init", "init_from"]:
                init["init_from"] = value
        if init.get("init_from"):
            raw["model"] = str(init["init_from"])
    model = raw.get("model", {})
    if not isinstance(model, Mapping):
        model = to_dict(load_model_config(model, config_dir, read_folder))
    elif "from" in model:  # a named model (or HF folder) with some fields changed, e.g. its lora
        changed = {key: value for key, value in model.items() if key != "from"}
        model = {**to_dict(load_model_config(model["from"], config_dir, read_folder)), **changed}
    raw["model"] = dict(model)
    for keys, value in parsed:
        if keys != ["model"]:
            _set(raw, keys, value)
    cfg = from_dict(Config, raw)
    return validate_config(cfg, world_size)


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    tensor_model_parallel_size: int | None = None,
    world_size: int | None = None,
    read_folder: FolderReader | None = None,
) -> Config:
    """Read a training config file (``read_folder``: see :func:`build_config`); ConfigError messages name the
    file."""
    path = Path(path)
    overrides = list(overrides)
    if tensor_model_parallel_size is not None:
        overrides.append(f"trainer.tensor_model_parallel_size={tensor_model_parallel_size}")
    try:
        return build_config(read_yaml(path), overrides, path.parent, world_size, read_folder)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def validate_config(cfg: Config, world_size: int | None = None) -> Config:
    """Checks across groups (each group checked its own values in from_dict); fills in whichever of the
    three batch sizes was left null."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tr = cfg.trainer
    tp = tr.tensor_model_parallel_size
    if tp < 1:
        raise ConfigError(f"trainer.tensor_model_parallel_size must be >= 1, got {tp}")
    if tp > world_size:
        raise ConfigError(f"trainer.tensor_model_parallel_size {tp} is larger than the world size {world_size}")
    if world_size % tp:
        raise ConfigError(f"world size {world_size} is not a multiple of trainer.tensor_model_parallel_size {tp}")
    cfg.model.check_tensor_parallel(tp)  # heads, key/value groups, MLP and expert widths, q/k norms vs TP
    _check_muon_layout(cfg)
    if tr.data_parallel == "fsdp" and cfg.model.lora is not None and cfg.model.lora.quantize_base:
        raise ConfigError("config key 'trainer.data_parallel': fsdp does not shard QLoRA's NF4 base (use ddp: the "
                          "4-bit base is small enough to hold whole on every rank)")
    dp = world_size // tp
    if tr.micro_batch_size < 1:
        raise ConfigError(f"trainer.micro_batch_size must be >= 1, got {tr.micro_batch_size}")
    per_step = tr.micro_batch_size * dp
    if tr.gradient_accumulation_steps is None:
        if tr.train_batch_size is None:
            tr.gradient_accumulation_steps = 1
        elif tr.train_batch_size % per_step:
            raise ConfigError(
                f"trainer.train_batch_size {tr.train_batch_size} is not a multiple of "
                f"micro_batch_size {tr.micro_batch_size} x data-parallel size {dp}"
            )
        else:
            tr.gradient_accumulation_steps = tr.train_batch_size // per_step
    if tr.gradient_accumulation_steps < 1:
        raise ConfigError(f"trainer.gradient_accumulation_steps must be >= 1, got {tr.gradient_accumulation_steps}")
    expected = per_step * tr.gradient_accumulation_steps
    if tr.train_batch_size is None:
        tr.train_batch_size = expected
    elif tr.train_batch_size != expected:
        raise ConfigError(
            f"trainer.train_batch_size {tr.train_batch_size} != micro_batch_size {tr.micro_batch_size} x "
            f"gradient_accumulation_steps {tr.gradient_accumulation_steps} x data-parallel size {dp} (= {expected})"
        )
    op = cfg.operation
    if op.train_steps is None and op.train_tokens is None:
        raise ConfigError("operation: set train_steps or train_tokens")
    return cfg


def _check_muon_layout(cfg: Config) -> None:
    """Muon orthogonalises each whole weight matrix, so it needs every matrix unflattened and whole on every rank,
    or (TP-split matrices) gathered whole: not yet zero1 or bf16 (flat buffers) or fsdp (row shards)."""
    if cfg.optim.optimizer != "muon" or cfg.optim.implementation:
        return
    tr = cfg.trainer
    if tr.data_parallel in ("zero1", "fsdp"):
        raise ConfigError(f"config key 'optim.optimizer': muon is not supported with trainer.data_parallel: "
                          f"{tr.data_parallel} yet (it shards the weight matrices Muon orthogonalises); use ddp")
    if tr.precision == "bf16":
        raise ConfigError("config key 'optim.optimizer': muon is not supported with trainer.precision: bf16 yet "
                          "(its master weights are flat buffers, not matrices)")


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML; ``build_config(yaml.safe_load(text))`` gives it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

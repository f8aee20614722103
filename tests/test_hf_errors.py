"""Bad HF checkpoints fail with one line that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ironcore.checkpoints.hf import save_hf_model
from ironcore.checkpoints.hf_families import SUPPORTED_FAMILIES, hf_config_from_model
from ironcore.checkpoints.load import load_model
from ironcore.config import ConfigError, load_model_config
from ironcore.errors import CheckpointError
from ironcore.models import TransformerModel


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_hf_model(TransformerModel(load_model_config("llama-tiny")), tmp_path / "hf")


def test_unsupported_architecture_lists_the_supported_ones(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_model(hf_dir)
    message = str(info.value)
    assert "unsupported architecture 'falcon'" in message and str(hf_dir) in message
    assert all(family in message for family in SUPPORTED_FAMILIES)


def test_missing_tensor_is_named(hf_dir: Path) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(hf_dir)


def test_extra_tensor_is_named(hf_dir: Path) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.9.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.9\.mlp\.extra\.weight"):
        load_model(hf_dir)


def test_wrong_shape_is_named(hf_dir: Path) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \(7,\)"):
        load_model(hf_dir)


def test_unsupported_rope_type(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported rope type 'yarn'"):
        load_model(hf_dir)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither an HF checkpoint folder"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="missing key 'vocab_size'"):
        load_model(tmp_path)


def test_model_without_hf_equivalent_is_refused() -> None:
    cfg = load_model_config("llama-tiny")
    cfg.norm_position = "post"  # post-norm exists in HF only for GPT-1 (learned positions, LayerNorm)
    with pytest.raises(ConfigError, match="no HF equivalent.*norm_position='post'"):
        hf_config_from_model(cfg)

"""Hierarchical YAML configuration: typed groups, model references, overrides, validation."""

from ironcore.config.base import ConfigError, from_dict, to_dict
from ironcore.config.loader import build_config, dump_config, load_config, load_model_config
from ironcore.config.model import ModelConfig, RopeScaling
from ironcore.config.training import Config

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "build_config",
    "dump_config",
    "from_dict",
    "load_config",
    "load_model_config",
    "to_dict",
]

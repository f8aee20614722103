"""Every architecture YAML in configs/model loads, validates and has the published size.

Published figures are exact parameter counts of the released checkpoints (tied embeddings counted
once), rounded to 0.1M; the GPT-3 ones are the nominal sizes of Brown et al. 2020, table 2.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ironcore.config.loader import load_model_config
from ironcore.models.stats import model_stats

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))

# Millions of parameters.
PUBLISHED = {
    "gpt2-small": 124.4,
    "gpt2-medium": 354.8,
    "gpt2-large": 774.0,
    "gpt2-xl": 1557.6,
    "gpt3-125m": 125.0,
    "gpt3-350m": 350.0,
    "gpt3-760m": 760.0,
    "gpt3-1.3b": 1300.0,
    "gpt3-2.7b": 2700.0,
    "gpt3-6.7b": 6700.0,
    "gpt3-13b": 13000.0,
    "gpt3-175b": 175000.0,
    "llama-7b": 6738.4,
    "llama-13b": 13015.9,
    "llama-70b": 68976.6,
    "llama3-8b": 8030.3,
    "llama3.1-8b": 8030.3,
    "llama3.2-3b": 3212.7,
    "gemma-1-2b": 2506.2,
    "gemma-1-7b": 8537.7,
    "qwen2.5-0.5b": 494.0,
    "qwen2.5-1.5b": 1543.7,
    "qwen2.5-7b": 7615.6,
    "qwen3-0.6b": 596.0,
    "qwen3-8b": 8190.7,
    # The Hub's "2.03B" counts lm_head.weight again: the checkpoint stores it although it is tied.
    "qwen3-1.7b": 1720.6,
    "phi-1": 1418.3,
    "phi-2": 2779.7,
    "mistral-7b": 7241.7,
    "smollm-135m": 134.5,
    "smollm2-135m": 134.5,
    "gemma-2-2b": 2614.3,
    "gemma-3-1b": 999.9,
    "phi-3-mini": 3821.1,
    "phi-4-mini": 3836.0,
    "olmo-2-1b": 1484.9,
    "smollm3-3b": 3075.1,
    # Mixture of experts: every expert counted (total, not active, parameters).
    "mixtral-8x7b": 46702.8,
    "qwen3-30b-a3b": 30532.1,
    "olmoe-1b-7b": 6919.2,
}
TOLERANCE = 0.02
TINY_LIMIT = 20e6


def _is_tiny(path: Path) -> bool:
    return path.stem.endswith("-tiny")


def test_config_dir_is_populated():
    assert YAMLS, f"no model configs found in {CONFIG_DIR}"
    assert any(_is_tiny(p) for p in YAMLS)


def test_every_published_figure_has_a_config():
    stems = {p.stem for p in YAMLS}
    assert sorted(set(PUBLISHED) - stems) == []


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_config_loads_and_names_itself(path):
    cfg = load_model_config(path)
    assert cfg.name == path.stem
    assert cfg.ffn_size > 0 and cfg.head_size > 0
    if cfg.sliding_window is not None:
        assert cfg.sliding_window < cfg.max_position_embeddings


@pytest.mark.parametrize("path", [p for p in YAMLS if not _is_tiny(p)], ids=lambda p: p.stem)
def test_published_parameter_count(path):
    assert path.stem in PUBLISHED, f"add the published size of {path.stem} to PUBLISHED"
    cfg = load_model_config(path)
    got = model_stats(cfg).params / 1e6
    want = PUBLISHED[path.stem]
    assert abs(got - want) <= TOLERANCE * want, f"{path.stem}: {got:.1f}M parameters, published {want}M"


@pytest.mark.parametrize("path", [p for p in YAMLS if _is_tiny(p)], ids=lambda p: p.stem)
def test_tiny_config_is_cpu_sized(path):
    cfg = load_model_config(path)
    n = model_stats(cfg).params
    assert 0 < n < TINY_LIMIT, f"{path.stem}: {n / 1e6:.2f}M parameters"
    assert cfg.max_position_embeddings <= 1024


def test_load_by_name_matches_load_by_path():
    assert load_model_config("llama-tiny") == load_model_config(CONFIG_DIR / "llama-tiny.yaml")

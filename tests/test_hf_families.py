"""The HF family records choose the export family by themselves: no two express one config.

Each record's ``expresses`` names the network features of the configs it is saved as
(``ironcore/checkpoints/hf_families.py``); the records' order decides nothing. These tests check every
combination of features, every built-in model and a few configs of our own, and that each record's key
table reads back what it writes.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from ironcore.checkpoints.hf_families import (
    DERIVED,
    FAMILIES,
    FEATURES,
    Expresses,
    HFFamily,
    export_family,
    hf_config_from_model,
    read_keys,
    write_keys,
)
from ironcore.config import ConfigError, load_model_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "configs" / "model").glob("*.yaml"))


def _collisions(families: list[HFFamily]) -> dict[frozenset[str], list[str]]:
    """Every combination of features that more than one of ``families`` expresses."""
    found = {}
    for n in range(len(FEATURES) + 1):
        for combination in itertools.combinations(FEATURES, n):
            names = [f.model_type for f in families if f.expresses is not None and f.expresses.holds(combination)]
            if len(names) > 1:
                found[frozenset(combination)] = names
    return found


def test_no_two_records_express_one_config() -> None:
    collisions = _collisions(list(FAMILIES.values()))
    assert not collisions, f"configs two records would export: {dict(list(collisions.items())[:5])}"


def test_a_record_overlapping_another_is_caught() -> None:
    rival = dataclasses.replace(FAMILIES["qwen3"], model_type="rival", expresses=Expresses({"qk_norm"}))
    assert _collisions([*FAMILIES.values(), rival])[frozenset({"qk_norm"})] == ["qwen3", "rival"]


def test_an_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown features \\['qk_nrom'\\]"):
        Expresses({"qk_nrom"})


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_every_built_in_model_is_exported_as_exactly_one_family(path: Path) -> None:
    cfg = load_model_config(path)
    expressing = [f.model_type for f in FAMILIES.values() if f.expresses is not None and f.expresses(cfg)]
    if cfg.hf_model_type:  # named on import (Phi-3: LLaMA's network in fused tensors)
        assert len(expressing) <= 1
    else:
        assert len(expressing) == 1
    family = cfg.hf_model_type or expressing[0]
    assert export_family(cfg).model_type == family
    assert hf_config_from_model(cfg)["model_type"] == family


@pytest.mark.parametrize(("base", "changes", "family"), [
    ("llama-tiny", {}, "llama"),
    ("llama-tiny", {"qk_norm": True}, "qwen3"),
    ("llama-tiny", {"qk_norm": True, "sliding_window": 8}, "qwen3"),
    ("llama-tiny", {"sliding_window": 8}, "mistral"),
    ("llama-tiny", {"attention_bias": True}, "qwen2"),
    ("llama-tiny", {"attention_bias": True, "attention_out_bias": True}, "llama"),
    ("llama-tiny", {"num_experts": 4, "num_experts_per_token": 2}, "mixtral"),
    ("llama-tiny", {"num_experts": 4, "qk_norm": True}, "qwen3_moe"),
    ("llama-tiny", {"num_experts": 4, "qk_norm": True, "qk_norm_per_head": False, "moe_renormalize": False}, "olmoe"),
    ("gemma2-tiny", {"qk_norm": True, "rope_local_theta": 10000.0}, "gemma3_text"),
    ("gpt2-tiny", {"norm_position": "post", "final_norm": False}, "openai-gpt"),
])
def test_configs_of_our_own_are_exported_as_the_one_family_that_expresses_them(
    base: str, changes: dict, family: str
) -> None:
    cfg = dataclasses.replace(load_model_config(base), **changes)
    assert [f.model_type for f in FAMILIES.values() if f.expresses is not None and f.expresses(cfg)] == [family]
    assert hf_config_from_model(cfg)["model_type"] == family


def test_a_config_no_record_expresses_is_refused_naming_the_closest_family() -> None:
    cfg = dataclasses.replace(load_model_config("llama-tiny"), qk_norm=True, norm_unit_offset=True)  # no such family
    assert export_family(cfg) is None
    with pytest.raises(ConfigError, match="closest family, qwen3, cannot express norm_unit_offset=True$"):
        hf_config_from_model(cfg)


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_a_key_table_reads_back_what_it_writes(path: Path) -> None:
    cfg = load_model_config(path)
    table = export_family(cfg).keys
    back = read_keys(write_keys(cfg, table), "config.json", table)
    for ours, key in table.items():
        if key.written:
            assert back[ours] == (DERIVED[ours](cfg) if ours in DERIVED else getattr(cfg, ours)), ours

"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# ---- data pipeline fixtures (issue 3: tokenizer, preprocessing, data sets) ----------------------

ROOT = Path(__file__).resolve().parents[1]
# Real data lives beside the repository (CI clones it with a shared/ folder next to the clone).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLES = ROOT / "examples" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real data sets and tokenizers of ../shared/data, or skip when they are not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} not found (needs a shared/ folder beside the repository)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The GPT-2 tokenizer shipped in examples/data/gpt2."""
    from ironcore.tokenizer import Tokenizer

    return Tokenizer.from_path(EXAMPLES / "gpt2")


@pytest.fixture
def data_config(tmp_path):
    """``make(**keys)``: a DataConfig writing to tmp_path/out with the GPT-2 tokenizer, in-process."""
    from ironcore.config.base import from_dict
    from ironcore.config.data import DataConfig

    def make(**values):
        base = {
            "name": "test",
            "tokenizer": {"path": str(EXAMPLES / "gpt2")},
            "output_dir": str(tmp_path / "out"),
            "num_workers": 0,
        }
        return from_dict(DataConfig, {**base, **values})

    return make

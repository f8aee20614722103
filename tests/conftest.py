"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from run_helpers import DEVICE

# Triton kernels run on CPU tensors in Triton's interpreter, which reads this when Triton is imported: set it
# before any test imports Triton (on a CUDA machine the kernels run compiled).
if os.environ.get("IRONCORE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU's matmul peak is kept in IronCore's cache folder (training/perf.py): tests, which share the machine's
# cores, must not measure it into the user's cache (a low figure there reads as MFU above 100 %).
os.environ["IRONCORE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ironcore-test-cache-")
atexit.register(shutil.rmtree, os.environ["IRONCORE_CACHE_DIR"], ignore_errors=True)

# ---- data pipeline fixtures (issue 3: tokenizer, preprocessing, data sets) ----------------------

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
FIXTURES = ROOT / "tests" / "data"


def pytest_configure(config) -> None:
    if DEVICE not in ("cpu", "cuda"):
        pytest.exit(f"IRONCORE_TEST_DEVICE must be cpu or cuda, got {DEVICE!r}", returncode=2)
    if DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.exit("IRONCORE_TEST_DEVICE=cuda, but torch sees no CUDA device", returncode=2)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The GPT-2 tokenizer shipped in examples/data/gpt2."""
    from ironcore.data.preprocessing.tokenizer import Tokenizer

    return Tokenizer.from_path(EXAMPLES / "gpt2")


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer folder with a real chat template: GPT-2's BPE plus Qwen3's special tokens and template.

    ``<|im_start|>``/``<|im_end|>`` are special (so masks stop after the end-of-turn token);
    ``<|endoftext|>`` stays the end-of-document token and ``<|im_end|>`` is the EOS, as in Qwen3.
    """
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(EXAMPLES / "gpt2" / "tokenizer.json"))
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    backend.add_tokens(["<think>", "</think>"])
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": (FIXTURES / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def big_vocab_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer of 70,000 tokens ("w1" ... "w69999", EOD ``<|endoftext|>`` = 0)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True)])
    folder = tmp_path_factory.mktemp("big_vocab")
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def data_config(tmp_path):
    """``make(**keys)``: a DataConfig writing to tmp_path/out with the GPT-2 tokenizer, in-process."""
    from ironcore.config.base import from_dict
    from ironcore.data.preprocessing.config import DataConfig

    def make(**values):
        base = {
            "name": "test",
            "tokenizer": {"path": str(EXAMPLES / "gpt2")},
            "output_dir": str(tmp_path / "out"),
            "num_workers": 0,
        }
        return from_dict(DataConfig, {**base, **values})

    return make

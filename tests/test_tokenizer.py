"""The tokenizer wrapper: loading, identity, EOD, training a BPE, chat templates."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_file_and_folder_load_the_same_gpt2(gpt2_tokenizer) -> None:
    from_file = Tokenizer.from_path(EXAMPLES / "gpt2" / "tokenizer.json")
    assert from_file.identity == gpt2_tokenizer.identity
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eod_id == 50256 and gpt2_tokenizer.eod_token == "<|endoftext|>"
    text = "Hello world, 2 + 2 = 4.\n\tÜnïcödé ✓"
    ids = gpt2_tokenizer.encode(text)
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.encode_batch([text, "x"]) == [ids, gpt2_tokenizer.encode("x")]


def test_encode_batch_flat_concatenates(gpt2_tokenizer) -> None:
    texts = ["one two", "three", "four five six"]
    flat, lengths = gpt2_tokenizer.encode_batch_flat(texts)
    expected = gpt2_tokenizer.encode_batch(texts)
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]


def test_identity_changes_with_the_vocabulary(gpt2_tokenizer) -> None:
    trained = Tokenizer.train_bpe(["some text to learn from"] * 20, vocab_size=300)
    assert trained.identity != gpt2_tokenizer.identity
    assert len(trained.identity) == 64


def test_trained_bpe_round_trips_any_text_and_reloads(tmp_path) -> None:
    texts = ["the quick brown fox jumps over the lazy dog"] * 50
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=320)
    assert tokenizer.vocab_size <= 320
    assert tokenizer.eod_token == "<|endoftext|>" and tokenizer.eod_id == 0
    unseen = "Zebra ≠ ящик 🦊"
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen  # byte-level: nothing is unknown
    tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_path(tmp_path)
    assert reloaded.identity == tokenizer.identity and reloaded.eod_id == 0


def test_explicit_eod_token_and_bad_one(gpt2_tokenizer) -> None:
    assert Tokenizer(gpt2_tokenizer.backend, eod_token="!").eod_id == gpt2_tokenizer.encode("!")[0]
    with pytest.raises(ConfigError, match="no token '<nope>'"):
        Tokenizer(gpt2_tokenizer.backend, eod_token="<nope>")


def test_bad_paths_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        Tokenizer.from_path(tmp_path / "broken.json")


def test_no_chat_template_is_a_clear_error(gpt2_tokenizer) -> None:
    with pytest.raises(ConfigError, match="no chat template"):
        gpt2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_qwen3_chat_template_matches_transformers(chat_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    folder = chat_tokenizer_dir
    tokenizer = Tokenizer.from_path(folder)
    assert tokenizer.eod_token == "<|endoftext|>"  # the document separator, not eos_token <|im_end|>
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    reference = AutoTokenizer.from_pretrained(folder)
    for generation_prompt in (False, True):
        assert tokenizer.apply_chat_template(messages, generation_prompt) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    # Picklable for spawned workers (the transformers tokenizer is a cache, dropped and rebuilt).
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)

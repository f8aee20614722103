"""The built-in corpus (ironcore.data.demo.corpus) and the `ironcore corpus` / `ironcore tokenizer` commands."""

from __future__ import annotations

import json

import pytest

from ironcore.cli import main
from ironcore.data.demo.corpus import build_corpus, module_documents, stdlib_documents, topic_documents
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError


@pytest.fixture
def stdlib(tmp_path):
    """A small stand-in for the standard library folder."""
    root = tmp_path / "lib"
    for name, text in {
        "json/__init__.py": "import json.decoder\n",
        "json/decoder.py": "def decode(s):\n    return s\n",
        "abc.py": "class ABC:\n    pass\n",
        "test/test_abc.py": "import unittest\n",  # test suites are left out
        "site-packages/pkg.py": "x = 1\n",  # so are installed packages
        "huge.py": "x = 1\n" * 50,
        "empty.py": "\n",
    }.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_topics_are_english_docs_in_name_order():
    topics = list(topic_documents())
    assert len(topics) > 50
    assert [doc.name for doc in topics] == sorted(doc.name for doc in topics)
    assert all(doc.kind == "topic" and doc.text.strip() for doc in topics)


def test_modules_skip_tests_packages_empty_and_huge_files(stdlib):
    names = [doc.name for doc in module_documents(stdlib, max_file_bytes=100)]
    assert names == ["module:abc.py", "module:json/__init__.py", "module:json/decoder.py"]


def test_the_real_standard_library_is_found():
    documents = stdlib_documents()
    kinds = {doc.kind for doc in documents}
    assert kinds == {"topic", "module"}
    assert any(doc.name == "module:json/decoder.py" for doc in documents)
    assert not any("/test/" in doc.name or doc.name.startswith("module:test/") for doc in documents)


def test_build_is_deterministic_with_a_held_out_part(tmp_path, stdlib):
    first = build_corpus(tmp_path / "a", valid_fraction=0.2, stdlib=stdlib)
    second = build_corpus(tmp_path / "b", valid_fraction=0.2, stdlib=stdlib)
    assert first == second
    train, valid = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "valid.jsonl")
    assert train and valid
    assert not {r["name"] for r in train} & {r["name"] for r in valid}
    assert set(train[0]) == {"name", "kind", "text"}
    assert first["splits"]["train"]["documents"] == len(train)


def test_budget_keeps_each_document_in_its_split(tmp_path):
    full = build_corpus(tmp_path / "full", valid_fraction=0.1)
    small = build_corpus(tmp_path / "small", valid_fraction=0.1, max_bytes=200_000)
    assert small["splits"]["train"]["characters"] + small["splits"]["valid"]["characters"] <= 200_000
    assert small["splits"]["train"]["documents"] < full["splits"]["train"]["documents"]
    for split in ("train", "valid"):
        kept = {r["name"] for r in read_jsonl(tmp_path / "small" / f"{split}.jsonl")}
        assert kept <= {r["name"] for r in read_jsonl(tmp_path / "full" / f"{split}.jsonl")}


@pytest.mark.parametrize("kwargs", [{"valid_fraction": 0.0}, {"valid_fraction": 1.0}, {"max_bytes": 0}, {"max_bytes": 10}])
def test_bad_settings_are_config_errors(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        build_corpus(tmp_path, **kwargs)


def test_cli_corpus_then_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert main(["corpus", "--output", str(corpus), "--max-bytes", "150000"]) == 0
    assert "documents" in capsys.readouterr().out
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["settings"]["max_bytes"] == 150000

    out = tmp_path / "tok"
    args = ["tokenizer", "--source", str(corpus / "train.jsonl"), "--vocab-size", "400", "--output", str(out)]
    assert main(args) == 0
    tokenizer = Tokenizer.from_path(out)
    assert tokenizer.vocab_size == 400
    assert tokenizer.eod_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"


def test_cli_tokenizer_rejects_a_tiny_vocabulary(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n")
    args = ["tokenizer", "--source", str(tmp_path / "a.txt"), "--vocab-size", "100", "--output", str(tmp_path / "t")]
    assert main(args) == 2
    assert "--vocab-size must be at least 257" in capsys.readouterr().err

"""Preprocessing: splits, re-runs, worker/chunking invariance, interrupted runs, each bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ironcore.data.preprocessing import encode, sources
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.errors import ConfigError, DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _all_tokens(prefix: Path) -> list[list[int]]:
    data = IndexedDataset(prefix)
    return [data[i].tolist() for i in range(len(data))]


def test_pretrain_jsonl_with_valid_split(tmp_path, data_config, gpt2_tokenizer) -> None:
    rows = [{"text": f"document number {i} says hello"} for i in range(200)]
    config = data_config(source={"path": str(_jsonl(tmp_path / "c.jsonl", rows))}, valid_fraction=0.1)
    metadata = preprocess(config, progress=False)
    train, valid = metadata["splits"]["train"], metadata["splits"]["valid"]
    assert train["documents"] + valid["documents"] == 200
    assert abs(valid["documents"] - 20) <= 1  # low-discrepancy: the share is off by a record at most
    got = _all_tokens(tmp_path / "out" / "train") + _all_tokens(tmp_path / "out" / "valid")
    expected = [gpt2_tokenizer.encode(r["text"]) + [gpt2_tokenizer.eod_id] for r in rows]
    assert sorted(got) == sorted(expected)
    assert metadata["tokenizer"] == {
        "identity": gpt2_tokenizer.identity,
        "vocab_size": 50257,
        "eod_id": 50256,
        "eod_token": "<|endoftext|>",
        "eos_id": 50256,
        "eos_token": "<|endoftext|>",
        "dtype": "uint16",
    }
    assert metadata["counts"]["records"] == 200
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_append_eod_false_and_line_documents(tmp_path, data_config, gpt2_tokenizer) -> None:
    (tmp_path / "lines.txt").write_text("first line\nsecond line\n\nfourth\n", encoding="utf-8")
    config = data_config(
        source={"path": str(tmp_path / "lines.txt"), "document_split": "line"}, append_eod=False
    )
    metadata = preprocess(config, progress=False)
    assert _all_tokens(tmp_path / "out" / "train") == gpt2_tokenizer.encode_batch(
        ["first line", "second line", "fourth"]
    )
    assert metadata["counts"]["empty"] == 1


@pytest.mark.parametrize("split", ["paragraph", "line", "file"])
def test_output_is_independent_of_workers_and_chunk_size(tmp_path, data_config, monkeypatch, split) -> None:
    text = "Alpha beta.\n\n\n  \nGamma\ndelta.\n \n\nEpsilon\n\n" * 40
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text("Zeta eta.\n\nTheta.", encoding="utf-8")
    results = []
    for workers, chunk_bytes in ((0, 1 << 20), (2, 37), (1, 5)):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk_bytes)  # forked workers inherit it
        out = tmp_path / f"out_{workers}_{chunk_bytes}"
        config = data_config(
            source={"path": str(tmp_path / "*.txt"), "document_split": split},
            num_workers=workers,
            output_dir=str(out),
            valid_fraction=0.2,
        )
        metadata = preprocess(config, progress=False)
        results.append(
            (_all_tokens(out / "train"), _all_tokens(out / "valid"), metadata["counts"], metadata["splits"])
        )
    assert results[0] == results[1] == results[2]
    expected_docs = {"paragraph": 40 * 3 + 2, "line": text.count("\n") + 3, "file": 2}[split]
    train, valid, counts, _ = results[0]
    assert len(train) + len(valid) + counts.get("empty", 0) == expected_docs


def test_rerun_is_a_noop_and_a_change_rebuilds(tmp_path, data_config) -> None:
    source = _jsonl(tmp_path / "c.jsonl", [{"text": "hello world"}] * 5)
    config = data_config(source={"path": str(source)})
    first = preprocess(config, progress=False)
    shard = tmp_path / "out" / "train.bin"
    stamp = shard.stat().st_mtime_ns
    assert preprocess(config, progress=False)["fingerprint"] == first["fingerprint"]
    assert shard.stat().st_mtime_ns == stamp  # untouched
    # num_workers does not change the output, so it does not trigger a rebuild either
    assert (
        preprocess(data_config(source={"path": str(source)}, num_workers=1), progress=False)["created"]
        == first["created"]
    )
    # a changed config rebuilds
    changed = preprocess(data_config(source={"path": str(source)}, append_eod=False), progress=False)
    assert changed["fingerprint"] != first["fingerprint"] and changed["splits"]["train"]["tokens"] == 10
    # a changed source rebuilds
    _jsonl(source, [{"text": "hello world"}] * 7)
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    assert (
        preprocess(data_config(source={"path": str(source)}, append_eod=False), progress=False)["splits"][
            "train"
        ]["documents"]
        == 7
    )


def test_interrupted_run_leaves_previous_output_intact(tmp_path, data_config, monkeypatch) -> None:
    source = _jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    preprocess(data_config(source={"path": str(source)}), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}

    calls = {"n": 0}
    original = encode.PretrainEncoder.encode

    def crash_on_second_chunk(self, records, counts, warnings):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, records, counts, warnings)

    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    monkeypatch.setattr(encode.PretrainEncoder, "encode", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        preprocess(data_config(source={"path": str(source)}, append_eod=False), progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]  # no temporary folder left


def test_first_interrupted_run_leaves_no_output(tmp_path, data_config, monkeypatch) -> None:
    source = _jsonl(tmp_path / "c.jsonl", [{"text": "x"}, {"text": 5}])
    with pytest.raises(DataError):
        preprocess(data_config(source={"path": str(source)}), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no usable records"):
        preprocess(
            data_config(source={"path": str(_jsonl(tmp_path / "e.jsonl", [{"text": " "}]))}), progress=False
        )


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, data_config) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    source = _jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="is not a preprocessed data set"):
        preprocess(data_config(source={"path": str(source)}), progress=False)
    assert (tmp_path / "out" / "precious.txt").exists()


# ---- bad input ---------------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path, data_config) -> None:
    source = _jsonl(
        tmp_path / "c.jsonl", [{"text": "ok"}, "", {"text": "fine"}, '{"text": "broken', {"text": "z"}]
    )
    with pytest.raises(DataError, match=r"c\.jsonl:4: malformed JSON"):
        preprocess(data_config(source={"path": str(source)}, num_workers=2), progress=False)
    metadata = preprocess(data_config(source={"path": str(source)}, on_bad_record="skip"), progress=False)
    assert metadata["counts"]["bad_records"] == 1
    assert metadata["splits"]["train"]["documents"] == 3


def test_missing_and_wrong_type_fields(tmp_path, data_config) -> None:
    source = _jsonl(
        tmp_path / "c.jsonl", [{"content": "a"}, {"content": "b"}, {"other": "c"}, {"content": ["d"]}]
    )
    with pytest.raises(DataError, match=r"c\.jsonl:3: field 'content' \(fields\.text\) is missing"):
        preprocess(data_config(source={"path": str(source)}, fields={"text": "content"}), progress=False)
    config = data_config(source={"path": str(source)}, fields={"text": "content"}, on_bad_record="skip")
    assert preprocess(config, progress=False)["counts"]["bad_records"] == 2
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'text' \(fields\.text\) is missing"):
        preprocess(data_config(source={"path": str(source)}), progress=False, force=True)


def test_empty_documents_are_skipped_and_counted(tmp_path, data_config) -> None:
    source = _jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": ""}, {"text": " \n\t"}, {"text": "b"}])
    metadata = preprocess(data_config(source={"path": str(source)}), progress=False)
    assert metadata["counts"]["empty"] == 2 and metadata["splits"]["train"]["documents"] == 2


def test_non_utf8_text_and_jsonl(tmp_path, data_config) -> None:
    (tmp_path / "t.txt").write_bytes(b"good paragraph\n\nline two\nbad \xff byte\n\nlast")
    with pytest.raises(DataError, match=r"t\.txt:4: not valid UTF-8 \(byte 0xff\)"):
        preprocess(data_config(source={"path": str(tmp_path / "t.txt")}), progress=False)
    metadata = preprocess(
        data_config(source={"path": str(tmp_path / "t.txt")}, on_bad_record="skip"), progress=False
    )
    assert metadata["counts"]["bad_records"] == 1 and metadata["splits"]["train"]["documents"] == 2
    (tmp_path / "j.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"j\.jsonl:2: not valid UTF-8"):
        preprocess(
            data_config(source={"path": str(tmp_path / "j.jsonl")}, output_dir=str(tmp_path / "o2")),
            progress=False,
        )


def test_long_sft_records_are_truncated_or_dropped(tmp_path, data_config) -> None:
    rows = [{"prompt": "Q: short?\n", "response": "yes"}, {"prompt": "Q: long?\n", "response": " word" * 100}]
    source = _jsonl(tmp_path / "s.jsonl", rows)
    truncated = preprocess(
        data_config(task_type="sft", source={"path": str(source)}, max_seq_length=32), progress=False
    )
    assert truncated["counts"]["truncated"] == 1
    assert IndexedDataset(tmp_path / "out" / "train").sequence_lengths.tolist()[1] == 33
    dropped = preprocess(
        data_config(task_type="sft", source={"path": str(source)}, max_seq_length=32, on_long_record="drop"),
        progress=False,
    )
    assert dropped["counts"]["dropped_too_long"] == 1 and dropped["splits"]["train"]["documents"] == 1
    # A prompt that fills the whole window leaves nothing to train: dropped and counted.
    source = _jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 100, "response": "yes"}, rows[0]])
    config = data_config(task_type="sft", source={"path": str(source)}, max_seq_length=32)
    assert preprocess(config, progress=False)["counts"]["no_trained_tokens"] == 1


def test_text_files_are_rejected_for_sft(tmp_path, data_config) -> None:
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ConfigError, match="must hold records"):
        preprocess(data_config(task_type="sft", source={"path": str(tmp_path / "t.txt")}), progress=False)


def test_data_config_errors_name_the_file_and_key(tmp_path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: invalid YAML"):
        load_data_config(bad_yaml)
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "name: x\nsource: {path: a.jsonl}\ntokenizer: {path: t}\noutput_dir: o\nmax_seq_lenght: 5\n"
    )
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown config key 'max_seq_lenght' \(did you mean"):
        load_data_config(typo)
    good = tmp_path / "good.yaml"
    good.write_text("name: x\nsource: {path: a.jsonl}\ntokenizer: {path: t}\noutput_dir: o\n")
    assert load_data_config(good, ["num_workers=3", "tokenizer.eod_token=</s>"]).num_workers == 3
    with pytest.raises(ConfigError, match="exactly one of 'path', 'hf_name' or 'train'"):
        load_data_config(good, ["tokenizer.hf_name=gpt2"])
    with pytest.raises(ConfigError, match="fields.question"):
        load_data_config(good, ["fields.question=q"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_data_config(good, ["num_workers"])
    with pytest.raises(ConfigError, match="no such|cannot read"):
        load_data_config(tmp_path / "absent.yaml")


def test_example_configs_load() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs" / "data").glob("*.yaml")):
        config = load_data_config(path)
        assert config.output_dir.startswith("data/preprocessed/")


def test_metadata_is_required_to_read(tmp_path) -> None:
    with pytest.raises(DataError, match="run ironcore preprocess"):
        load_metadata(tmp_path)


def test_vocab_too_large_for_uint16_uses_int32(tmp_path, data_config, big_vocab_tokenizer_dir) -> None:
    source = _jsonl(tmp_path / "c.jsonl", [{"text": "w69999 w3 w65536"}])
    config = data_config(source={"path": str(source)}, tokenizer={"path": str(big_vocab_tokenizer_dir)})
    metadata = preprocess(config, progress=False)
    assert metadata["tokenizer"]["dtype"] == "int32" and metadata["tokenizer"]["vocab_size"] == 70_000
    data = IndexedDataset(tmp_path / "out" / "train")
    assert data.dtype == np.int32 and data[0].tolist() == [69999, 3, 65536, 0]

"""Inspection reports and the ``ironcore preprocess`` command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ironcore.cli import preprocess as preprocess_cli
from ironcore.data.demo.inspect import inspect_dataset
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"


def _run_cli(*argv: str) -> int:
    """Run only our sub-command's parser (independent of the other sub-commands' modules)."""
    parser = argparse.ArgumentParser(prog="ironcore")
    preprocess_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["preprocess", *argv])
    return args.func(args)


def test_sft_inspection_report(tmp_path, data_config) -> None:
    config = data_config(
        task_type="sft",
        source={"path": str(EXAMPLES / "gsm8k" / "gsm8k_train_300.jsonl")},
        fields={"prompt": "question", "response": "answer"},
        prompt_template="Question: {prompt}\nAnswer:\n",
        max_seq_length=128,
        valid_fraction=0.1,
    )
    metadata = preprocess(config, progress=False)
    report = inspect_dataset(config.output_dir, num_samples=3)
    folder = Path(config.output_dir) / "inspect"
    assert json.loads((folder / "report.json").read_text()) == report
    assert (folder / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = report["splits"]["train"]
    assert train["documents"] == metadata["splits"]["train"]["documents"]
    assert train["trained_share"] == round(metadata["splits"]["train"]["trained_tokens"] / train["tokens"], 4)
    at_limit = sum(entry["tokens_at_length_limit"] for entry in report["splits"].values())
    assert at_limit >= metadata["counts"]["truncated"] > 0  # truncated ones, plus any exactly that long
    assert train["tokens_length"]["p100"] == 129
    assert 0 < train["vocab_coverage"] < 1
    page = (folder / "report.html").read_text()
    assert page.count('<span class="trained">') >= 3 and page.count('<span class="prompt">Question:') >= 3


def test_dpo_report_shows_the_prompt_once_and_each_trained_response(tmp_path, data_config, chat_tokenizer_dir) -> None:
    question = [{"role": "user", "content": "What color is the sky?"}]
    rows = [{"prompt": question, "chosen": [{"role": "assistant", "content": f"Blue, {i}."}],
             "rejected": [{"role": "assistant", "content": f"Green, {i}."}]} for i in range(3)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = data_config(task_type="dpo", source={"path": str(source)}, tokenizer={"path": str(chat_tokenizer_dir)})
    preprocess(config, progress=False)
    inspect_dataset(config.output_dir, num_samples=3)
    page = (Path(config.output_dir) / "inspect" / "report.html").read_text()
    assert page.count('<span class="label">prompt:</span>') == 3 and page.count("What color is the sky?") == 3
    for i in range(3):  # each response after its label, trained through the end of turn
        for side, answer in (("chosen", "Blue"), ("rejected", "Green")):
            assert (f'<span class="label">{side}:</span>\n<span class="trained">&lt;think&gt;\n\n&lt;/think&gt;\n\n'
                    f'{answer}, {i}.&lt;|im_end|&gt;\n</span>') in page


def test_cli_builds_inspects_and_reruns(tmp_path, capsys) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text(
        (EXAMPLES / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60000], encoding="utf-8"
    )
    config = tmp_path / "data.yaml"
    config.write_text(
        f"name: mini\nsource: {{path: {source}}}\ntokenizer: {{train: {{vocab_size: 400}}}}\n"
        f"max_seq_length: 64\nvalid_fraction: 0.1\noutput_dir: {tmp_path / 'out'}\nnum_workers: 1\n"
    )
    assert _run_cli("--config", str(config), "--inspect", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "train:" in out and "vocab coverage" in out and "report.html" in out
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["tokenizer"]["vocab_size"] <= 400 and (tmp_path / "out" / "tokenizer.json").exists()
    assert _run_cli("--config", str(config), "--only-inspect") == 0
    created = metadata["created"]
    assert _run_cli("--config", str(config), "--no-progress") == 0  # up to date: nothing rebuilt
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["created"] == created
    with pytest.raises(UserError, match="max_seq_lenght"):
        _run_cli("--config", str(config), "max_seq_lenght=3")


def test_only_inspect_without_output_is_an_error(tmp_path) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(
        f"name: x\nsource: {{path: a.txt}}\ntokenizer: {{path: t}}\noutput_dir: {tmp_path / 'none'}\n"
    )
    with pytest.raises(DataError, match="run ironcore preprocess"):
        _run_cli("--config", str(config), "--only-inspect")


def test_example_config_runs_verbatim(tmp_path) -> None:
    """`ironcore preprocess --config configs/data/pretrain_example.yaml`, from a copy of the repo layout."""
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    config = (ROOT / "configs" / "data" / "pretrain_example.yaml").read_text()
    (tmp_path / "configs" / "data" / "pretrain_example.yaml").write_text(config)
    command = [
        sys.executable,
        "-c",
        "from ironcore.cli.preprocess import *; import sys, argparse;"
        "p = argparse.ArgumentParser(); register(p.add_subparsers());"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
        "preprocess",
        "--config",
        "configs/data/pretrain_example.yaml",
        "--inspect",
        "--no-progress",
    ]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "preprocessed" / "tinyshakespeare" / "inspect" / "report.html").exists()

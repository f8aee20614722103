"""The ``ironcore`` command: help for every sub-command, one-line errors, convert and model-info."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ironcore.checkpoints.load import load_model
from ironcore.checkpoints.native import save_model
from ironcore.cli import main
from ironcore.cli.reference import render
from ironcore.config import load_model_config
from ironcore.models import TransformerModel

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["preprocess", "train", "eval", "generate", "convert", "model-info", "config-reference"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: ironcore" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "ironcore", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and all(c in out.stdout for c in SUBCOMMANDS)


def test_model_info_answers_for_70b_without_allocating(capsys) -> None:
    assert main(["model-info", "--model", "llama-70b"]) == 0
    out = capsys.readouterr().out
    assert "68,976,648,192" in out
    assert main(["model-info", "--config", str(ROOT / "configs/example.yaml"), "--json"]) == 0
    assert '"name": "gpt2-tiny"' in capsys.readouterr().out


def test_bad_config_is_one_line_on_stderr_with_exit_2(capsys) -> None:
    code = main(["train", "--config", str(ROOT / "configs/example.yaml"), "trainer.micro_batch_sise=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "did you mean 'micro_batch_size'" in err


def test_generate_from_missing_checkpoint_is_one_line(capsys) -> None:
    assert main(["generate", "--checkpoint", "does-not-exist", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ironcore generate: error:") and "\n" not in err


def test_convert_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransformerModel(load_model_config("qwen3-tiny"))
    save_model(model, tmp_path / "ckpt")
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(load_model(tmp_path / "back")(ids), expected)
        assert torch.equal(load_model(tmp_path / "hf")(ids), expected)


def test_convert_of_missing_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["convert", "--from-hf", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "not an HF checkpoint folder" in capsys.readouterr().err


def test_committed_config_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == render(), "regenerate with: ironcore config-reference > docs/config-reference.md"


def test_convert_carries_the_tokenizer(tmp_path: Path) -> None:
    model = TransformerModel(load_model_config("gpt2-tiny"))
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text((ROOT / "examples/data/gpt2/tokenizer.json").read_text())
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

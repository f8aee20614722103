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


def test_overrides_may_come_before_between_and_after_options(capsys) -> None:
    """`train --config C KEY=V --tensor-model-parallel-size 1 KEY2=V2` (torchrun users write it so) used to stop
    at "unrecognized arguments: KEY2=V2"; every sub-command with KEY=VALUE arguments takes them anywhere."""
    from ironcore.cli import build_parser
    from ironcore.cli.common import config_from_args

    example = str(ROOT / "configs/example.yaml")
    args = build_parser().parse_args(["train", "optim.max_lr=1e-4", "--config", example, "trainer.micro_batch_size=2",
                                      "--tensor-model-parallel-size", "1", "operation.train_steps=7"])
    cfg = config_from_args(args)
    assert (cfg.optim.max_lr, cfg.trainer.micro_batch_size, cfg.operation.train_steps) == (1e-4, 2, 7)
    assert cfg.trainer.tensor_model_parallel_size == 1
    # Through main: the override after the option is read (its mistake is the error), not refused as unrecognized.
    assert main(["train", "--config", example, "optim.max_lr=1e-4", "--tensor-model-parallel-size", "1",
                 "trainer.micro_batch_sise=2"]) == 2
    assert "did you mean 'micro_batch_size'" in capsys.readouterr().err
    args = build_parser().parse_args(["preprocess", "--config", "d.yaml", "a=1", "--force", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.force
    args = build_parser().parse_args(["synthetic", "--task", "addition", "digits=2", "--output", "o", "x=1"])
    assert args.options == ["digits=2", "x=1"]
    with pytest.raises(SystemExit):  # an unknown option is still refused
        build_parser().parse_args(["train", "--config", example, "a=1", "--bogus", "b=2"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_generate_from_missing_checkpoint_is_one_line(capsys) -> None:
    assert main(["generate", "--checkpoint", "does-not-exist", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ironcore generate: error:") and "\n" not in err


def test_user_files_that_are_not_utf8_are_one_line_naming_the_file_and_byte(tmp_path: Path, capsys) -> None:
    """`generate --prompts-file` of a Latin-1 file was a UnicodeDecodeError; so was a tokenizer folder's
    chat_template.jinja."""
    from ironcore.data.tokenizer import Tokenizer
    from ironcore.errors import ConfigError

    for name in ("prompts.txt", "prompts.jsonl"):
        (tmp_path / name).write_bytes(b'"caf\xe9"\n')
        assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompts-file", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err == (f"ironcore generate: error: {tmp_path / name}: not UTF-8 text (byte 4); "
                                           "the prompts file must be saved as UTF-8\n")
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((ROOT / "examples/data/gpt2/tokenizer.json").read_bytes())
    (folder / "chat_template.jinja").write_bytes(b"{{ '\xe9' }}\r\n")
    with pytest.raises(ConfigError, match=r"chat_template\.jinja: not UTF-8 text \(byte 4\)"):
        Tokenizer.from_path(folder)
    (folder / "chat_template.jinja").write_bytes(b"{{ 'x' }}\r\n")
    assert Tokenizer.from_path(folder).chat_template == "{{ 'x' }}\r\n"  # read byte for byte, CRLF kept


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

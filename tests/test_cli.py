"""The ``ironcore`` command: help for every sub-command, one-line errors, convert and model-info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ironcore.checkpoints.load import load_model
from ironcore.checkpoints.native import save_model
from ironcore.cli import main
from ironcore.cli.reference import render
from ironcore.config import load_model_config
from ironcore.models import TransformerModel

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["preprocess", "train", "eval", "generate", "chat", "convert", "model-info", "config-reference"]


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
    from ironcore.data.preprocessing.tokenizer import Tokenizer
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


def test_reading_a_checkpoint_imports_no_fsdp_dcp_or_dynamo(tmp_path: Path) -> None:
    """Every command starts faster without torch's FSDP, DTensor, DCP (together 0.9 s to import) and dynamo (1.2 s):
    imported by the runs that shard, write sharded checkpoints or compile, not by loading a model (built on the
    meta device: GPT-2's learned positions, LLaMA's RoPE frequencies) or importing the trainer and generation."""
    for name in ("gpt2-tiny", "llama-tiny"):
        save_model(TransformerModel(load_model_config(name)), tmp_path / name)
    heavy = ["torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp", "torch._dynamo"]
    code = ("import sys; import ironcore.training.trainer, ironcore.inference.generate; "
            "from ironcore.checkpoints.load import load_model; "
            f"[load_model({str(tmp_path)!r} + '/' + name) for name in ('gpt2-tiny', 'llama-tiny')]; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


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


# ---- the options for a workflow manager: train --signature/--export/--mlflow-parent, eval --as-validation -----

@pytest.fixture(scope="module")
def tiny_train_config(tmp_path_factory) -> Path:
    """A 2-step run of a tiny model on a slice of tinyshakespeare (with validation data: final_eval.json)."""
    from run_helpers import TINY_MODEL, shakespeare_slice

    root = tmp_path_factory.mktemp("train")
    data = shakespeare_slice(root, 20_000)
    config = {"model": TINY_MODEL, "data": {"config_path": str(data)},
              "trainer": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "save_interval": 0,
                          "output_dir": str(root / "run")},
              "operation": {"train_steps": 2, "eval_interval": 0, "eval_steps": 1, "log_interval": 1},
              "optim": {"max_lr": 3e-3, "warmup_steps": 1}, "utils": {"tracking": False}}  # fmt: skip
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_signature_resumes_the_same_unfinished_run_and_restarts_the_others(tiny_train_config, tmp_path,
                                                                                 caplog) -> None:  # fmt: skip
    """--signature: an unfinished run of the same settings and files resumes; a finished one, or one whose
    files (or settings) changed, is cleared; --export copies the finished run's outputs."""
    run = tmp_path / "run"
    extra = tmp_path / "fingerprint.txt"
    extra.write_text("code v1\n")
    train = ["train", "--config", str(tiny_train_config), f"trainer.output_dir={run}", "--signature", str(extra),
             "--export", str(tmp_path / "out")]  # fmt: skip
    assert main(train) == 0
    for name in ("final_eval.json", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "out" / name).read_bytes() == (run / name).read_bytes()
    recorded = (run / "signature").read_text()

    (run / "final_eval.json").unlink()  # killed before the end: resumed, what the folder holds is kept
    (run / "marker").touch()
    caplog.set_level("INFO")
    assert main(train) == 0
    assert (run / "marker").exists() and "resumed from" in caplog.text and (run / "signature").read_text() == recorded
    assert main(train) == 0  # finished: trained again from scratch
    assert not (run / "marker").exists() and (run / "signature").read_text() == recorded

    (run / "final_eval.json").unlink()
    (run / "marker").touch()
    extra.write_text("code v2\n")  # another signature: cleared although unfinished
    assert main(train) == 0
    assert not (run / "marker").exists() and (run / "signature").read_text() != recorded
    changed = (run / "signature").read_text()
    (run / "final_eval.json").unlink()
    (run / "marker").touch()
    assert main([*train, "optim.max_lr=1e-3"]) == 0  # a hyperparameter is part of the signature
    assert not (run / "marker").exists() and (run / "signature").read_text() != changed


def test_train_signature_never_clears_a_folder_that_holds_no_run(tiny_train_config, tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(tiny_train_config), f"trainer.output_dir={tmp_path}", "--signature",
                 str(tiny_train_config)]) == 2  # fmt: skip
    assert "holds files but no training run: refusing to clear it" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["train", "--config", str(tiny_train_config), f"trainer.output_dir={tmp_path / 'r'}", "--signature",
                 str(tmp_path / "missing")]) == 2  # fmt: skip
    assert "missing: no such file or directory" in capsys.readouterr().err


def test_train_signature_is_the_one_the_pipeline_computed_with_sha256sum(tiny_train_config, tmp_path) -> None:
    """An unfinished run of the former shell rule (`echo DIGEST | cat - DATA CODE | sha256sum`) still resumes."""
    import hashlib

    from ironcore.cli.train import signature
    from ironcore.config import load_config, to_dict

    cfg = load_config(tiny_train_config)
    settings = to_dict(cfg)
    settings.pop("utils")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    files = [tmp_path / "a.json", tmp_path / "b.sha256"]
    files[0].write_text('{"x": 1}\n')
    files[1].write_bytes(b"\x00\xffcode\n")
    done = subprocess.run(f"echo {digest} | cat - {files[0]} {files[1]} | sha256sum | cut -c1-16", shell=True,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert signature(cfg, [str(f) for f in files]) == done.stdout.strip()


@pytest.mark.slow
def test_train_under_torchrun_clears_the_stale_run_on_rank_zero_first(tiny_train_config, tmp_path) -> None:
    """Two processes: rank 0 clears the run of another signature while rank 1 waits, then both train."""
    from run_helpers import launch_train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "signature").write_text("0123456789abcdef\n")
    (run / "marker").touch()
    launch_train(tiny_train_config, 2, f"trainer.output_dir={run}", "--signature", str(tiny_train_config),
                 "--export", str(tmp_path / "out"), "--threads", "2")  # fmt: skip
    assert not (run / "marker").exists() and (run / "signature").read_text() != "0123456789abcdef\n"
    assert json.loads((tmp_path / "out" / "final_eval.json").read_text())["step"] == 2


def test_train_mlflow_parent_and_mlflow_finish(tiny_train_config, tmp_path, monkeypatch) -> None:
    """--mlflow-parent NAME: the training run is a child of NAME's parent run of this invocation;
    `ironcore mlflow finish` logs the eval results to the parent and closes it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("IRONCORE_PIPELINE_INVOCATION", "inv1")
    monkeypatch.setenv("IRONCORE_MLFLOW_EXPERIMENT", "pipe")
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny_train_config), f"trainer.output_dir={run}", "--mlflow-parent", "x",
                 "utils.tracking=true", "utils.experiment_name=pipe", "utils.run_name=x/train"]) == 0  # fmt: skip
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID")  # set for the trainer's tracker
    assert main(["mlflow", "finish", "--run", "x", "--eval", str(run / "final_eval.json"), "--config",
                 str(run / "config.yaml"), "--artifacts", "train", str(run / "metrics.jsonl")]) == 0  # fmt: skip
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("pipe").experiment_id])}
    assert set(runs) == {"x", "x/train"}
    parent, child = runs["x"], runs["x/train"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["pipeline_invocation"] == "inv1" and parent.info.status == "FINISHED"
    assert parent.data.metrics["val/loss"] == json.loads((run / "final_eval.json").read_text())["val_loss"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["train"]
    # The experiment (made by the pipeline's parent run) keeps its artifacts beside the store, not in the cwd.
    assert client.get_experiment_by_name("pipe").artifact_location == (tmp_path / "mlruns").as_uri()


def test_a_sweeps_points_are_children_of_its_run_and_a_failed_points_run_is_taken_over(tmp_path, monkeypatch,
                                                                                       capsys) -> None:  # fmt: skip
    """`ironcore mlflow parent --sweep S`: the point's parent run is a child of one run per sweep, which lasts
    across invocations; a point's run a failed invocation left (closed FAILED) is continued by the next one; the
    sweep's summary goes to the sweep's run, which `mlflow sweep` closes."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("IRONCORE_MLFLOW_EXPERIMENT", "pipe")

    def parent(invocation: str, point: str) -> str:
        capsys.readouterr()
        assert main(["mlflow", "--invocation", invocation, "parent", "--run", point, "--sweep", "lr"]) == 0
        return capsys.readouterr().out.strip()

    first, other = parent("inv1", "lr-max_lr=0.1"), parent("inv1", "lr-max_lr=0.2")
    assert main(["mlflow", "--invocation", "inv1", "close", "--status", "FAILED"]) == 0
    assert parent("inv2", "lr-max_lr=0.1") == first  # taken over, not a second child
    summary = tmp_path / "summary.md"
    summary.write_text("# sweep lr\n")
    assert main(["mlflow", "--invocation", "inv2", "sweep", "--sweep", "lr", "--artifacts", "summary", str(summary)]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pipe").experiment_id
    (sweep,) = client.search_runs([experiment], "tags.pipeline_sweep_run = 'lr'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(run.info.run_id for run in children) == sorted([first, other]) and first != other
    assert client.get_run(first).data.tags["pipeline_invocation"] == "inv2"
    assert client.get_run(first).info.status == "RUNNING" and client.get_run(other).info.status == "FAILED"
    assert sweep.info.status == "FINISHED" and sweep.info.run_name == "sweep_lr"
    assert [a.path for a in client.list_artifacts(sweep.info.run_id, "summary")] == ["summary/summary.md"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder of a tiny random model with its BPE, and a synthetic task folder whose answers are the
    model's own greedy completions for half the prompts (so the accuracy is neither 0 nor 1)."""
    from ironcore.checkpoints import native
    from ironcore.config.model import ModelConfig
    from ironcore.data.preprocessing.tokenizer import Tokenizer
    from ironcore.evaluation.tasks import complete

    root = tmp_path_factory.mktemp("synthetic")
    task = root / "task"
    assert main(["synthetic", "--task", "addition", "--output", str(task), "--train", "40", "--heldout", "12"]) == 0
    rows = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.train_bpe([r["prompt"] + r["answer"] for r in rows], vocab_size=280)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, position_embedding="rope", norm_type="rmsnorm")  # fmt: skip
    model = TransformerModel(cfg)
    with torch.no_grad():  # sharp logits (tied embedding): samples at temperature 0.7 are often the greedy tokens
        model.embed.weight.mul_(8.0)
    folder = native.save_model(model, root / "run" / "checkpoints" / "step_0000005")
    tokenizer.save(folder)
    (folder / native.TRAINER_STATE).write_text(json.dumps({"step": 5}))
    (root / "run" / "checkpoints" / "latest").write_text("step_0000005")
    heldout = [json.loads(line) for line in (task / "heldout.jsonl").read_text().splitlines()]
    prompts = [tokenizer.backend.encode(r["prompt"], add_special_tokens=True).ids for r in heldout]
    greedy = complete(model.eval(), tokenizer, prompts, 3, [], 0.0, 0, 8)
    for i, (record, text) in enumerate(zip(heldout, greedy, strict=True)):
        record["answer"] = text if i % 2 == 0 else record["answer"]
    (task / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    return root / "run", task


def test_eval_as_validation_computes_what_rl_eval_did(synthetic_run, tmp_path, capsys) -> None:
    """`eval --task synthetic=DIR --as-validation --pass-at K ...`: the numbers and names of the pipeline's former
    rl_eval.py (the synthetic task with samples=K, pass_at=[K] and the settings given), and its Markdown table."""
    from ironcore.evaluation.task_config import load_task
    from ironcore.evaluation.tasks import evaluate_task, load_for_eval

    run, task_dir = synthetic_run
    task = load_task(f"synthetic={task_dir}")  # what rl_eval.py computed
    task.samples, task.pass_at = 3, [3]
    task.max_new_tokens, task.temperature, task.seed, task.batch_size = 3, 0.7, 2, 5
    details: list[dict] = []
    metrics = evaluate_task(*load_for_eval(run), task, details=details)
    expected = {"step": 5, "prompts": 12, "val_accuracy": metrics["accuracy"], "val_pass_at_3": metrics["pass_at_3"],
                "eval/synthetic/accuracy": metrics["accuracy"], "eval/synthetic/pass_at_3": metrics["pass_at_3"]}
    assert 0 < metrics["accuracy"] < 1

    out, table = tmp_path / "e.json", tmp_path / "e.md"
    assert main(["eval", "--checkpoint", str(run), "--task", f"synthetic={task_dir}", "--as-validation", "--pass-at",
                 "3", "--max-new-tokens", "3", "--temperature", "0.7", "--seed", "2", "--micro-batch-size", "5",
                 "--no-mlflow", "--output", str(out), "--samples-markdown", str(table)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert {key: value for key, value in result.items() if key not in ("checkpoint", "tasks")} == expected
    assert list(result)[:5] == ["checkpoint", "step", "prompts", "val_accuracy", "val_pass_at_3"]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 12 and rows[0] == f"| `{details[0]['prompt']}` | `{details[0]['completion']}` | " \
                                          f"{details[0]['score']:g} |"  # fmt: skip
    assert f"accuracy {metrics['accuracy']:.3f}, pass_at_3 {metrics['pass_at_3']:.3f}" in table.read_text()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--task", f"synthetic={task_dir}", "--task",
                 str(ROOT / "configs/eval/gsm8k.yaml"), "--as-validation"]) == 2  # fmt: skip
    assert "--as-validation reports one generation task" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--pass-at", "2"]) == 2
    assert "--pass-at is an option of --task evaluations" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--task", f"synthetic={task_dir}", "--temperature", "0"]) == 2
    assert "samples need a temperature > 0" in capsys.readouterr().err

"""The real trainer under torchrun (gloo, CPU): TP and DP runs log the same losses as one process,
and a checkpoint written at TP=2 resumes at TP=1.

``test_parallel.py`` proves the parallel pieces on a hand-written step; this file runs
``torchrun -m ironcore train`` end to end, the way users launch it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from run_helpers import launch_train, read_metrics, shakespeare_slice

from ironcore.checkpoints import native as checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "name": "tiny-gqa", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "ffn_hidden_size": 128, "max_position_embeddings": 64, "position_embedding": "rope",
    "norm_type": "rmsnorm", "gated_mlp": True, "activation": "silu", "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("ptdata"), 40_000)


LOGS: dict[Path, str] = {}  # run folder -> the training log (stderr)


def train(data_config: Path, out: Path, nproc: int, *overrides: str) -> list[dict]:
    """``[torchrun --nproc_per_node N] -m ironcore train`` with a tiny GQA model; returns its metric lines."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"config_path": str(data_config)},
        "trainer": {"micro_batch_size": 2, "output_dir": str(out), "save_interval": 5, "grad_clip": 0.5},
        "operation": {"train_steps": 10, "eval_interval": 5, "eval_steps": 2, "log_interval": 1},
        "optim": {"max_lr": 3e-3, "warmup_steps": 2}, "utils": {"tracking": False},
    }))
    LOGS[out] = launch_train(config, nproc, *overrides)
    return read_metrics(out)


def losses(lines: list[dict], key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in lines if key in m}


def assert_close(a: dict[int, float], b: dict[int, float], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        assert abs(a[step] - b[step]) <= rtol * abs(a[step]), (step, a[step], b[step])


def test_tensor_parallel_trainer_matches_one_process(data_config, tmp_path) -> None:
    """TP=2 with sequence parallelism (equal to plain TP=2: tests/test_parallel.py; plain TP=2 trains in the
    checkpoint test below)."""
    single = train(data_config, tmp_path / "tp1", 1)
    tp2 = train(data_config, tmp_path / "tp2", 2, "--tensor-model-parallel-size", "2", "trainer.sequence_parallel=true")
    assert "layout: TP 2 x DP 1, sequence parallel" in LOGS[tmp_path / "tp2"]
    assert_close(losses(single), losses(tp2))
    assert_close(losses(single, "val_loss"), losses(tp2, "val_loss"))
    assert_close(losses(single, "grad_norm"), losses(tp2, "grad_norm"), rtol=1e-4)


def test_data_parallel_matches_accumulation(data_config, tmp_path) -> None:
    """Also with the optimizer state sharded (``trainer.distributed_optimizer``) and its reductions started
    during the backward pass (``trainer.overlap_grad_reduce``), whose checkpoint resumes in one process without
    either."""
    accumulated = train(data_config, tmp_path / "acc", 1, "trainer.gradient_accumulation_steps=2")
    dp2 = train(data_config, tmp_path / "dp2", 2, "--tensor-model-parallel-size", "1")
    assert_close(losses(accumulated), losses(dp2))
    assert_close(losses(accumulated, "val_loss"), losses(dp2, "val_loss"))
    sharded = losses(train(data_config, tmp_path / "zero1", 2, "trainer.distributed_optimizer=true",
                           "trainer.overlap_grad_reduce=true"))  # fmt: skip
    assert sharded == losses(dp2)  # bit for bit: the same sums, norm and AdamW arithmetic (DP=2)
    run = tmp_path / "zero1"
    checkpoint.update_latest(run / "checkpoints", run / "checkpoints" / "step_0000005")
    (run / "checkpoints" / "step_0000010").rename(run / "checkpoints" / "old_step_10")
    resumed = losses(train(data_config, run, 1, "trainer.gradient_accumulation_steps=2"))
    assert_close({s: sharded[s] for s in range(6, 11)}, {s: resumed[s] for s in range(6, 11)}, rtol=1e-6)


def test_checkpoint_saved_at_tp2_resumes_at_tp1(data_config, tmp_path) -> None:
    straight = losses(train(data_config, tmp_path / "tp2", 2, "--tensor-model-parallel-size", "2"))
    # Keep only the step-5 checkpoint of the TP=2 run, then finish the run in one process.
    run = tmp_path / "tp2"
    checkpoint.update_latest(run / "checkpoints", run / "checkpoints" / "step_0000005")
    (run / "checkpoints" / "step_0000010").rename(run / "checkpoints" / "old_step_10")
    resumed = losses(train(data_config, run, 1))
    assert_close({s: straight[s] for s in range(6, 11)}, {s: resumed[s] for s in range(6, 11)})


def scoring_checker(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A task checker of this module: notes which rank scored how many completions (and what), then scores."""
    with open(os.environ["IRONCORE_TEST_CHECKER_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "completions": completions}) + "\n")
    return [float(len(c) % 2) for c in completions]


def test_data_parallel_evaluates_tasks_once_with_one_process_numbers(data_config, tmp_path, monkeypatch) -> None:
    """operation.eval_tasks at DP=2: the first replica evaluates every item once (the other does not repeat it)
    and the metrics are those of one process."""
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("To be", "My lord", "What", "O", "The", "I")))
    task = tmp_path / "toy.yaml"
    task.write_text(f"path: {items}\nchecker: test_parallel_trainer:scoring_checker\nmax_new_tokens: 6\n")
    runs = {}
    for name, nproc, overrides in (("acc", 1, ["trainer.gradient_accumulation_steps=2"]), ("dp2", 2, [])):
        out = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": MODEL, "data": {"config_path": str(data_config)},
            "trainer": {"micro_batch_size": 2, "output_dir": str(out), "save_interval": 0},
            "operation": {"train_steps": 4, "eval_interval": 2, "eval_steps": 1, "log_interval": 2,
                          "eval_tasks": [str(task)]},
            "optim": {"max_lr": 3e-3, "warmup_steps": 2}, "utils": {"tracking": False},
        }))
        monkeypatch.setenv("IRONCORE_TEST_CHECKER_LOG", str(tmp_path / f"{name}.log"))
        launch_train(config, nproc, *overrides, tests_importable=True)
        calls = [json.loads(line) for line in (tmp_path / f"{name}.log").read_text().splitlines()]
        runs[name] = (calls, {m["step"]: m["eval/toy/accuracy"] for m in read_metrics(out) if "eval/toy/accuracy" in m})
    (one, one_metrics), (dp2, dp2_metrics) = runs["acc"], runs["dp2"]
    assert [c["rank"] for c in dp2] == [0, 0] and all(len(c["completions"]) == 6 for c in dp2)  # steps 2 and 4
    assert [c["completions"] for c in dp2] == [c["completions"] for c in one]
    assert dp2_metrics == one_metrics and sorted(one_metrics) == [2, 4]

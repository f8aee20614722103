"""GRPO through the trainer: rollouts from the live policy, rewards, what is trained, resume, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import TINY_MODEL, cli_subprocess, launch_train, read_metrics, small_run_config

from ironcore.checkpoints import native as checkpoint
from ironcore.checkpoints.load import load_weights
from ironcore.data.demo.synthetic import write_task
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError
from ironcore.models import TransformerModel
from ironcore.objectives.grpo import check_positions, group_advantages, grpo_loss
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.training.trainer import Trainer


def digit_share(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A reward a random tiny model can climb in a few steps: the share of digits in its completion."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


def boom(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A reward function with a bug on some samples."""
    return [1.0 if "1" in text else 1 / 0 for text in completions]


def nothing(prompts: list[str], completions: list[str], **_) -> list[None]:
    """A reward that applies to no sample at all (e.g. a checker whose field is missing everywhere)."""
    return [None] * len(completions)


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    """One-digit addition prompts with their answers (a 300-token BPE trained on them), held-out prompts."""
    root = tmp_path_factory.mktemp("rl")
    write_task(root / "task", "addition", 400, 20, seed=0, overrides={"digits": "1"})
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({
        "name": "addition", "task_type": "rl", "source": {"path": str(root / "task" / "train.jsonl")},
        "valid_source": {"path": str(root / "task" / "heldout.jsonl")}, "reward_fields": ["answer"],
        "tokenizer": {"train": {"vocab_size": 300}}, "max_seq_length": 16, "output_dir": str(root / "data"),
        "num_workers": 0,
    }))
    preprocess(load_data_config(path), progress=False)
    return path


def grpo_config(data: Path, out: Path, steps: int, rewards: list[dict] | None = None, **overrides):
    options = {"num_generations": 4, "max_completion_length": 6,
               "rewards": rewards or [{"function": "test_grpo:digit_share"}]}
    options.update(overrides.pop("options", {}))
    values = {"trainer__micro_batch_size": 2, "trainer__gradient_accumulation_steps": 2,
              "trainer__objective_options": options, "optim__max_lr": 1e-2, **overrides}
    return small_run_config(TINY_MODEL, data, out, steps, **values)


def test_prompt_tokens_and_padding_carry_no_gradient(rl_data, tmp_path) -> None:
    trainer = Trainer(grpo_config(rl_data, tmp_path / "run", 1))
    objective, model = trainer.objective, trainer.model
    prompts = [objective.prompts["train"][i] for i in (0, 1)]
    rollout = objective.rollout(prompts, 3, temperature=1.0, seed=0)
    for row, prompt in enumerate(p for p in prompts for _ in range(3)):
        start, length = len(prompt.ids), int(rollout.lengths[row])
        assert rollout.input_ids[row, :start].tolist() == prompt.ids.tolist()
        expected = [1.0 if start - 1 <= t < start - 1 + length else 0.0 for t in range(rollout.mask.shape[1])]
        assert rollout.mask[row].tolist() == expected  # targets: exactly the completion's tokens
    logits = model(rollout.input_ids[:, :-1], parallel_output=True)
    logits.retain_grad()
    logps = -vocab_parallel_cross_entropy(logits, rollout.input_ids[:, 1:])
    rewards = torch.tensor([0.0, 1.0, 3.0, 5.0, 2.0, 0.0])  # no completion at its group's mean
    advantages = group_advantages(rewards, 3, "group").advantages
    parts = grpo_loss(logps, None, None, advantages, rollout.mask, objective.options, 6, float(rollout.mask.sum()))
    parts.loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, rollout.mask.bool())


def test_mean_reward_rises_in_a_few_steps(rl_data, tmp_path) -> None:
    Trainer(grpo_config(rl_data, tmp_path / "run", 12)).train()
    rewards = [m["reward"] for m in read_metrics(tmp_path / "run") if "reward" in m]
    assert len(rewards) == 12
    # From almost no digits to several times as many: a margin that holds for any seed's draws (a fixed +0.1
    # held for one sampler's draws and not for another's).
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first and last > first + 0.05, rewards


def test_metrics_have_trl_names_and_evaluation_is_repeatable(rl_data, tmp_path) -> None:
    trainer = Trainer(grpo_config(rl_data, tmp_path / "run", 2, operation__eval_interval=1, operation__eval_steps=1,
                                  operation__eval_at_start=True))
    trainer.train()
    lines = read_metrics(tmp_path / "run")
    step = next(m for m in lines if "loss" in m)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/digit_share/mean", "entropy",
                 "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                 "time/rollout_s", "time/update_s"):
        assert name in step, name
    evals = [m for m in lines if "val_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]  # 0: eval_at_start
    assert all("val_pass_at_4" in m for m in evals)
    again = trainer.evaluate()
    assert again == {k: v for k, v in evals[-1].items() if k != "step"}  # same weights: the same draws
    page = (tmp_path / "run" / "samples" / "step_0000002.html").read_text()  # a table per evaluation
    assert page.count("<tr>") == 1 + 4 and "val_accuracy" in page  # header + the 4 prompts evaluated
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step_0000000.html", "step_0000001.html", "step_0000002.html"]


def test_resume_repeats_the_same_rollouts(rl_data, tmp_path) -> None:
    Trainer(grpo_config(rl_data, tmp_path / "straight", 4)).train()
    Trainer(grpo_config(rl_data, tmp_path / "resumed", 2, trainer__save_interval=2)).train()
    Trainer(grpo_config(rl_data, tmp_path / "resumed", 4)).train()
    straight = [m for m in read_metrics(tmp_path / "straight") if "loss" in m]
    resumed = [m for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    for a, b in zip(straight, resumed, strict=True):
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
        assert a["loss"] == b["loss"]
    final_a, final_b = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_num_iterations_trains_one_generation_several_times(rl_data, tmp_path) -> None:
    trainer = Trainer(grpo_config(rl_data, tmp_path / "run", 4, options={"num_iterations": 2}))
    seen = []
    update = trainer.objective._update
    def spy(forward, gen):
        seen.append((gen.step, gen.input_ids[0].clone(), gen.old_logps is not None))
        result = update(forward, gen)
        # tok/s and MFU count the positions the update ran over, not train_batch_size x prompt budget x G
        assert result.processed == sum(ids.shape[0] * (ids.shape[1] - 1) for ids in gen.input_ids)
        return result

    trainer.objective._update = spy
    trainer.train()
    assert [step for step, _, _ in seen] == [0, 0, 2, 2]  # sampled at steps 0 and 2, each trained twice
    assert torch.equal(seen[0][1], seen[1][1]) and all(old for _, _, old in seen)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps[0]["reward"] == steps[1]["reward"] and steps[1]["time/rollout_s"] == 0.0
    assert steps[0]["clip_ratio/region_mean"] == 0.0  # the first pass: ratio 1 against the stored log-probs
    assert steps[1]["loss"] != steps[0]["loss"]  # the second: the policy moved, the ratio is not 1


def test_resume_inside_a_generation_reuses_its_saved_rollouts(rl_data, tmp_path) -> None:
    options = {"num_iterations": 2}
    Trainer(grpo_config(rl_data, tmp_path / "straight", 4, options=options)).train()
    Trainer(grpo_config(rl_data, tmp_path / "resumed", 3, options=options, trainer__save_interval=3)).train()
    assert (tmp_path / "resumed" / "checkpoints" / "step_0000003" / "objective.pt").is_file()
    Trainer(grpo_config(rl_data, tmp_path / "resumed", 4, options=options)).train()
    straight = [m for m in read_metrics(tmp_path / "straight") if "loss" in m]
    resumed = [m for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["reward"], a["loss"]) == (b["reward"], b["loss"])
    final_a, final_b = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize(("rewards", "message"), [
    ([], "config key 'trainer.objective_options.rewards': GRPO needs at least one reward function"),
    ([{"function": "no_such_module:fn"}], "config key 'trainer.objective_options.rewards[0].function': cannot "
                                          "import module 'no_such_module'"),
    ([{"function": "test_grpo:boom"}], "reward function boom raised ZeroDivisionError: division by zero"),
])
def test_bad_rewards_are_one_line(rl_data, tmp_path, rewards, message) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": {"config_path": str(rl_data)},
        "trainer": {"micro_batch_size": 2, "output_dir": str(tmp_path / "run"), "save_interval": 0,
                    "objective_options": {"num_generations": 4, "max_completion_length": 6, "rewards": rewards}},
        "operation": {"train_steps": 2, "eval_interval": 0}, "utils": {"tracking": False},
    }))
    done = cli_subprocess(["train", "--config", str(config)], cwd=Path(__file__).parent)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ironcore train: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_raising_reward_is_skipped_and_counted_when_asked(rl_data, tmp_path) -> None:
    Trainer(grpo_config(rl_data, tmp_path / "run", 2, rewards=[{"function": "test_grpo:boom"}],
                        options={"reward_errors": "skip"})).train()
    step = next(m for m in read_metrics(tmp_path / "run") if "loss" in m)
    assert step["rewards/boom/errors"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "tp2", "fsdp"])
def test_data_and_tensor_parallel_runs_equal_one_process(rl_data, tmp_path, layout) -> None:
    """Same completions (rewards, lengths) and losses at every step: rollouts are seeded by their place in
    the global batch, TP ranks sample the same tokens, rewards are gathered over the DP ranks; under FSDP the
    rollouts run through the sharded policy (each block gathered for its decode steps)."""
    def write(name: str, tp: int, accumulation: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": TINY_MODEL, "data": {"config_path": str(rl_data)},
            "trainer": {"micro_batch_size": 2, "gradient_accumulation_steps": accumulation,
                        "tensor_model_parallel_size": tp, "output_dir": str(tmp_path / name), "save_interval": 0,
                        "objective_options": {"num_generations": 4, "max_completion_length": 6,
                                              "rewards": [{"function": "test_grpo:digit_share"}]}},
            "operation": {"train_steps": 3, "eval_interval": 0, "log_interval": 1},
            "optim": {"max_lr": 1e-2, "warmup_steps": 1}, "init": {"seed": 3}, "utils": {"tracking": False},
        }))
        return path

    launch_train(write("one", 1, 1 if layout == "tp2" else 2), 1, tests_importable=True)
    launch_train(write("two", 2 if layout == "tp2" else 1, 1), 2,
                 *(["trainer.data_parallel=fsdp"] if layout == "fsdp" else []), tests_importable=True)
    a = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len({m["reward"] for m in a}) > 1 and any(m["loss"] != 0 for m in a)  # a real comparison
    for x, y in zip(a, b, strict=True):
        assert x["reward"] == pytest.approx(y["reward"], rel=1e-5, abs=1e-7)
        assert x["completions/mean_length"] == y["completions/mean_length"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)


def test_the_sample_tables_and_reward_metrics_reach_mlflow(rl_data, tmp_path, monkeypatch, caplog) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    options = {"log_completions": True, "log_completions_steps": 2, "num_completions_to_print": 5}
    with caplog.at_level(logging.INFO, logger="ironcore.train"):
        Trainer(grpo_config(rl_data, tmp_path / "run", 2, utils__tracking=True, utils__experiment_name="rl",
                            operation__eval_interval=1, operation__eval_steps=1, options=options)).train()
    memory = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory per process"))
    assert "rollout KV cache" in memory  # the plan is GRPO's (its rollouts), not a language model's
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rl").experiment_id])
    assert run.info.status == "FINISHED"  # every metric name was one MLflow takes
    for name in ("train/reward", "rewards/digit_share/mean", "completions/mean_length", "val/accuracy",
                 "val/pass_at_4"):
        assert client.get_metric_history(run.info.run_id, name), name
    listed = {a.path for folder in ("samples", "completions") for a in client.list_artifacts(run.info.run_id, folder)}
    assert listed >= {"samples/step_0000001.html", "samples/step_0000002.html", "completions/step_0000002.html",
                      "completions/step_0000002.jsonl"}
    # TRL's log_completions table at the set interval (step 2, not 1): 5 of the 8 completions (2 prompts x 4)
    assert sorted(p.name for p in (tmp_path / "run" / "completions").iterdir()) == ["step_0000002.html",
                                                                                     "step_0000002.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions" / "step_0000002.jsonl").open()]
    assert len(rows) == 5 and {r["step"] for r in rows} == {2}
    for row in rows:
        assert row["digit_share"] == pytest.approx(digit_share([], [row["completion"]])[0])
        assert row["reward"] == pytest.approx(row["digit_share"]) and isinstance(row["advantage"], float)
        assert isinstance(row["prompt"], str) and row["tokens"] >= 1
    first = rows[:4]  # one group: its advantages are its rewards minus their mean, over their std
    rewards = torch.tensor([r["reward"] for r in first])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    assert [r["advantage"] for r in first] == pytest.approx(expected.tolist(), abs=1e-5)


def test_generations_that_learn_nothing_are_explained(rl_data, tmp_path, caplog) -> None:
    """Three generations in a row all cut off at the budget, or with no reward spread in any group: one warning
    each, saying why and what to change; a generation that learns again restarts the count."""
    objective = Trainer(grpo_config(rl_data, tmp_path / "run", 1)).objective
    stuck = {"completions/clipped_ratio": 1.0, "frac_reward_zero_std": 1.0, "reward": 0.0}
    fine = {"completions/clipped_ratio": 0.5, "frac_reward_zero_std": 0.0, "reward": 0.4}
    with caplog.at_level(logging.WARNING, logger="ironcore.objectives.grpo"):
        for metrics in (stuck, stuck, fine, stuck, stuck):
            objective._warn_learning_nothing(metrics)
        assert not caplog.records
        for _ in range(3):
            objective._warn_learning_nothing(stuck)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "max_completion_length (6 tokens)" in messages[0] and "raise trainer.objective_options" in messages[0]
    assert "frac_reward_zero_std 1.0" in messages[1] and "log_completions: true" in messages[1]


# ---- mistakes caught at start-up, and what is logged when no reward applies -------------------------------


def test_a_rollout_beyond_the_models_positions_is_refused_at_start_up(rl_data, tmp_path, monkeypatch) -> None:
    """The data's prompt budget (max_seq_length 16) + max_completion_length must fit TINY_MODEL's 64 positions
    (the last new token is not fed back): 49 fit, 50 are one line before anything is sampled."""
    def no_rollout(*args, **kwargs):
        raise AssertionError("sampled before the check")

    monkeypatch.setattr("ironcore.objectives.grpo.generate", no_rollout)
    with pytest.raises(ConfigError) as err:
        Trainer(grpo_config(rl_data, tmp_path / "run", 1, options={"max_completion_length": 50}))
    assert str(err.value) == (
        "config key 'trainer.objective_options.max_completion_length': a prompt of the data's max_seq_length "
        "(16 tokens) + 50 new tokens needs 65 positions, more than model.max_position_embeddings (64); at most 49 fit"
    )
    with pytest.raises(ConfigError, match="needs 77 positions, more than model.max_position_embeddings "
                                          r"\(32\); at most 17 fit"):
        Trainer(grpo_config(rl_data, tmp_path / "run2", 1, model__max_position_embeddings=32,
                            options={"max_completion_length": 62}))
    check_positions(49, 16, 64)  # exactly full: fine
    with pytest.raises(ConfigError, match="lower the data's max_seq_length"):
        check_positions(1, 65, 64)


def test_a_reward_that_scores_nothing_warns_once_and_logs_valid_json(rl_data, tmp_path, caplog, capsys) -> None:
    caplog.set_level(logging.WARNING, logger="ironcore")
    Trainer(grpo_config(rl_data, tmp_path / "run", 2, rewards=[{"function": "test_grpo:nothing"}])).train()

    def no_constants(name: str):
        raise AssertionError(f"{name} in metrics.jsonl is not JSON")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [m for m in (json.loads(line, parse_constant=no_constants) for line in lines) if "loss" in m]
    assert len(steps) == 2
    for step in steps:
        assert step["reward"] is None and step["reward_std"] is None and step["rewards/nothing/mean"] is None
        assert step["frac_reward_zero_std"] == 1.0  # no group has a spread: every advantage is 0
        assert step["loss"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if "returned None for all" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("reward function nothing returned None for all 16 completions")
    assert "reward n/a" in capsys.readouterr().out


def test_frac_reward_zero_std_counts_the_groups_without_spread() -> None:
    """A group with fewer than two scored completions has no spread (its advantages are all 0), as an all-None
    group in TRL, whose nansum scores it 0."""
    nan = float("nan")
    rewards = torch.tensor([nan, nan, nan, nan, 1.0, nan, nan, nan, 1.0, 0.0, nan, 1.0, 2.0, 2.0, 2.0, 2.0])
    for scale in ("group", "none"):
        adv = group_advantages(rewards, 4, scale)
        assert adv.is_std_zero.view(4, 4).all(dim=1).tolist() == [True, True, False, True]
        assert (adv.advantages[:8] == 0).all() and (adv.advantages[12:] == 0).all()
    assert group_advantages(torch.full((8,), nan), 4, "batch").is_std_zero.all()


def test_a_data_tokenizer_can_be_a_run_folder_or_its_latest_pointer(rl_data, tmp_path) -> None:
    """docs/rl.md's `tokenizer: {path: runs/sft/checkpoints/latest}`: the tokenizer saved with the checkpoint that
    `latest` names, resolved as init.init_from resolves checkpoints (also the run folder itself)."""
    data = yaml.safe_load(rl_data.read_text())
    run = tmp_path / "sft"
    step = checkpoint.save_model(TransformerModel(grpo_config(rl_data, run, 1).model),
                                 run / "checkpoints" / "step_0000005")
    checkpoint.copy_tokenizer(data["output_dir"], step)
    checkpoint.update_latest(run / "checkpoints", step)
    identity = Tokenizer.from_path(step).identity
    for name, path in (("pointer", run / "checkpoints" / "latest"), ("run", run)):
        assert Tokenizer.from_path(path).identity == identity
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**data, "tokenizer": {"path": str(path)},
                                          "output_dir": str(tmp_path / f"data_{name}")}))
        preprocess(load_data_config(config), progress=False)
        assert json.loads((tmp_path / f"data_{name}" / "metadata.json").read_text())["tokenizer"]["identity"] == identity
    assert set(load_weights(run / "checkpoints" / "latest")) == set(load_weights(run))  # as init_from reads it


@pytest.mark.parametrize("chunk", [1, 5, None], ids=["chunk1", "chunk5", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logps_equal_the_full_log_softmax(chunk, dtype) -> None:
    """GRPO's and DPO's log-probs, taken a chunk of tokens at a time, equal the cross-entropy and entropy of
    the whole scaled logits (values and gradients), whatever the chunk size; a policy's logits come in bf16
    under autocast."""
    from ironcore.parallel.cross_entropy import vocab_parallel_entropy, vocab_parallel_token_logps

    torch.manual_seed(0)
    base = (torch.randn(3, 7, 50) * 3).requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # a loss whose gradient differs per token, like GRPO's clipped ratio
    logps, entropy = vocab_parallel_token_logps(base.to(dtype), targets, 0.7, chunk)
    (logps * weights).sum().backward()
    grad, base.grad = base.grad, None
    scaled = base.to(dtype).float() / 0.7
    want = -vocab_parallel_cross_entropy(scaled, targets)
    (want * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logps, want, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, vocab_parallel_entropy(scaled), atol=tol, rtol=tol)
    torch.testing.assert_close(grad, base.grad, atol=tol, rtol=tol)
    assert not entropy.requires_grad

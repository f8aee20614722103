"""Reward models: the scalar head, the Bradley–Terry objective on DPO pairs, and a trained one as a reward function.

The pairs are real HH-RLHF pairs shipped in examples/data (the fixture of test_dpo).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import cli_subprocess, launch_train, read_metrics, small_run_config
from test_dpo import TINY_MODEL, dpo_data, make_config  # noqa: F401  (dpo_data is a fixture)
from test_grpo import grpo_config, rl_data  # noqa: F401  (rl_data is a fixture)

from ironcore.checkpoints import native as checkpoint
from ironcore.checkpoints.load import load_model
from ironcore.config import ConfigError
from ironcore.config.model import ModelConfig
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import CheckpointError
from ironcore.evaluation.tasks import load_for_eval
from ironcore.models import TransformerModel
from ironcore.objectives.reward_model import bradley_terry_losses, last_token_scores
from ironcore.rewards import RewardSet, RewardSpec, load_reward
from ironcore.rewards.model import reward_model
from ironcore.training.trainer import Trainer

RM_MODEL = {**TINY_MODEL, "score_head": True}
TRL_METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")


def _config(data: Path, out: Path, steps: int, **overrides):
    return small_run_config(RM_MODEL, data, out, steps, **{"trainer__objective": "reward_model", **overrides})


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory, dpo_data) -> Path:  # noqa: F811
    """A language model's checkpoint (output projection, no score head): where a reward model starts."""
    torch.manual_seed(11)
    model = TransformerModel(make_config(dpo_data, tmp_path_factory.mktemp("unused")).model)
    return checkpoint.save_model(model, tmp_path_factory.mktemp("lm") / "ckpt")


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, dpo_data) -> Path:  # noqa: F811
    """A reward model trained for 60 steps of 8 pairs on the pairs (its run folder: weights and tokenizer)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    Trainer(_config(dpo_data, out, 60, optim__max_lr=1e-2, trainer__micro_batch_size=8)).train()
    return out


# ---- the formula -----------------------------------------------------------------------------------------


def test_the_loss_is_bradley_terry() -> None:
    chosen, rejected = [1.5, -0.25, 0.0, 3.0], [0.5, 0.75, 0.0, -2.0]
    ours = bradley_terry_losses(torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64))
    centred = bradley_terry_losses(torch.tensor(chosen, dtype=torch.float64),
                                   torch.tensor(rejected, dtype=torch.float64), 0.01)
    for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        by_hand = -math.log(1 / (1 + math.exp(-(c - r))))  # -log sigmoid(r_chosen - r_rejected)
        assert ours[i].item() == pytest.approx(by_hand, rel=1e-12)
        assert centred[i].item() == pytest.approx(by_hand + 0.01 * (c + r) ** 2, rel=1e-12)  # TRL's centring


def test_the_reward_is_read_at_the_last_response_token() -> None:
    scores = torch.arange(12.0).view(2, 6, 1)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert last_token_scores(scores, mask).tolist() == [3.0, 11.0]
    with pytest.raises(ValueError, match="no reward position"):
        last_token_scores(scores, torch.zeros(2, 6))


def test_the_score_head_gives_one_score_per_position() -> None:
    torch.manual_seed(0)
    model = TransformerModel(ModelConfig(**RM_MODEL))
    assert model.lm_head is None and model.score.weight.shape == (1, TINY_MODEL["hidden_size"])
    ids = torch.randint(0, 512, (2, 9))
    scores = model(ids)
    assert scores.shape == (2, 9, 1)
    assert torch.allclose(scores[:, :5], model(ids[:, :5]), atol=1e-6)  # causal: a prefix scores the same


# ---- training --------------------------------------------------------------------------------------------


def _pair_rewards_by_hand(model: TransformerModel, sample: dict) -> tuple[float, float]:
    out = []
    for side in ("chosen", "rejected"):
        scores = model(sample[f"{side}_input_ids"][None], sample[f"{side}_position_ids"][None])[0, :, 0]
        last = int(sample[f"{side}_loss_mask"].nonzero().max())
        out.append(float(scores[last]))
    return out[0], out[1]


def test_the_first_step_is_the_bradley_terry_loss_of_the_starting_model(dpo_data, lm_checkpoint, tmp_path) -> None:  # noqa: F811
    cfg = _config(dpo_data, tmp_path / "run", 1, init__init_from=str(lm_checkpoint),
                  trainer__micro_batch_size=2, trainer__gradient_accumulation_steps=2)
    trainer = Trainer(cfg)
    start = TransformerModel(cfg.model)
    start.load_state_dict(trainer.model.state_dict())  # the LM's weights and the score head as initialised
    lm = load_model(lm_checkpoint)
    assert torch.equal(start.embed.weight, lm.embed.weight)  # the LM body; its output projection is dropped
    samples = [trainer.train_data.dataset[i] for i in trainer.train_data.global_batch(0)]
    trainer.train()
    first = next(m for m in read_metrics(tmp_path / "run") if "loss" in m)
    with torch.no_grad():
        pairs = [_pair_rewards_by_hand(start, s) for s in samples]
    by_hand = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in pairs) / 4
    assert first["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert first["accuracy"] == sum(c > r for c, r in pairs) / 4
    assert first["margin"] == pytest.approx(sum(c - r for c, r in pairs) / 4, rel=1e-5, abs=1e-7)
    rewards = [value for pair in pairs for value in pair]
    assert first["min_reward"] == pytest.approx(min(rewards), rel=1e-5)
    assert first["max_reward"] == pytest.approx(max(rewards), rel=1e-5)


def test_training_separates_chosen_from_rejected(trained_rm) -> None:
    steps = [m for m in read_metrics(trained_rm) if "loss" in m]
    first, last = steps[:5], steps[-5:]
    assert sum(m["loss"] for m in last) / 5 < sum(m["loss"] for m in first) / 5 - 0.1
    assert sum(m["accuracy"] for m in last) / 5 > 0.8


@pytest.mark.parametrize(("objective", "score_head", "message"), [
    ("reward_model", False, "trainer.objective: reward_model trains a reward model, so it needs model.score_head: true"),
    ("dpo", True, "trainer.objective: dpo trains a language model, so it needs model.score_head: false"),
])
def test_the_head_must_fit_the_objective(dpo_data, tmp_path, objective, score_head, message) -> None:  # noqa: F811
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {**TINY_MODEL, "score_head": score_head}, "data": {"config_path": str(dpo_data)},
        "trainer": {"objective": objective, "output_dir": str(tmp_path / "run"), "save_interval": 0},
        "operation": {"train_steps": 1, "eval_interval": 0}, "utils": {"tracking": False},
    }))
    done = cli_subprocess(["train", "--config", str(config)], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ironcore train: error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a trained reward model as a reward function ---------------------------------------------------------


def _texts(dpo_data: Path) -> tuple[list[str], list[str], list[str]]:  # noqa: F811
    import json

    source = yaml.safe_load(dpo_data.read_text())["source"]["path"]
    rows = [json.loads(line) for line in Path(source).read_text().splitlines()][:20]
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


def test_a_trained_reward_model_scores_completions_as_it_was_trained(dpo_data, trained_rm) -> None:  # noqa: F811
    prompts, chosen, rejected = _texts(dpo_data)
    rewards = reward_model(prompts, chosen, checkpoint=str(trained_rm), batch_size=7)
    # By hand: the model over the tokens of prompt + completion, read at the last token.
    model, tokenizer = load_model(trained_rm), Tokenizer.from_path(checkpoint.resolve(trained_rm))
    for p, c, r in zip(prompts[:3], chosen[:3], rewards[:3], strict=True):
        ids = tokenizer.encode_batch([p + c])[0][-model.config.max_position_embeddings:]
        with torch.no_grad():
            assert r == pytest.approx(float(model(torch.tensor([ids]))[0, -1, 0]), rel=1e-5, abs=1e-6)
    worse = reward_model(prompts, rejected, checkpoint=str(trained_rm))
    assert sum(c > r for c, r in zip(rewards, worse, strict=True)) >= 14  # it learnt the preference (train pairs)
    scored = RewardSet([load_reward(RewardSpec("reward_model", options={"checkpoint": str(trained_rm)}), "r[0]")])
    total = scored.score(prompts, chosen, {}).total
    assert total.tolist() == pytest.approx(rewards, rel=1e-6)


def test_grpo_trains_on_a_reward_models_scores(rl_data, trained_rm, tmp_path) -> None:  # noqa: F811
    rewards = [{"function": "reward_model", "options": {"checkpoint": str(trained_rm)}}]
    trainer = Trainer(grpo_config(rl_data, tmp_path / "run", 1, rewards=rewards))
    objective = trainer.objective
    prompts = [objective.prompts["train"][i] for i in trainer.train_data.global_batch(0)]
    # Step 0's completions (its two micro-batches of two prompts, four completions each), scored by hand.
    by_hand = []
    for j in range(2):
        group = prompts[2 * j : 2 * j + 2]
        rollout = objective.rollout(group, 4, 1.0, objective._seed(0, j, 2))
        texts = [p.fields["prompt"] for p in group for _ in range(4)]
        by_hand += reward_model(texts, rollout.texts, checkpoint=str(trained_rm))
    trainer.train()
    (step,) = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert step["reward"] == pytest.approx(sum(by_hand) / 16, rel=1e-5) and step["reward_std"] > 0
    assert step["rewards/reward_model/mean"] == step["reward"]


def test_reward_model_mistakes_are_one_line_even_when_errors_are_skipped(dpo_data, tmp_path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=r"r\[0\]\.options\.checkpoint': reward function .* needs it"):
        load_reward(RewardSpec("reward_model"), "r[0]")
    lm = checkpoint.save_model(TransformerModel(make_config(dpo_data, tmp_path).model), tmp_path / "lm")
    rewards = RewardSet([load_reward(RewardSpec("reward_model", options={"checkpoint": str(lm)}), "r[0]")])
    with pytest.raises(CheckpointError, match="reward function reward_model: .*not a reward model"):
        rewards.score(["a"], ["b"], {}, on_error="skip")


def test_generation_and_evaluation_refuse_a_reward_model(dpo_data, tmp_path) -> None:  # noqa: F811
    """A score head gives one number per position, not next-token logits: `ironcore generate` printed token 0
    forever and `ironcore eval --task` crashed; both refuse it in one line, and so does the LM loss of `load_for_eval`."""
    rm = checkpoint.save_model(TransformerModel(_config(dpo_data, tmp_path / "unused", 1).model), tmp_path / "rm")
    checkpoint.copy_tokenizer(yaml.safe_load(dpo_data.read_text())["output_dir"], rm)
    gsm8k = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
    for command in (["generate", "--checkpoint", str(rm), "--prompt", "Hello", "--max-new-tokens", "4"],
                    ["eval", "--checkpoint", str(rm), "--task", f"gsm8k={gsm8k}", "--limit", "1", "--no-mlflow"]):
        done = cli_subprocess(command, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"ironcore {command[0]}: error: {rm}: a reward model (score_head), not a language model")
        assert "!" not in done.stdout
    with pytest.raises(CheckpointError, match="a reward model"):
        load_for_eval(rm)
    assert reward_model(["a"], ["b"], checkpoint=str(rm))  # it is still a reward


@pytest.mark.slow
def test_tensor_and_data_parallel_runs_equal_one_process(dpo_data, lm_checkpoint, tmp_path) -> None:  # noqa: F811
    def run(name: str, nproc: int, tp: int) -> list[dict]:
        out = tmp_path / name
        cfg = {"model": RM_MODEL, "data": {"config_path": str(dpo_data)},
               "trainer": {"objective": "reward_model", "micro_batch_size": 2, "train_batch_size": 4,
                           "tensor_model_parallel_size": tp, "output_dir": str(out), "save_interval": 0},
               "optim": {"max_lr": 3e-3, "warmup_steps": 1}, "init": {"init_from": str(lm_checkpoint)},
               "operation": {"train_steps": 3, "eval_interval": 3, "eval_steps": 1}, "utils": {"tracking": False}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        launch_train(tmp_path / f"{name}.yaml", nproc)
        return [m for m in read_metrics(out) if "loss" in m or "val_loss" in m]

    one = run("one", 1, 1)
    for other in (run("dp2", 2, 1), run("tp2", 2, 2)):
        for a, b in zip(one, other, strict=True):
            for name in ("loss", "grad_norm", *TRL_METRICS, "val_loss", "val_accuracy"):
                if name in a:
                    assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), (name, a, b)

"""Objectives are plug-ins: a user's objective named in the config trains through ``ironcore train``.

``ZLossObjective`` below is the worked example of docs/objectives.md (the two
copies are kept identical by a test). Bad values of ``trainer.objective`` and
``trainer.objective_options`` stop ``ironcore train`` with one line.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice

from ironcore.checkpoints.load import load_model
from ironcore.cli import main
from ironcore.config import load_config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.build import build_dataset
from ironcore.models import TransformerModel
from ironcore.objectives import Objective
from ironcore.objectives.lm import LMObjective
from ironcore.parallel.cross_entropy import vocab_parallel_logsumexp

ROOT = Path(__file__).resolve().parents[1]
Z_WEIGHT = 0.01


class ZLossObjective(LMObjective):
    """Cross-entropy plus PaLM's z-loss: weight * log(Z)^2 per trained token keeps log Z near 0."""

    @dataclass
    class Options:
        z_loss_weight: float = 1e-4

    def token_losses(self, logits: torch.Tensor, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        log_z = vocab_parallel_logsumexp(logits)
        return super().token_losses(logits, micro_batch) + self.options.z_loss_weight * log_z.square()


class NotAnObjective:
    """Has the methods, but is not an Objective."""

    def backward(self, forward, micro_batches): ...

    def evaluate(self, forward, batches): ...


class HalfAnObjective(Objective):
    """Forgets evaluate."""

    def backward(self, forward, micro_batches): ...


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> Path:
    """A 30 KB slice of tinyshakespeare, BPE-512, 32 positions; returns its data config path."""
    return shakespeare_slice(tmp_path_factory.mktemp("data"), 30_000)


def write_config(tmp_path: Path, data: Path, **trainer) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "run"),
                    "save_interval": 1, "keep_last_checkpoints": 0, **trainer},
        "operation": {"train_steps": 3, "eval_interval": 0, "eval_steps": 1, "log_interval": 1},
        "optim": {"max_lr": 3e-3}, "init": {"seed": 3}, "utils": {"tracking": False},
    }))
    return path


def loss_by_hand(model: TransformerModel, micro_batches: list[dict], z_weight: float) -> float:
    """Mean over the trained tokens of the global batch of cross-entropy + z_weight * logsumexp(logits)^2."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for mb in micro_batches:
            logits = model(mb["input_ids"]).double()
            ce = F.cross_entropy(logits.transpose(1, 2), mb["labels"], reduction="none")
            per_token = ce + z_weight * torch.logsumexp(logits, dim=-1).square()
            total += float((per_token * mb["loss_mask"]).sum())
            count += float(mb["loss_mask"].sum())
    return total / count


def test_a_users_objective_trains_through_the_cli_with_the_hand_computed_loss(pretrain_data, tmp_path) -> None:
    config = write_config(tmp_path, pretrain_data, objective="test_objectives:ZLossObjective",
                          objective_options={"z_loss_weight": Z_WEIGHT})
    assert main(["train", "--config", str(config)]) == 0
    logged = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m}
    assert sorted(logged) == [1, 2, 3]

    cfg = load_config(config, world_size=1)
    data_cfg = load_data_config(pretrain_data)
    dataset = build_dataset(data_cfg.output_dir, load_metadata(data_cfg.output_dir), "train", 32, cfg.init.seed)
    batches = StepBatches(dataset, global_batch_size=4, micro_batch_size=2, seed=cfg.init.seed, shuffle=True,
                          device=torch.device("cpu"))
    torch.manual_seed(cfg.init.seed)
    weights = {1: TransformerModel(cfg.model).eval()}  # step k runs on the weights saved after step k - 1
    weights.update({k: load_model(tmp_path / "run" / "checkpoints" / f"step_{k - 1:07d}") for k in (2, 3)})
    for step in (1, 2, 3):
        micro_batches = batches.step((step - 1) * 4)
        assert logged[step] == pytest.approx(loss_by_hand(weights[step], micro_batches, Z_WEIGHT), rel=1e-5)
        # The z-term is really in there: the plain cross-entropy is far off.
        assert abs(logged[step] - loss_by_hand(weights[step], micro_batches, 0.0)) > 0.1
    # Validation stays the plain cross-entropy, comparable with any other run.
    final = read_metrics(tmp_path / "run")[-1]
    assert final["val_loss"] < logged[3]


def test_the_documented_example_is_the_tested_one() -> None:
    text = (ROOT / "docs" / "objectives.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class ZLossObjective" in b)
    documented = block[block.index("class ZLossObjective") :].strip()
    assert documented == inspect.getsource(ZLossObjective).strip()


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"objective": "lmm"}, "trainer.objective: 'lmm' is neither a built-in objective (lm, dpo, grpo, reward_model) nor module:Class "
                               "(did you mean 'lm'?)"),
        ({"objective": "no_such_module_anywhere:Thing"}, "trainer.objective: cannot import module "
                                                         "'no_such_module_anywhere'"),
        ({"objective": "test_objectives:Nothing"}, "trainer.objective: module 'test_objectives' has no 'Nothing'"),
        ({"objective": "test_objectives:NotAnObjective"}, "does not implement the Objective interface"),
        ({"objective": "test_objectives:HalfAnObjective"}, "missing: evaluate"),
        ({"objective": "dpo"}, "trainer.objective: dpo trains on dpo data, but"),
        ({"objective": "test_objectives:ZLossObjective", "objective_options": {"z_los_weight": 1}},
         "unknown config key 'trainer.objective_options.z_los_weight' (did you mean 'z_loss_weight'?)"),
        ({"objective": "test_objectives:ZLossObjective", "objective_options": {"z_loss_weight": "big"}},
         "config key 'trainer.objective_options.z_loss_weight': expected a number, got 'big'"),
        ({"objective_options": {"z_loss_weight": 1}}, "trainer.objective_options: LMObjective takes no options"),
    ],
)
def test_bad_objectives_stop_train_with_one_line(pretrain_data, tmp_path, capsys, trainer, message) -> None:
    config = write_config(tmp_path, pretrain_data, **trainer)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()

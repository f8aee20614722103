"""``ironcore eval`` scores a validation split through the run's objective: the trainer's final ``val_*`` metrics.

Each case trains a tiny model a few steps (DPO with a live and with a precomputed reference, a reward model,
GRPO) and evaluates the whole validation split at the end; ``ironcore eval`` on the final checkpoint must
report the same metrics (same names, same values up to float rounding: it batches differently) and leave
the run's folder as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from run_helpers import small_run_config
from test_dpo import TINY_MODEL, dpo_data, make_config, start_checkpoint  # noqa: F401  (fixtures)
from test_grpo import grpo_config, rl_data  # noqa: F401  (rl_data is a fixture)

from ironcore.checkpoints import native as checkpoint
from ironcore.cli import main
from ironcore.config import Config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.training.trainer import Trainer

# The trainer evaluates every validation sample at the end: eval_steps global batches hold more than the split.
WHOLE_SPLIT = {"operation__train_steps": 3, "operation__eval_steps": 20}


def _dpo_live(data: Path, out: Path, start: Path) -> Config:
    return make_config(data, out, {"sft_weight": 0.3}, init__init_from=str(start), **WHOLE_SPLIT)


def _dpo_precomputed(data: Path, out: Path, start: Path) -> Config:
    return make_config(data, out, {"reference": "precomputed", "loss_type": "ipo"}, init__init_from=str(start),
                       **WHOLE_SPLIT)


def _reward_model(data: Path, out: Path, start: Path) -> Config:
    return small_run_config({**TINY_MODEL, "score_head": True}, data, out, 3, trainer__objective="reward_model",
                            trainer__objective_options={"center_rewards_coefficient": 0.01}, **WHOLE_SPLIT)


def _grpo(data: Path, out: Path, start: Path) -> Config:
    # Greedy completions only (pass@k's seeds follow the batch layout), in micro-batches of 2 prompts as below.
    return grpo_config(data, out, 2, options={"eval_num_samples": 0}, operation__eval_steps=20)


CASES: dict[str, tuple[str, Callable[[Path, Path, Path], Config], set[str]]] = {
    "dpo-live": ("dpo_data", _dpo_live, {"val_loss", "val_nll_loss", "val_rewards/accuracies", "val_logps/chosen"}),
    "dpo-precomputed": ("dpo_data", _dpo_precomputed, {"val_loss", "val_rewards/margins"}),
    "reward-model": ("dpo_data", _reward_model, {"val_loss", "val_accuracy", "val_margin", "val_max_reward"}),
    "grpo": ("rl_data", _grpo, {"val_accuracy"}),
}


@pytest.mark.parametrize("case", CASES)
def test_eval_reports_the_trainers_final_validation_metrics(case, request, start_checkpoint, tmp_path) -> None:  # noqa: F811
    data_fixture, make, expected = CASES[case]
    run = tmp_path / "run"
    final = Trainer(make(request.getfixturevalue(data_fixture), run, start_checkpoint)).train()
    assert expected <= set(final), final
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out), "--micro-batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    reported = {name: value for name, value in result.items() if name.startswith("val_")}
    assert reported.keys() == final.keys()
    assert reported == pytest.approx(final, rel=1e-5, abs=1e-6)
    assert result["step"] == (2 if case == "grpo" else 3)
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before  # nothing written into the run


def test_without_the_runs_config_only_language_model_data_is_scored(dpo_data, start_checkpoint, tmp_path,  # noqa: F811
                                                                     capsys) -> None:
    """DPO's numbers depend on the run's options and reference, which only its config.yaml names: one line."""
    folder = tmp_path / "ckpt"
    shutil.copytree(start_checkpoint, folder)  # weights alone, as `ironcore convert` writes them
    checkpoint.copy_tokenizer(load_data_config(dpo_data).output_dir, folder)
    assert main(["eval", "--checkpoint", str(folder), "--data-config", str(dpo_data)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ironcore eval: error: {folder}: no training config.yaml; ironcore eval scores dpo data with the run's "
        "objective, its options and its reference, which only that config names")

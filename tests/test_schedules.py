"""Learning-rate schedules: WSD's warmup, plateau and decay shapes, resuming and extending a WSD run, and a
schedule of your own as module:function."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice, small_run_config

from ironcore.checkpoints import native
from ironcore.config.base import from_dict
from ironcore.config.training import OptimConfig
from ironcore.errors import ConfigError
from ironcore.training.optim import learning_rate
from ironcore.training.trainer import Trainer


def halving(step: int, total_steps: int, optim: OptimConfig) -> float:
    """A schedule of one's own: max_lr halved every 3 steps."""
    return optim.max_lr * 0.5 ** (step // 3)


# 10 steps, 2 of warmup, the last 3 (decay_fraction 0.3) decaying from 1 to 0: progress 1/3, 2/3, 1 at steps 7-9.
PLATEAU = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
SHAPES = {
    "linear": [2 / 3, 1 / 3, 0.0],
    "cosine": [0.75, 0.25, 0.0],
    "1-sqrt": [1 - math.sqrt(1 / 3), 1 - math.sqrt(2 / 3), 0.0],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_wsd_warms_up_holds_then_decays_in_its_shape(shape: str) -> None:
    optim = from_dict(OptimConfig, {"lr_schedule": "wsd", "decay_shape": shape, "decay_fraction": 0.3,
                                    "max_lr": 1.0, "min_lr": 0.0, "warmup_steps": 2})  # fmt: skip
    assert [learning_rate(step, 10, optim) for step in range(10)] == pytest.approx(PLATEAU + SHAPES[shape])
    floor = from_dict(OptimConfig, {"lr_schedule": "wsd", "max_lr": 3.0, "min_lr": 1.0, "decay_fraction": 0.5})
    assert [learning_rate(step, 4, floor) for step in range(4)] == pytest.approx([3.0, 3.0, 2.0, 1.0])


def test_bad_schedules_are_one_line() -> None:
    with pytest.raises(ConfigError, match="lr_schedule.*'wds' is none of cosine, linear, constant, wsd nor "
                                          "module:function.*did you mean 'wsd'"):
        from_dict(OptimConfig, {"lr_schedule": "wds"})
    with pytest.raises(ConfigError, match="decay_fraction.*must be in"):
        from_dict(OptimConfig, {"lr_schedule": "wsd", "decay_fraction": 0.0})
    with pytest.raises(ConfigError, match="config key 'optim.lr_schedule': module 'test_schedules' has no 'nope'"):
        learning_rate(0, 10, from_dict(OptimConfig, {"lr_schedule": "test_schedules:nope"}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("wsd"), 20_000)


def wsd_run(data: Path, out: Path, steps: int, **overrides):
    return small_run_config(TINY_MODEL, data, out, steps, trainer__micro_batch_size=2, optim__lr_schedule="wsd",
                            optim__decay_fraction=0.5, optim__warmup_steps=1, **overrides)


def lrs(out: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}


def test_a_wsd_run_resumes_exactly_and_extends_from_its_plateau(data: Path, tmp_path: Path) -> None:
    """8 steps with a checkpoint at step 2 (the plateau, as the first 4 of 8 steps are); a rerun from it gives
    the same steps 3-8; extended to 12 steps from the same checkpoint, the run keeps max_lr and decays over its
    last 6 steps, as a 12-step run does from the start."""
    straight = tmp_path / "straight"
    Trainer(wsd_run(data, straight, 8, trainer__save_interval=2)).train()
    cfg = wsd_run(data, straight, 8)
    assert list(lrs(straight).values()) == pytest.approx([learning_rate(s, 8, cfg.optim) for s in range(8)])
    for name, steps in (("resumed", 8), ("extended", 12)):
        run = tmp_path / name
        shutil.copytree(straight / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000002")
        native.update_latest(run / "checkpoints", run / "checkpoints" / "step_0000002")
        Trainer(wsd_run(data, run, steps)).train()
        assert list(lrs(run)) == list(range(3, steps + 1))
        assert [lrs(run)[s] for s in range(3, steps + 1)] == pytest.approx(
            [learning_rate(s - 1, steps, cfg.optim) for s in range(3, steps + 1)])
    resumed, extended = read_metrics(tmp_path / "resumed"), lrs(tmp_path / "extended")
    assert [m["loss"] for m in resumed if "loss" in m] == [m["loss"] for m in read_metrics(straight)
                                                           if "loss" in m and m["step"] > 2]  # exact resume
    assert [extended[s] for s in range(3, 7)] == [cfg.optim.max_lr] * 4  # still on the plateau at step 6
    assert extended[12] == pytest.approx(cfg.optim.min_lr)


def test_a_schedule_of_ones_own_runs_in_training(data: Path, tmp_path: Path) -> None:
    Trainer(small_run_config(TINY_MODEL, data, tmp_path, 4, trainer__micro_batch_size=2,
                             optim__lr_schedule="test_schedules:halving")).train()  # fmt: skip
    assert list(lrs(tmp_path).values()) == pytest.approx([3e-3, 3e-3, 3e-3, 1.5e-3])

"""The trainer's optimizer interface (``ironcore/training/optimizer.py``): a toy implementation of your own, named by
``optim.implementation``, trains, checkpoints and resumes through ``ironcore train``; the built-ins speak it too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice

from ironcore.checkpoints import native
from ironcore.cli import main
from ironcore.config import Config
from ironcore.config.model import ModelConfig
from ironcore.config.training import OptimConfig
from ironcore.errors import ConfigError
from ironcore.models import TransformerModel
from ironcore.training.distributed_optimizer import DistributedOptimizer, MixedPrecisionOptimizer
from ironcore.training.optim import build_optimizer, optimizer_class
from ironcore.training.optimizer import METHODS, DataParallelOptimizer, as_training_optimizer

BUILT: list[SignDescent] = []  # every toy optimizer the trainer built, in order


class SignDescent:
    """A toy optimizer of one process: each parameter moves by the learning rate against its gradient's sign
    (so every element moves by exactly lr or 0), and it records what the trainer asked of it."""

    def __init__(self, model: torch.nn.Module, cfg: Config) -> None:
        self.names = {p: n for n, p in model.named_parameters()}
        self.param_groups = [{"params": list(self.names), "lr": cfg.optim.max_lr}]
        self.defaults = {"lr": cfg.optim.max_lr}
        self.steps, self.calls, self.loaded = 0, [], None
        BUILT.append(self)

    def arm(self) -> None:
        self.calls.append("arm")

    def finish_grad_sync(self) -> None:
        self.calls.append("sync")  # one process: nothing to reduce

    def grad_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.names if p.grad is not None]))

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        self.calls.append("step")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad.sign())
        self.steps += 1

    def zero_grad(self) -> None:
        self.calls.append("zero_grad")
        for p in self.names:
            p.grad = None

    def full_state_dict(self) -> dict[str, Any]:
        groups = [{"lr": g["lr"], "sign_steps": self.steps, "params": [self.names[p] for p in g["params"]]}
                  for g in self.param_groups]  # fmt: skip
        return {"state": {}, "param_groups": groups}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = self.loaded = state["param_groups"][0]["sign_steps"]

    def local_state_dict(self) -> dict[str, Any]:
        return self.full_state_dict()  # no tensors: the same on every rank

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        self.load_full_state_dict(state)

    def master_weights(self) -> dict[str, torch.Tensor]:
        return {}

    def load_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        pass

    def memory_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [], []

    def report(self) -> str | None:
        return f"sign descent: {self.steps} step(s)"


class NoStep:
    """Not an optimizer the trainer can use: it cannot step."""

    def __init__(self, model: torch.nn.Module, cfg: Config) -> None:
        pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shakespeare_slice(tmp_path_factory.mktemp("data"), 20_000)


def write_config(path: Path, data: Path, run: Path, steps: int) -> Path:
    path.write_text(yaml.safe_dump({
        "model": TINY_MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "output_dir": str(run),
                    "save_interval": 2, "device": "cpu"},
        "operation": {"train_steps": steps, "eval_interval": 0, "eval_steps": 1, "log_interval": 1},
        "optim": {"max_lr": 1e-3, "lr_schedule": "constant", "implementation": f"{__name__}:SignDescent"},
        "init": {"seed": 3}, "utils": {"tracking": False},
    }))
    return path


def test_an_optimizer_of_your_own_trains_checkpoints_and_resumes_through_the_cli(data, tmp_path, capsys,
                                                                                   caplog) -> None:  # fmt: skip
    run = tmp_path / "run"
    BUILT.clear()
    caplog.set_level(logging.INFO, logger="ironcore.train")
    assert main(["train", "--config", str(write_config(tmp_path / "a.yaml", data, run, 2))]) == 0
    (toy,) = BUILT
    assert toy.steps == 2 and toy.loaded is None
    # Per step: armed before the last micro-batch's backward pass (lm runs one per micro-batch), then the loop.
    assert toy.calls == ["arm", "sync", "step", "zero_grad"] * 2
    assert "sign descent: 1 step(s)" in caplog.text  # its report, logged after the first step
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2]
    saved = torch.load(native.step_dir(run / "checkpoints", 2) / native.OPTIMIZER, weights_only=True)
    assert saved["param_groups"][0]["sign_steps"] == 2  # the checkpoint holds the toy's own state

    # Its update, not AdamW's: from the same initial weights every element moved by a whole number of lr steps.
    torch.manual_seed(3)
    start = dict(TransformerModel(ModelConfig(**TINY_MODEL)).named_parameters())
    final = native.read_model(native.step_dir(run / "checkpoints", 2), torch.device("cpu"))[1]
    moved = torch.cat([(final[n] - p.detach()).abs().flatten() / 1e-3 for n, p in start.items()])
    assert moved.max() > 0.5 and torch.allclose(moved, moved.round(), rtol=0, atol=1e-3)

    assert main(["train", "--config", str(write_config(tmp_path / "b.yaml", data, run, 3))]) == 0  # resume
    resumed = BUILT[-1]
    assert resumed.loaded == 2 and resumed.steps == 3
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3]


def test_an_optimizer_that_misses_a_method_is_refused_in_one_line(data, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "a.yaml", data, tmp_path / "run", 1)
    assert main(["train", "--config", str(config), f"optim.implementation={__name__}:NoStep"]) == 2
    err = capsys.readouterr().err
    assert "optim.implementation" in err and "missing: arm, finish_grad_sync" in err and "Traceback" not in err
    for spec, said in (("nocolon", "is not module:Class"), ("no_such_module_x:A", "cannot import module"),
                       (f"{__name__}:Nothing", "has no class 'Nothing'")):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            optimizer_class(spec)


@pytest.mark.parametrize(("distributed", "precision"), [(False, "fp32"), (True, "fp32"), (False, "bf16")])
def test_the_built_in_optimizers_speak_the_interface(distributed, precision) -> None:
    model = TransformerModel(ModelConfig(**TINY_MODEL))
    built = build_optimizer(model, OptimConfig(), distributed=distributed, precision=precision)
    optimizer = as_training_optimizer(built, model)  # what build_training_optimizer hands the trainer
    expected = DistributedOptimizer if distributed else MixedPrecisionOptimizer if precision == "bf16" else \
        DataParallelOptimizer
    assert type(optimizer) is expected
    assert {"arm", "finish_grad_sync", "grad_norm", "step", "full_state_dict", "report"} <= set(METHODS)
    assert all(callable(getattr(optimizer, method)) for method in METHODS)
    assert optimizer.param_groups and optimizer.defaults["lr"] == OptimConfig().max_lr

"""Optimizers as plug-ins: ``optim.optimizer: muon`` against torch.optim.Muon + torch.optim.AdamW applied by
hand (at TP=1, and at TP=2 under torchrun: ``python -m torch.distributed.run ... tests/test_muon.py OUT``), a
torch optimizer of one's own as module:Class trained through ``ironcore train``, and one-line refusals."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import ROOT, TINY_MODEL, launch_train, read_metrics, shakespeare_slice, small_run_config

from ironcore.config import build_config, dump_config, load_model_config
from ironcore.config.base import from_dict, named_object
from ironcore.config.training import OptimConfig
from ironcore.errors import ConfigError
from ironcore.models import TransformerModel
from ironcore.parallel.setup import destroy_parallel, init_parallel
from ironcore.parallel.sharding import full_state_dict, load_full_state_dict, named_splits, shard_tensor
from ironcore.training.optim import build_optimizer, learning_rate
from ironcore.training.trainer import Trainer

OPTIONS = {"momentum": 0.9, "ns_steps": 4, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.05}


class HalfStepSGD(torch.optim.SGD):
    """A torch optimizer of one's own, named in a config as test_muon:HalfStepSGD."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, halve: bool = True) -> None:
        super().__init__(params, lr=lr, momentum=momentum)
        self.halve = halve

    @torch.no_grad()
    def step(self, closure=None):
        if self.halve:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)
        return super().step(closure)


def by_hand(model: TransformerModel, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """The standard hybrid written out: Muon on the blocks' matrices, AdamW on the head (decayed) and on the
    embeddings, norms and biases (not decayed)."""
    named = dict(model.named_parameters())
    hidden = [p for n, p in named.items() if n.startswith("layers.") and p.dim() == 2]
    head = [named["lm_head.weight"]]
    rest = [p for n, p in named.items() if p.dim() < 2 or n.startswith("embed.")]
    assert len(hidden) + len(head) + len(rest) == len(named) and len(hidden) == 8
    muon = torch.optim.Muon(hidden, lr=cfg.max_lr, **OPTIONS)
    adamw = torch.optim.AdamW([{"params": head, "weight_decay": cfg.weight_decay},
                               {"params": rest, "weight_decay": 0.0}],
                              lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)  # fmt: skip
    return [muon, adamw]


def train_steps(model: TransformerModel, optimizers: list, cfg: OptimConfig, steps: range, total: int) -> None:
    """Steps on fixed random tokens, each at the schedule's lr set on every group, as the trainer does."""
    for step in steps:
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        step_all(optimizers, learning_rate(step, total, cfg))


def step_all(optimizers: list, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()


MUON = {"optimizer": "muon", "optimizer_options": OPTIONS, "max_lr": 0.02, "min_lr": 0.002, "warmup_steps": 2}


def test_muon_is_torch_muon_on_the_hidden_matrices_and_adamw_on_the_rest() -> None:
    torch.manual_seed(0)
    model = TransformerModel(load_model_config({**TINY_MODEL, "tie_word_embeddings": False}))
    reference = copy.deepcopy(model)
    cfg = from_dict(OptimConfig, MUON)
    optimizer = build_optimizer(model, cfg)
    train_steps(model, [optimizer], cfg, range(3), total=6)
    hand = by_hand(reference, cfg)
    train_steps(reference, hand, cfg, range(3), total=6)
    # a checkpoint's state loads into a fresh one, which carries on the same as the reference
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, cfg)
    resumed.load_state_dict(optimizer.state_dict())
    train_steps(resumed_model, [resumed], cfg, range(3, 6), total=6)
    train_steps(reference, hand, cfg, range(3, 6), total=6)
    for (name, got), want in zip(resumed_model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


def test_an_optimizer_of_ones_own_trains_through_ironcore_train(tmp_path: Path) -> None:
    """``optim.optimizer=test_muon:HalfStepSGD`` on the command line of ``ironcore train``: the class is imported,
    built with its options, and its option reaches its step."""
    data = shakespeare_slice(tmp_path, 4_000)
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(small_run_config(TINY_MODEL, data, tmp_path / "run", 2, trainer__micro_batch_size=2)))
    runs = {}
    for halve in (True, False):
        out = tmp_path / f"halve-{halve}"
        launch_train(config, 1, f"trainer.output_dir={out}", "optim.optimizer=test_muon:HalfStepSGD",
                     f'optim.optimizer_options={{"momentum": 0.5, "halve": {str(halve).lower()}}}',
                     tests_importable=True)  # fmt: skip
        runs[halve] = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert runs[True][0] == runs[False][0] and runs[True][1] != runs[False][1]  # its option reached its step


def test_a_plug_in_module_is_found_in_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``ironcore`` command's sys.path lacks the working folder; ``module:name`` looks there last."""
    (tmp_path / "my_plugin_schedules.py").write_text("def flat(step, total, optim):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert named_object("my_plugin_schedules:flat", "optim.lr_schedule")(0, 1, None) == 0.5
    with pytest.raises(ConfigError, match="'optim.lr_schedule': cannot import module 'no_such_plugin'"):
        named_object("no_such_plugin:flat", "optim.lr_schedule")


@pytest.mark.slow
def test_muon_under_data_parallelism_matches_accumulation(tmp_path: Path) -> None:
    """DDP all-reduces the gradients before the step, so Muon orthogonalises the whole batch's: DP=2 logs the
    losses of one process accumulating the same two micro-batches."""
    data = shakespeare_slice(tmp_path, 4_000)
    cfg = small_run_config(TINY_MODEL, data, tmp_path / "acc", 3, trainer__micro_batch_size=2,
                           trainer__gradient_accumulation_steps=2, optim__optimizer="muon")  # fmt: skip
    Trainer(cfg).train()
    config = tmp_path / "dp2.yaml"
    config.write_text(dump_config(cfg))
    launch_train(config, 2, "trainer.gradient_accumulation_steps=1", f"trainer.output_dir={tmp_path / 'dp2'}")
    accumulated, dp2 = ([m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m] for run in ("acc", "dp2"))
    assert len(accumulated) == 3 and dp2 == pytest.approx(accumulated, rel=1e-5)


def tensor_parallel_worker(out: Path, steps: int = 5) -> None:
    """Under torchrun, 2 processes: muon at TP=2 against :func:`by_hand` at TP=1, each step on the TP=1 run's
    gradients (this rank's slices of them), so only the optimizers differ; rank 0 saves each parameter's largest
    difference (gathered) to ``out``."""
    torch.manual_seed(0)
    config = load_model_config({**TINY_MODEL, "tie_word_embeddings": False})  # fused q/k/v, gate/up, GQA
    cfg = from_dict(OptimConfig, MUON)
    reference = TransformerModel(config)  # the TP=1 run, before the TP group exists
    initial, hand, grads = copy.deepcopy(reference.state_dict()), by_hand(reference, cfg), []
    for step in range(steps):
        train_steps(reference, [], cfg, range(step, step + 1), total=steps)  # gradients, no step
        grads.append({name: p.grad.clone() for name, p in reference.named_parameters()})
        step_all(hand, learning_rate(step, steps, cfg))
    context = init_parallel(2, config)
    model = TransformerModel(config)
    load_full_state_dict(model, initial)
    optimizer, splits = build_optimizer(model, cfg), named_splits(model)
    for step, full in enumerate(grads):
        for name, param in model.named_parameters():
            param.grad = shard_tensor(full[name], splits.get(name)).clone()
        step_all([optimizer], learning_rate(step, steps, cfg))
    gathered = full_state_dict(model)
    if context.rank == 0:
        torch.save({name: (gathered[name] - want).abs().max().item() for name, want in reference.state_dict().items()},
                   out)  # fmt: skip
    destroy_parallel()


@pytest.mark.slow
def test_muon_under_tensor_parallelism_is_torch_muon_on_the_full_matrices(tmp_path: Path) -> None:
    """TP=2 gathers each split matrix's update (q/k/v and gate/up rows in the TP=1 order) and orthogonalises
    it whole, with the full matrix's lr adjustment: the parameters of one process with torch's optimizers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, str(tmp_path / "diffs.pt")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = torch.load(tmp_path / "diffs.pt")
    assert len(diffs) == 15 and max(diffs.values()) <= 1e-6, diffs


@pytest.mark.parametrize(
    ("optim", "trainer", "message"),
    [
        ({"optimizer": "adamww"}, {}, "'optim.optimizer': 'adamww' is neither a built-in optimizer (adamw, adam, "
         "sgd, muon) nor module:Class (did you mean 'adamw'?)"),
        ({"optimizer": "no_such_module:Opt"}, {}, "'optim.optimizer': cannot import module 'no_such_module'"),
        ({"optimizer": "test_muon:NoSuch"}, {}, "'optim.optimizer': module 'test_muon' has no 'NoSuch'"),
        ({"optimizer": "test_muon:by_hand"}, {}, "'optim.optimizer': test_muon:by_hand is not a torch.optim.Optimizer"),
        ({"optimizer": "muon", "optimizer_options": {"ns_step": 3}}, {},
         "'optim.optimizer_options': muon takes no option 'ns_step' (did you mean 'ns_steps'?)"),
        ({"optimizer": "test_muon:HalfStepSGD", "optimizer_options": {"halv": True}}, {},
         "test_muon:HalfStepSGD takes no option 'halv' (did you mean 'halve'?)"),
        ({"optimizer": "sgd", "optimizer_options": {"lr": 1.0}}, {}, "'optim.optimizer_options': lr is optim.max_lr"),
        ({"optimizer": "muon", "optimizer_options": {"adjust_lr_fn": "x"}}, {}, "adjust_lr_fn must be original"),
        ({"optimizer": "muon"}, {"data_parallel": "zero1"}, "muon is not supported with trainer.data_parallel: zero1"),
        ({"optimizer": "muon"}, {"data_parallel": "fsdp"}, "muon is not supported with trainer.data_parallel: fsdp"),
        ({"optimizer": "muon"}, {"precision": "bf16"}, "muon is not supported with trainer.precision: bf16"),
    ],
)
def test_bad_optimizers_and_options_are_one_line(optim: dict, trainer: dict, message: str) -> None:
    """Built-ins and layouts are checked with the config; a module:Class plug-in where it is built (the config
    modules import no torch), before any training."""
    raw = {"model": dict(TINY_MODEL), "optim": optim, "trainer": {**trainer, "micro_batch_size": 1}}
    with pytest.raises(ConfigError) as err:
        cfg = build_config(raw, world_size=2)
        build_optimizer(TransformerModel(cfg.model), cfg.optim)
    assert message in str(err.value) and "\n" not in str(err.value)


if __name__ == "__main__":
    tensor_parallel_worker(Path(sys.argv[1]))

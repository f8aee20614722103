"""Optimizer groups, the learning-rate schedule and the clipped optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from ironcore.config import load_model_config
from ironcore.config.training import OperationConfig, OptimConfig
from ironcore.models import TransformerModel
from ironcore.parallel.grad import clip_factor
from ironcore.training.optim import (
    build_optimizer,
    learning_rate,
    parameter_groups,
    reduce_gradients,
    step_with_scaled_grads,
    total_steps,
)


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    model = TransformerModel(load_model_config("gpt2-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "layers.0.attn.qkv.weight" in decayed and "layers.1.mlp.down.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n or "embed" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizers(name: str) -> None:
    model = TransformerModel(load_model_config("gpt2-tiny"))
    optimizer = build_optimizer(model, OptimConfig(optimizer=name))
    assert type(optimizer).__name__ == ("SGD" if name == "sgd" else "AdamW")


def test_schedules() -> None:
    cfg = OptimConfig(max_lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate(0, 110, cfg) == pytest.approx(0.1)  # warmup: step 0 already moves
    assert learning_rate(9, 110, cfg) == pytest.approx(1.0)
    assert learning_rate(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, 110, cfg) == pytest.approx(0.1)
    cfg.lr_schedule = "linear"
    assert learning_rate(60, 110, cfg) == pytest.approx(0.55)
    cfg.lr_schedule = "constant"
    assert learning_rate(100, 110, cfg) == 1.0


def test_token_budget_becomes_steps() -> None:
    assert total_steps(OperationConfig(train_steps=None, train_tokens=10_000), tokens_per_step=1024) == 10
    assert total_steps(OperationConfig(train_steps=7, train_tokens=10_000), tokens_per_step=1024) == 7


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("factor", [0.3, 1.0])
def test_step_with_scaled_grads_equals_scaling_then_stepping(name: str, factor: float) -> None:
    """The fused AdamW takes the clipping factor inside its kernel; SGD gets it multiplied in. Both must equal
    torch's own clip-then-step, leave the clipped gradients in .grad, and leave no scale behind for later steps."""
    torch.manual_seed(0)
    models = [TransformerModel(load_model_config("gpt2-tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, OptimConfig(optimizer=name, max_lr=1e-2)) for m in models]
    ids = torch.randint(0, 1000, (2, 16))
    for m in models:
        m(ids).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(models[0].parameters(), float("inf")).item()
    max_norm = factor * (norm + 1e-6)
    torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    optimizers[0].step()
    assert clip_factor(norm, max_norm) == pytest.approx(factor)
    step_with_scaled_grads(optimizers[1], clip_factor(norm, max_norm))
    assert not hasattr(optimizers[1], "grad_scale")
    for (name_, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name_)
        torch.testing.assert_close(b, a, msg=name_)
    assert (name == "adamw") == getattr(optimizers[1], "_step_supports_amp_scaling", False)


def test_clip_factor() -> None:
    assert clip_factor(0.5, 1.0) == 1.0 and clip_factor(4.0, 0.0) == 1.0
    assert clip_factor(4.0, 1.0) == pytest.approx(0.25)


def test_distributed_optimizer_in_one_process_steps_bit_for_bit_like_plain_adamw() -> None:
    """The sharded optimizer's arithmetic is plain training's, element by element: the same float64 gradient
    norm (rounded to fp32 once), the same clipping factor applied the same way (the fused kernel's
    ``grad_scale``), so the same parameters bit for bit -- what makes DP=2 with it equal plain DP=2 bitwise
    (tests/test_parallel.py). Clipping is on in every step."""
    torch.manual_seed(0)
    models = [TransformerModel(load_model_config("gpt2-tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(max_lr=1e-2, weight_decay=0.1)
    optimizers = [build_optimizer(models[0], cfg), build_optimizer(models[1], cfg, distributed=True)]
    for step in range(3):
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(step))
        norms = []
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(ids).logsumexp(-1).mean().backward()
            norms.append(reduce_gradients(model, optimizer).item())
            step_with_scaled_grads(optimizer, clip_factor(norms[-1], 0.1))
        assert norms[0] == norms[1] and clip_factor(norms[0], 0.1) < 1
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            assert torch.equal(a, b), (step, name)

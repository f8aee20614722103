"""The memory planner (``ironcore model-info --memory``, ``ironcore.training.memory``) against the bytes a real
step holds on a CPU: parameters, gradients and optimizer states to the byte, activations against what the
forward pass and loss leave allocated (torch's profiler). The TP=2 and DP=2 cases are in test_parallel.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ironcore.cli import main
from ironcore.config.model import ModelConfig
from ironcore.config.training import OptimConfig
from ironcore.models import TransformerModel
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.training.memory import activation_bytes, measured_state_bytes, plan_memory
from ironcore.training.optim import build_optimizer

CFG = ModelConfig(name="tiny", vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, ffn_hidden_size=128, max_position_embeddings=64, position_embedding="rope",
                  norm_type="rmsnorm", gated_mlp=True, activation="silu", tie_word_embeddings=False)  # fmt: skip


@pytest.mark.parametrize(("optimizer", "distributed", "precision"), [
    ("adamw", False, "fp32"), ("adamw", True, "fp32"), ("sgd", False, "fp32"), ("adamw", False, "bf16"),
    ("adamw", True, "bf16")])  # fmt: skip
def test_planned_states_are_the_bytes_after_a_step(optimizer, distributed, precision) -> None:
    """bf16: 2-byte parameters, 4-byte main gradients, 4-byte master weights beside the moments."""
    torch.manual_seed(0)
    model = TransformerModel(CFG)
    opt = build_optimizer(model, OptimConfig(optimizer=optimizer), distributed=distributed, precision=precision)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    plan = plan_memory(CFG, distributed_optimizer=distributed, precision=precision, micro_batch_size=2, seq_len=16,
                       optimizer=optimizer)  # fmt: skip
    assert (plan.parameters, plan.gradients, plan.optimizer) == measured_state_bytes(model, opt)
    numel = sum(p.numel() for p in model.parameters())
    if precision == "bf16":
        assert plan.parameters == 2 * numel and plan.optimizer == 4 * numel + 8 * numel + 4 * len(opt.fragments)
    assert plan.optimizer > 0 and plan.total == plan.states + plan.activations


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planned_activations_are_what_the_forward_pass_leaves_allocated(precision) -> None:
    """Measured: the bytes allocated and not freed by a micro-batch's forward pass and loss (the tensors kept for
    the backward pass), from torch's profiler. The plan runs the same step on fake tensors."""
    torch.manual_seed(0)
    model = TransformerModel(CFG)
    if precision == "bf16":  # bf16 parameters, as the bf16 optimizer makes them
        build_optimizer(model, OptimConfig(), precision="bf16")
    tokens = torch.randint(0, CFG.vocab_size, (4, 65))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:  # first calls allocate what kernels keep (not activations)
        vocab_parallel_cross_entropy(model(tokens[:1, :-1], parallel_output=True), tokens[:1, 1:]).sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, autocast:
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1], parallel_output=True), tokens[:, 1:]).sum()
    measured = sum(e.self_cpu_memory_usage for e in prof.events())
    planned = activation_bytes(CFG, 4, 64, precision)
    assert measured > 0 and abs(planned - measured) <= 0.1 * measured, (planned, measured)
    assert loss.requires_grad
    checkpointed = activation_bytes(CFG, 4, 64, precision, activation_checkpointing=True)
    assert checkpointed < planned  # block inputs + one block recomputed


def test_model_info_memory_says_whether_it_fits(capsys) -> None:
    args = ["model-info", "--model", "gpt2-small", "--memory", "--seq-len", "256", "--micro-batch-size", "2"]
    assert main([*args, "--gpu-memory", "80"]) == 0
    assert "fits 80 GiB" in capsys.readouterr().out
    assert main([*args, "--gpu-memory", "1", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["fits"] is False and got["total"] == sum(got[k] for k in ("parameters", "gradients", "optimizer",
                                                                         "activations"))  # fmt: skip
    half = json.loads((main([*args, "--json", "--dp", "2", "--distributed-optimizer"]), capsys.readouterr().out)[1])
    assert abs(half["optimizer"] - got["optimizer"] / 2) <= 0.001 * got["optimizer"]
    assert main([*args, "--tp", "0"]) == 2 and "--tp must be >= 1" in capsys.readouterr().err

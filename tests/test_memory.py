"""The memory planner (``ironcore model-info --memory``, ``ironcore.training.memory``) against the bytes a real
step holds on a CPU: parameters, gradients and optimizer states to the byte, activations against what the
forward pass and loss leave allocated (torch's profiler). The TP=2 and DP=2 cases are in test_parallel.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ironcore.cli import main
from ironcore.config import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.config.training import OptimConfig
from ironcore.models import TransformerModel
from ironcore.objectives.base import MemoryShape
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_token_logps
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


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "3"], "model.num_attention_heads 4 is not divisible by --tp 3"),
    (["--tp", "1024"], "model.num_attention_heads 4 is not divisible by --tp 1024"),
    (["--tp", "4"], "model.qk_norm_per_head: false (a norm over all heads) is not supported under tensor parallelism "
                    "yet (--tp 4)"),
    (["--seq-len", "-5"], "--seq-len -5: must be in 1..256 (model.max_position_embeddings of olmoe-tiny)"),
    (["--seq-len", "0"], "--seq-len 0: must be in 1..256"),
    (["--seq-len", "1000000"], "--seq-len 1000000: must be in 1..256"),
    (["--micro-batch-size", "99999999999999"], "--micro-batch-size 99999999999999 x sequence length 256 = "),
    (["--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB, got 0"),
    (["--gpu-memory", "-1"], "--gpu-memory must be a positive number of GiB, got -1"),
    (["--gpu-memory", "nan"], "--gpu-memory must be a positive number of GiB, got nan"),
])  # fmt: skip
def test_model_info_memory_refuses_what_it_cannot_plan_in_one_line(args, message, capsys) -> None:
    """Each was a traceback, a silent default (--seq-len 0 meant the model's maximum), a plan for a layout the
    trainer refuses (olmoe-tiny's q/k norm over all heads at TP 4), or an answer to a GPU of no memory."""
    assert main(["model-info", "--model", "olmoe-tiny", "--memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ironcore model-info: error: {message}") and err.count("\n") == 1, err


def test_the_planner_refuses_the_tp_layouts_the_trainer_refuses() -> None:
    """The planner and the trainer's layout check (``check_parallel_layout``) share one TP check."""
    from ironcore.config import ConfigError, load_model_config
    from ironcore.parallel.setup import check_parallel_layout

    for name, tp in (("olmoe-tiny", 4), ("llama-tiny", 3)):
        cfg = load_model_config(name)
        with pytest.raises(ConfigError) as trainer:
            check_parallel_layout(tp, tp, cfg)
        with pytest.raises(ConfigError) as planner:
            plan_memory(cfg, tp=tp)
        assert str(planner.value) == str(trainer.value).replace("trainer.tensor_model_parallel_size", "tp")
    assert plan_memory(load_model_config("llama-tiny"), tp=2).parameters > 0


@pytest.mark.parametrize(("precision", "quantize", "distributed"), [
    ("fp32", None, False), ("bf16", None, False), ("bf16", None, True), ("bf16", "nf4", False),
    ("fp32", "nf4", False)])  # fmt: skip
def test_planned_lora_and_qlora_states_are_the_bytes_after_a_step(precision, quantize, distributed) -> None:
    """LoRA: the frozen base in the compute dtype (QLoRA: its projections in NF4, the rest bf16/fp32), gradients
    and optimizer states for the adapters only."""
    from ironcore.config.model import LoRAConfig
    from ironcore.models.lora import cast_base, quantize_base

    if quantize:
        pytest.importorskip("torchao")
    cfg = ModelConfig(**{**CFG.__dict__, "lora": LoRAConfig(rank=4, quantize_base=quantize)})
    torch.manual_seed(0)
    model = TransformerModel(cfg)
    if precision == "bf16":
        cast_base(model, torch.bfloat16)
    if quantize:
        quantize_base(model)
    opt = build_optimizer(model, OptimConfig(), distributed=distributed, precision=precision)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    plan = plan_memory(cfg, precision=precision, distributed_optimizer=distributed, micro_batch_size=2, seq_len=16)
    assert (plan.parameters, plan.gradients, plan.optimizer) == measured_state_bytes(model, opt)
    full = plan_memory(CFG, precision=precision, micro_batch_size=2, seq_len=16)
    assert plan.optimizer < full.optimizer / 10 and plan.gradients < full.gradients / 10
    if quantize:
        assert plan.parameters < 0.7 * plan_memory(dataclasses.replace(cfg, lora=LoRAConfig(rank=4)),
                                                   precision=precision).parameters


def test_the_fsdp_plan_shards_the_states_gathers_units_and_offloads_to_the_host() -> None:
    """FSDP at DP=4: a quarter of the states (give or take padding); the gathered units grow when blocks keep
    their weights after the forward pass; offload moves the states to the host; a full save's gathered tensors
    are counted and a sharded one's are not. (The bytes themselves: tests/test_fsdp.py, measured at DP=2.)"""
    cfg = load_model_config("llama-tiny")
    ddp = plan_memory(cfg, dp=4, micro_batch_size=1, seq_len=16)
    fsdp = plan_memory(cfg, dp=4, data_parallel="fsdp", micro_batch_size=1, seq_len=16)
    assert ddp.states / 4 <= fsdp.states <= ddp.states / 4 * 1.01
    assert fsdp.gathered > 0 and ddp.gathered == 0
    assert fsdp.checkpoint == 0 and ddp.checkpoint == 3 * ddp.parameters  # full fp32 weights and two moments
    kept = plan_memory(cfg, dp=4, data_parallel="fsdp", reshard_after_forward=False, micro_batch_size=1, seq_len=16)
    assert kept.gathered > fsdp.gathered and kept.states == fsdp.states
    offloaded = plan_memory(cfg, dp=4, data_parallel="fsdp", offload="params", micro_batch_size=1, seq_len=16)
    assert offloaded.states == 0 and offloaded.host == fsdp.states
    assert offloaded.total == fsdp.total - fsdp.states


def test_an_objectives_shape_adds_its_rows_positions_reference_and_kv_cache() -> None:
    """DPO: two rows per pair and the reference's fp32 weights; GRPO: num_generations rows of prompt + completion
    - 1 positions, and the rollout's KV cache (one more position); the loss traced as the objectives take it."""
    dpo = plan_memory(CFG, micro_batch_size=2, seq_len=16, objective=MemoryShape(2, reference=True))
    assert dpo.activations == activation_bytes(CFG, 4, 16, token_logps=True)
    assert dpo.activations > 1.9 * activation_bytes(CFG, 2, 16)  # a pair is two rows
    assert dpo.reference == dpo.parameters and dpo.kv_cache == 0
    assert dpo.total == dpo.states + dpo.activations + dpo.reference
    grpo = plan_memory(CFG, micro_batch_size=2, seq_len=16, objective=MemoryShape(4, new_tokens=8, kv_cache=True))
    assert grpo.activations == activation_bytes(CFG, 8, 23, token_logps=True)
    assert grpo.kv_cache == 2 * CFG.num_layers * 8 * 24 * CFG.kv_heads * CFG.head_size * 4 and grpo.reference == 0
    assert 1.9 * grpo.activations < activation_bytes(CFG, 16, 23, token_logps=True) < 2.1 * grpo.activations
    assert activation_bytes(CFG, 8, 39, token_logps=True) > 1.5 * grpo.activations  # 16 new tokens, not 8


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planned_activations_of_the_objectives_log_probs_are_what_they_leave_allocated(precision) -> None:
    """DPO's and GRPO's token log-probs keep the logits (bf16 under autocast) and a float per token, where the
    language model's cross-entropy keeps an fp32 log-softmax: measured with torch's profiler, as above."""
    torch.manual_seed(0)
    model = TransformerModel(CFG)
    if precision == "bf16":
        build_optimizer(model, OptimConfig(), precision="bf16")
    tokens = torch.randint(0, CFG.vocab_size, (4, 65))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        vocab_parallel_token_logps(model(tokens[:1, :-1], parallel_output=True), tokens[:1, 1:])[0].sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, autocast:
        logps, _ = vocab_parallel_token_logps(model(tokens[:, :-1], parallel_output=True), tokens[:, 1:])
        loss = logps.sum()
    measured = sum(e.self_cpu_memory_usage for e in prof.events())
    planned = activation_bytes(CFG, 4, 64, precision, token_logps=True)
    assert measured > 0 and abs(planned - measured) <= 0.1 * measured, (planned, measured)
    assert loss.requires_grad
    if precision == "bf16":  # the 2-byte logits instead of the 4-byte log-softmax
        assert activation_bytes(CFG, 4, 64, precision) - planned >= 4 * 64 * CFG.vocab_size * 2


def test_model_info_plans_dpo_and_grpo(capsys) -> None:
    args = ["model-info", "--model", "llama-tiny", "--memory", "--seq-len", "32", "--json"]
    dpo = json.loads((main([*args, "--objective", "dpo", "--no-reference"]), capsys.readouterr().out)[1])
    assert dpo["reference"] == 0 and dpo["activations"] > 0
    grpo = json.loads((main([*args, "--objective", "grpo", "--num-generations", "4", "--max-completion-length",
                             "16", "--reference"]), capsys.readouterr().out)[1])  # fmt: skip
    assert grpo["kv_cache"] > 0 and grpo["reference"] == grpo["parameters"]
    assert grpo["activations"] > 2 * dpo["activations"]  # 4 rows of 47 positions against 2 of 32
    assert main([*args, "--objective", "grpo", "--num-generations", "0"]) == 2
    assert "--num-generations must be >= 1" in capsys.readouterr().err

"""``ironcore model-info``: parameters and FLOPs per token of any model, without allocating weights; with
``--memory``, the memory planner's bytes per GPU of a training step (``ironcore.training.memory``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ironcore.checkpoints.hf_families import model_config_from_folder
from ironcore.config import load_config, load_model_config
from ironcore.config.model import ModelConfig
from ironcore.errors import ConfigError
from ironcore.files import read_yaml

if TYPE_CHECKING:
    from ironcore.objectives.base import MemoryShape

# Tokens in one micro-batch the planner plans for at most: no GPU holds the activations of more (even a
# hidden size of 32 is 512 GiB of them), and beyond it the byte counts of a tensor leave int64.
MAX_TOKENS = 2**32


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model-info", help="parameter count and FLOPs per token of a model config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="training config, model YAML or HF checkpoint folder")
    source.add_argument("--model", help="model name (configs/model/NAME.yaml), model YAML or HF folder")
    parser.add_argument("--seq-len", type=int, help="sequence length for attention FLOPs (default: max positions)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan = parser.add_argument_group("memory planner (--memory): bytes per GPU of one training step")
    plan.add_argument("--memory", action="store_true", help="plan the memory of a training step")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    plan.add_argument("--dp", type=int, default=1, help="data-parallel size")
    plan.add_argument("--distributed-optimizer", action="store_true",
                      help="optimizer state sharded over DP (= --data-parallel zero1)")
    plan.add_argument("--data-parallel", choices=["ddp", "zero1", "fsdp"],
                      help="how the DP ranks share the state (trainer.data_parallel; default ddp)")
    plan.add_argument("--offload", choices=["none", "params"], default="none",
                      help="with fsdp: shards and optimizer state in host memory (trainer.offload)")
    plan.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    plan.add_argument("--activation-checkpointing", action="store_true")
    plan.add_argument("--micro-batch-size", type=int, default=1)
    plan.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    plan.add_argument("--objective", choices=["lm", "dpo", "grpo"], default="lm",
                      help="what a sample is: a sequence (lm), a chosen + rejected pair (dpo), a prompt with "
                      "--num-generations completions of --max-completion-length tokens (grpo; --seq-len is the "
                      "prompt budget)")
    plan.add_argument("--num-generations", type=int, default=8, help="grpo: completions per prompt")
    plan.add_argument("--max-completion-length", type=int, default=512, help="grpo: new tokens per completion")
    plan.add_argument("--reference", action=argparse.BooleanOptionalAction,
                      help="a frozen reference model beside the policy (default: dpo yes, its live reference; "
                      "grpo no, beta 0)")
    plan.add_argument("--gpu-memory", type=float, help="GiB per GPU: say whether the step fits")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.models.stats import model_stats

    if args.model:
        cfg = load_model_config(args.model, read_folder=model_config_from_folder)
    elif Path(args.config).is_file() and "model" in read_yaml(args.config):
        cfg = load_config(args.config, world_size=1, read_folder=model_config_from_folder).model
    else:
        cfg = load_model_config(args.config, read_folder=model_config_from_folder)
    if args.seq_len is not None and not 1 <= args.seq_len <= cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {args.seq_len}: must be in 1..{cfg.max_position_embeddings} "
                          f"(model.max_position_embeddings of {cfg.name})")  # fmt: skip
    seq_len = cfg.max_position_embeddings if args.seq_len is None else args.seq_len
    if args.memory:
        return _memory(cfg, seq_len, args)
    stats = model_stats(cfg, seq_len)
    if args.json:
        print(json.dumps({"name": cfg.name, "seq_len": seq_len, **stats.__dict__}, indent=2))
        return 0
    rows = [
        ("model", cfg.name),
        ("parameters", f"{stats.params:,} ({stats.params / 1e9:.3f} B)"),
        *([("active parameters per token", f"{stats.active_params:,} ({stats.active_params / 1e9:.3f} B)")]
          if stats.active_params != stats.params else []),
        ("embedding parameters", f"{stats.embedding_params:,}"),
        ("matmul parameters", f"{stats.matmul_params:,}"),
        ("sequence length", f"{seq_len:,}"),
        ("forward FLOPs/token", f"{stats.forward_flops_per_token:.4g}"),
        ("training FLOPs/token", f"{stats.train_flops_per_token:.4g} (6N + 12*L*H*Q*T)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def _memory(cfg: ModelConfig, seq_len: int, args: argparse.Namespace) -> int:
    """Print the planner's bytes per GPU (see ``ironcore.training.memory``); exit 1 when it does not fit."""
    from ironcore.training.memory import plan_memory

    for key in ("tp", "dp", "micro_batch_size"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    cfg.check_tensor_parallel(args.tp, "--tp")  # the trainer's own checks: a layout it would refuse is no plan
    shape = _objective_shape(args)
    rows, new = (1, 0) if shape is None else (shape.rows_per_sample, max(0, shape.new_tokens - 1))
    tokens = args.micro_batch_size * rows * (seq_len + new)
    if tokens > MAX_TOKENS:
        raise ConfigError(f"--micro-batch-size {args.micro_batch_size} x sequence length {seq_len} = {tokens:,} "
                          f"tokens in one micro-batch: more than any GPU holds the activations of (at most "
                          f"{MAX_TOKENS:,})")  # fmt: skip
    if args.gpu_memory is not None and not (math.isfinite(args.gpu_memory) and args.gpu_memory > 0):
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
    layout = args.data_parallel or ("zero1" if args.distributed_optimizer else "ddp")
    if args.distributed_optimizer and layout != "zero1":
        raise ConfigError(f"--distributed-optimizer means --data-parallel zero1, not {layout}: give one of them")
    if args.offload != "none" and layout != "fsdp":
        raise ConfigError(f"--offload {args.offload} needs --data-parallel fsdp")
    plan = plan_memory(cfg, tp=args.tp, dp=args.dp, data_parallel=layout, offload=args.offload,
                       precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                       micro_batch_size=args.micro_batch_size, seq_len=seq_len, optimizer=args.optimizer,
                       objective=shape)
    fits = None if args.gpu_memory is None else plan.total <= args.gpu_memory * 2**30
    if args.json:
        print(json.dumps({"name": cfg.name, "seq_len": seq_len, **dataclasses.asdict(plan), "total": plan.total,
                          "fits": fits}, indent=2))  # fmt: skip
    else:
        sharing = {"ddp": "", "zero1": ", distributed optimizer", "fsdp": ", FSDP"}[layout]
        sharing += ", offload to host" if args.offload != "none" else ""
        description = (f"TP={args.tp} x DP={args.dp}{sharing}, {args.precision}"
                       f"{', activation checkpointing' if args.activation_checkpointing else ''}, "
                       f"micro-batch {args.micro_batch_size} x {seq_len} tokens")  # fmt: skip
        description += {"lm": "", "dpo": " (pairs)",
                        "grpo": f" (prompts) x {args.num_generations} completions of {args.max_completion_length}"
                        }[args.objective]  # fmt: skip
        rows = [("model", cfg.name), ("layout", description)]
        labels = {"parameters": "parameters", "gradients": "gradients", "optimizer": "optimizer",
                  "activations": "activations", "gathered": "gathered units (FSDP)",
                  "reference": "reference model", "kv_cache": "rollout KV cache",
                  "host": "host memory (offload)", "checkpoint": "more while saving a full checkpoint"}
        rows += [(label, f"{getattr(plan, part) / 2**30:8.2f} GiB") for part, label in labels.items()
                 if getattr(plan, part) or part in ("parameters", "gradients", "optimizer", "activations")]
        rows.append(("total per GPU", f"{plan.total / 2**30:8.2f} GiB"))
        if fits is not None:
            rows.append((f"fits {args.gpu_memory:g} GiB", "yes" if fits else "no"))
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0 if fits is not False else 1


def _objective_shape(args: argparse.Namespace) -> MemoryShape | None:
    """The objective's shape for the planner (``--objective`` and its options); None for a language model."""
    from ironcore.objectives.base import MemoryShape

    if args.objective == "lm":
        return None
    if args.objective == "dpo":
        return MemoryShape(rows_per_sample=2, reference=args.reference is not False)
    for key in ("num_generations", "max_completion_length"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return MemoryShape(rows_per_sample=args.num_generations, new_tokens=args.max_completion_length,
                       reference=bool(args.reference), kv_cache=True)

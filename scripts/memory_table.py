"""Which models train on which GPUs, by the memory planner: a markdown table of GiB per GPU, layout by layout.

    python scripts/memory_table.py                                   # the seed's hardware: 2 x 24 GB, seq 2048
    python scripts/memory_table.py --gpus 8 --gpu-memory 80 --models llama3-8b   # 8 x 80 GB
    python scripts/memory_table.py --lora                            # LoRA / QLoRA of 8B models, 1 and 2 x 24 GB
    python scripts/memory_table.py --fsdp                            # full fine-tuning under FSDP, with offload

Each row is one layout over ``--gpus`` GPUs (every TP x DP split, with and
without the distributed optimizer and activation checkpointing), bf16,
micro-batch 1; a cell is the planner's total per GPU and whether it fits
``--gpu-memory`` GiB (``ironcore model-info --memory`` gives the parts).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

from ironcore.config import load_model_config
from ironcore.config.model import LoRAConfig
from ironcore.training.memory import plan_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "gemma-1-2b", "llama3-8b"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GiB per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--lora", action="store_true", help="the LoRA table: LoRA and QLoRA, SFT and DPO, 1 and 2 GPUs")
    parser.add_argument("--fsdp", action="store_true", help="the FSDP table: full fine-tuning with and without offload")
    args = parser.parse_args()
    if args.lora:
        lora_table(args)
        return
    if args.fsdp:
        fsdp_table(args)
        return
    configs = {name: load_model_config(name) for name in args.models}
    splits = [(tp, args.gpus // tp) for tp in range(1, args.gpus + 1) if args.gpus % tp == 0]
    print(f"| layout ({args.gpus} GPUs, {args.precision}, micro-batch {args.micro_batch_size} x {args.seq_len}) | "
          + " | ".join(args.models) + " |")  # fmt: skip
    print("|---|" + "---:|" * len(args.models))
    for (tp, dp), zero, recompute in itertools.product(splits, (False, True), (False, True)):
        if zero and dp == 1:
            continue
        cells = []
        for cfg in configs.values():
            plan = plan_memory(cfg, tp=tp, dp=dp, distributed_optimizer=zero, precision=args.precision,
                               activation_checkpointing=recompute, micro_batch_size=args.micro_batch_size,
                               seq_len=args.seq_len)
            gib = plan.total / 2**30
            cells.append(f"{gib:.1f} GiB {'fits' if gib <= args.gpu_memory else '—'}")
        layout = f"TP={tp} x DP={dp}" + (", dist. opt." if zero else "") + (", recompute" if recompute else "")
        print(f"| {layout} | " + " | ".join(cells) + " |", flush=True)


def lora_table(args: argparse.Namespace) -> None:
    """Rank-16 adapters on every projection of Llama-3-8B and Qwen3-8B: a frozen bf16 base (LoRA) or an NF4 one
    (QLoRA), bf16 compute; SFT of one 2048-token sequence, DPO of one pair (the chosen and rejected sequences in
    one forward pass; the reference is the base with the adapters off, so no second copy). On 2 GPUs: TP=2,
    every tensor (the frozen base included) split in two."""
    models = ["llama3-8b", "qwen3-8b"]
    print(f"| run (bf16, {args.seq_len} tokens, rank-16 adapters on q k v o gate up down) | "
          + " | ".join(f"{m}, 1 GPU | {m}, 2 GPUs (TP=2)" for m in models) + " |")
    print("|---|" + "---:|" * 2 * len(models))
    for quantize, objective, recompute in itertools.product((None, "nf4"), ("SFT", "DPO"), (False, True)):
        cells = []
        for name in models:
            cfg = dataclasses.replace(load_model_config(name), lora=LoRAConfig(rank=16, alpha=32.0,
                                                                                  quantize_base=quantize))
            for tp in (1, 2):
                plan = plan_memory(cfg, tp=tp, precision="bf16", activation_checkpointing=recompute,
                                   micro_batch_size=2 if objective == "DPO" else 1, seq_len=args.seq_len)
                gib = plan.total / 2**30
                cells.append(f"{gib:.1f} GiB {'fits' if gib <= args.gpu_memory else '—'}")
        run = f"{'QLoRA (NF4 base)' if quantize else 'LoRA (bf16 base)'}, {objective}" + (", recompute" if recompute else "")
        print(f"| {run} | " + " | ".join(cells) + " |", flush=True)


def fsdp_table(args: argparse.Namespace) -> None:
    """Full fine-tuning (every weight, AdamW) under ``trainer.data_parallel: fsdp`` over ``--gpus`` GPUs, bf16: GiB
    per GPU and, with ``trainer.offload: params``, GiB of host memory per rank (the sharded fp32 weights, their
    gradients and AdamW's moments); with a full checkpoint, what its save gathers on each rank."""
    models = ["qwen2.5-1.5b", "gemma-1-2b", "llama3.2-3b", "llama3-8b"]
    print(f"| full fine-tuning (FSDP, bf16, {args.micro_batch_size} x {args.seq_len}) | "
          + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    rows = [(args.gpus, offload, recompute) for offload in ("none", "params") for recompute in (False, True)]
    rows += [(1, "params", recompute) for recompute in (False, True)]  # one GPU: only offload makes FSDP worth it
    for gpus, offload, recompute in rows:
        cells = []
        for name in models:
            plan = plan_memory(load_model_config(name), dp=gpus, data_parallel="fsdp", offload=offload,
                               precision="bf16", activation_checkpointing=recompute,
                               micro_batch_size=args.micro_batch_size, seq_len=args.seq_len)  # fmt: skip
            gib = plan.total / 2**30
            host = f" + {plan.host / 2**30:.1f} GiB host" if plan.host else ""
            cells.append(f"{gib:.1f} GiB{host} {'fits' if gib <= args.gpu_memory else '—'}")
        run = (f"{gpus} GPU{'s' if gpus > 1 else ''}, fsdp" + (", offload params" if offload != "none" else "")
               + (", recompute" if recompute else ""))  # fmt: skip
        print(f"| {run} | " + " | ".join(cells) + " |", flush=True)
    saves = [plan_memory(load_model_config(name), dp=args.gpus, data_parallel="fsdp", sharded_checkpoints=False,
                         micro_batch_size=1, seq_len=16).checkpoint / 2**30 for name in models]  # fmt: skip
    print("| a full (gathered) save's extra memory per rank; sharded: none | "
          + " | ".join(f"{gib:.1f} GiB" for gib in saves) + " |")


if __name__ == "__main__":
    main()

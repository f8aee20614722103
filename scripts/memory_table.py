"""Which models train on which GPUs, by the memory planner: a markdown table of GiB per GPU, layout by layout.

    python scripts/memory_table.py                                   # the seed's hardware: 2 x 24 GB, seq 2048
    python scripts/memory_table.py --gpus 8 --gpu-memory 80 --models llama3-8b   # 8 x 80 GB

Each row is one layout over ``--gpus`` GPUs (every TP x DP split, with and
without the distributed optimizer and activation checkpointing), bf16,
micro-batch 1; a cell is the planner's total per GPU and whether it fits
``--gpu-memory`` GiB (``ironcore model-info --memory`` gives the parts).
"""

from __future__ import annotations

import argparse
import itertools

from ironcore.config import load_model_config
from ironcore.training.memory import plan_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "gemma-1-2b", "llama3-8b"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GiB per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

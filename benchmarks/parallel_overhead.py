"""What tensor and data parallelism cost: step time and bytes communicated, vs one process on the same cores.

    python benchmarks/parallel_overhead.py                      # CPU, gloo: 1 process, TP=2, DP=2, ZeRO-1, FSDP
    python benchmarks/parallel_overhead.py --only "DP=2,DP=2 + FSDP" --repeats 12   # FSDP vs DDP, 12 pairs
    python benchmarks/parallel_overhead.py --device cuda        # GPUs, nccl (2-process layouts need 2 GPUs)

Every layout runs the same global batch per optimizer step (``--batch``
sequences of ``--seq`` tokens) through the full IronCore step: vocab-parallel
logits and cross-entropy, backward, ``finalize_grads`` (TP sums + DP
all-reduce), global-norm clipping, AdamW; with the distributed optimizer
(``DP=2 + dist. opt.``) the DP all-reduce becomes a reduce-scatter, each rank
steps its half of AdamW, and the parameters are all-gathered; with FSDP (``DP=2 + FSDP``, PyTorch's FSDP2
as ``trainer.data_parallel: fsdp`` applies it) each block's weights are all-gathered for its forward and
backward pass and its gradients reduce-scattered during the backward pass. On CPU the cores are shared fairly:
one process uses all ``--threads`` threads, each of two processes half. DP
ranks each take half the batch; TP ranks each hold half of every layer.

Each layout runs ``--repeats`` times, interleaved, and the fastest run
counts (a shared machine's background load only ever slows a run down); the
distributed optimizer is also compared with plain DP=2 round by round (the
median and spread of the per-round ratio). The optimizer state per rank is
the bytes of AdamW's moments rank 0 holds. "reduction after backward" is the time
the step spends in the gradient reduction and norm after the backward pass; with overlap what is left of it.
Bytes are counted by IronCore's collective wrappers (``ironcore.parallel.comm``)
on rank 0 (on gloo FSDP's collectives go through them too; on nccl they are FSDP's own, not counted: "-"): the payload a rank hands to each all-reduce, and the gathered
output of each all-gather. A ring all-reduce sends about 2(n-1)/n times its
payload over the wire per rank (1x for n=2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ironcore.config import load_model_config
from ironcore.config.base import validated
from ironcore.config.model import ModelConfig
from ironcore.config.training import OptimConfig
from ironcore.models import TransformerModel
from ironcore.parallel import comm
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
from ironcore.parallel.fsdp import apply_fsdp
from ironcore.parallel.grad import clip_factor
from ironcore.parallel.setup import destroy_parallel, init_parallel
from ironcore.parallel.sharding import local_tensor
from ironcore.training.distributed_optimizer import DistributedOptimizer
from ironcore.training.fsdp import FSDPOptimizer
from ironcore.training.optim import (
    build_optimizer,
    parameter_groups,
    reduce_gradients,
    step_with_scaled_grads,
)

# name, world size, tp size, distributed optimizer (False, True or "overlap": reductions during the backward pass)
LAYOUTS = [("1 process", 1, 1, False), ("TP=2", 2, 2, False), ("DP=2", 2, 1, False), ("DP=2 + dist. opt.", 2, 1, True),
           ("DP=2 + dist. opt. + overlap", 2, 1, "overlap"), ("DP=2 + FSDP", 2, 1, "fsdp"),
           ("DP=2 + FSDP (no reshard)", 2, 1, "fsdp-keep")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="llama-tiny", help="model config name (configs/model/NAME.yaml)")
    p.add_argument("--hidden", type=int, default=256, help="override hidden_size (0: keep the config's)")
    p.add_argument("--layers", type=int, default=4, help="override num_layers (0: keep the config's)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup); the median counts")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all layouts; the fastest round counts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by all processes")
    p.add_argument("--bucket-mb", type=float, default=4.0, help="the distributed optimizer's gradient buckets")
    p.add_argument("--only", default="", help="comma-separated layout names to run (default: all)")
    p.add_argument("--profile", action="store_true", help="after timing, profile 3 steps of each layout on rank 0 and "
                   "print its operators and FSDP's ranges by self CPU time (the last round's)")
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The named config, widened to ``--hidden`` (MLP and explicit head widths scaled along) and ``--layers`` deep."""
    cfg = load_model_config(args.model)
    overrides = {}
    if args.hidden:
        scale = args.hidden / cfg.hidden_size
        overrides.update(hidden_size=args.hidden, ffn_hidden_size=int(cfg.ffn_size * scale))
        if cfg.head_dim:
            overrides["head_dim"] = int(cfg.head_dim * scale)
    if args.layers:
        overrides["num_layers"] = args.layers
    return validated(dataclasses.replace(cfg, **overrides), "model")


def run_layout(rank: int, world: int, tp: int, distributed: bool | str, port: int, args: argparse.Namespace,
               out: str) -> None:  # fmt: skip
    """One process of a layout: time ``args.steps`` optimizer steps, rank 0 writes the numbers to ``out``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads // world))
    cfg = model_config(args)
    ctx = init_parallel(tp, cfg, device=args.device)
    torch.manual_seed(0)
    model = TransformerModel(cfg).to(ctx.device)
    if str(distributed).startswith("fsdp"):  # fsdp-keep: trainer.reshard_after_forward false
        apply_fsdp(model, bf16=False, offload=False, reshard_after_forward=distributed == "fsdp")
        optimizer = FSDPOptimizer(build_optimizer(model, OptimConfig(max_lr=1e-4, weight_decay=0.0)), model)
    elif distributed:  # buckets of --bucket-mb, so that the backward pass finishes some before its end
        optimizer = DistributedOptimizer(model, parameter_groups(model, 0.0), lambda groups: torch.optim.AdamW(
            groups, lr=1e-4, fused=True), bucket_bytes=int(args.bucket_mb * 2**20), overlap=distributed == "overlap")
    else:
        optimizer = build_optimizer(model, OptimConfig(max_lr=1e-4, weight_decay=0.0))
    rows = args.batch // ctx.dp_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(ctx.device)
    mine = tokens[ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows]
    inputs, targets = mine[:, :-1], mine[:, 1:]
    global_tokens = args.batch * args.seq

    waits: list[float] = []  # the gradient reduction's time after the backward pass (its norm included)

    def step() -> None:
        optimizer.zero_grad()
        logits = model(inputs, parallel_output=True)
        loss = vocab_parallel_cross_entropy(logits, targets).sum() / global_tokens
        if distributed == "overlap":
            optimizer.arm()
        loss.backward()
        start = time.perf_counter()
        norm = reduce_gradients(model, optimizer).item()
        waits.append(time.perf_counter() - start)
        step_with_scaled_grads(optimizer, clip_factor(norm, 1.0))

    for _ in range(args.warmup):
        step()
    comm.reset_traffic()
    waits.clear()
    times = []
    for _ in range(args.steps):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    traffic, table = dict(comm.traffic()), None  # the timed steps' traffic, not the profiled steps'
    if args.profile:  # every rank steps (the collectives need both), rank 0 reports
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48)
    if rank == 0:
        per_group: dict[str, float] = {}
        for tag, (nbytes, _) in traffic.items():
            group = tag.split("/")[1]
            per_group[group] = per_group.get(group, 0.0) + nbytes / args.steps
        calls = sum(n for _, n in traffic.values()) / args.steps
        fsdp = str(distributed).startswith("fsdp")
        states = optimizer.inner.state if fsdp else optimizer.state if not distributed else None
        moments = optimizer.state_bytes if states is None else sum(
            local_tensor(v).numel() * v.element_size() for s in states.values() for v in s.values() if v.dim())
        result = {"step_s": statistics.median(times), "bytes": None if fsdp and args.device == "cuda" else per_group,
                  "calls": calls, "state": moments,
                  "wait_s": statistics.median(waits), "profile": table}
        Path(out).write_text(json.dumps(result))
    destroy_parallel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    # Spinning OpenMP workers make a 2-thread process ~10x slower as soon as anything else runs on
    # its cores; the spawned processes read this when their thread pool starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU available")
    cfg = model_config(args)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} threads in all"
    print(
        f"model {cfg.name}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads "
        f"({cfg.kv_heads} kv), vocab {cfg.vocab_size}; global batch {args.batch} x {args.seq} tokens; {device_name}"
    )
    layouts = []
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {name for name, *_ in LAYOUTS})
    if unknown:
        raise SystemExit(f"--only: no layout {unknown}; layouts: {', '.join(name for name, *_ in LAYOUTS)}")
    for name, world, tp, distributed in LAYOUTS:
        if wanted and name not in wanted:
            continue
        if args.device == "cuda" and world > torch.cuda.device_count():
            print(f"{name}: skipped, needs {world} GPUs (nccl cannot put two ranks on one GPU)")
        else:
            layouts.append((name, world, tp, distributed))
    results: dict[str, dict] = {}
    rounds: list[dict[str, float]] = []
    for _ in range(args.repeats):  # rounds interleave the layouts, so background load hits them alike
        rounds.append({})
        for name, world, tp, distributed in layouts:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                mp.spawn(run_layout, args=(world, tp, distributed, free_port(), args, out.name), nprocs=world,
                         join=True)  # fmt: skip
                result = json.loads(Path(out.name).read_text())
            rounds[-1][name] = result["step_s"]
            rounds[-1][name + "/wait"] = result["wait_s"]
            if name not in results or result["step_s"] < results[name]["step_s"]:
                results[name] = result
            if result["profile"] is not None and len(rounds) == args.repeats:
                print(f"\n{name}: 3 profiled steps, rank 0\n{result['profile']}")
    base_name = "1 process" if "1 process" in results else next(iter(results))
    base = results[base_name]["step_s"]
    tokens = args.batch * args.seq
    print(f"\n| layout | step (ms) | vs {base_name} | tokens/s | reduction after backward (ms) | TP MB/step/rank "
          "| DP MB/step/rank | collectives/step | optimizer state MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        mb = {k: f"{v / 2**20:.2f}" for k, v in r["bytes"].items()} if r["bytes"] is not None else None
        traffic = (f"{mb.get('tp', '0.00')} | {mb.get('dp', '0.00')} | {r['calls']:.0f}" if mb is not None
                   else "- | - | -")  # fmt: skip
        print(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['step_s'] / base:.2f}x | {tokens / r['step_s']:,.0f} | "
              f"{r['wait_s'] * 1e3:.1f} | {traffic} | {r['state'] / 2**20:.2f} |")
    for a, b in (("DP=2 + dist. opt.", "DP=2"), ("DP=2 + dist. opt. + overlap", "DP=2"),
                 ("DP=2 + dist. opt. + overlap", "DP=2 + dist. opt."), ("DP=2 + FSDP", "DP=2"),
                 ("DP=2 + FSDP (no reshard)", "DP=2")):
        if a in results and b in results:
            ratios = [r[a] / r[b] for r in rounds]
            print(f"{a} / {b} step time, per round: median {statistics.median(ratios):.3f} "
                  f"({min(ratios):.3f}-{max(ratios):.3f}), {len(ratios)} rounds")
    overlap, after = "DP=2 + dist. opt. + overlap", "DP=2 + dist. opt."
    if overlap in results and after in results:  # the reduction left to wait for, per round
        hidden = [1 - r[overlap + "/wait"] / r[after + "/wait"] for r in rounds]
        print(f"overlap: share of the reduction (and norm) time hidden in the backward pass, per round: median "
              f"{statistics.median(hidden):.0%} ({min(hidden):.0%} to {max(hidden):.0%})")


if __name__ == "__main__":
    main()

"""LoRA's memory and speed: against full fine-tuning of the same model, and against a PEFT + HF training loop.

Part 1, one fresh process per row (so each peak RSS is its own): IronCore's model of ``--model`` (a real-size
config, random weights), ``--steps`` AdamW steps of one micro-batch, fully fine-tuned, with LoRA, and with
QLoRA (NF4 base, dequantised to the compute dtype in each matmul: ``--precision``, fp32 by default since a
CPU's bf16 matmuls are slower than its fp32 ones; QLoRA on a GPU computes in bf16); reported: the median step time; the peak bytes allocated in a
step (the states measured, plus the most one profiled step allocated beyond them: the CPU analogue of CUDA's
``max_memory_allocated``) beside the planner's figure; the peak RSS above the imports (which adds what the
allocator keeps after freeing and the model's initialisation); the trained parameters.

Part 2, one process: the same base and LoRA adapters in IronCore and in HF Transformers + PEFT (ours exported
with ``save_hf_model``, PEFT's fresh adapters saved and loaded into IronCore, so both hold the same weights),
the same batches, AdamW on the adapters; their steps alternate (ABBA) for ``--pairs`` pairs. Reported: the
step-1 losses (equal weights and data must give equal losses), the median and range of the per-pair ratio of
step times (HF + PEFT / IronCore: > 1 is faster), and the matmul peak measured in the same run (the physical
limit of a step: the frozen base's forward and input-gradient GEMMs). ``--device cuda --precision bf16``
runs part 2 on a GPU as both are trained there: the frozen base stored in bf16, fp32 adapters, bf16 autocast.

    python benchmarks/lora_throughput.py                         # qwen2.5-0.5b, 256 tokens, 10 pairs
    python benchmarks/lora_throughput.py --model llama-tiny --seq-len 64 --steps 3 --pairs 4   # a smoke run
    python benchmarks/lora_throughput.py --kinds --device cuda --precision bf16 --seq-len 2048  # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

# This folder's kernels.py would shadow the `kernels` package that transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(args: argparse.Namespace, kind: str):
    from ironcore.config import load_model_config
    from ironcore.config.model import LoRAConfig

    cfg = load_model_config(args.model)
    if kind == "full":
        return cfg
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=list(TARGETS),
                      quantize_base="nf4" if kind == "qlora" else None)  # fmt: skip
    return dataclasses.replace(cfg, lora=lora)


def _batch(step: int, args: argparse.Namespace, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), generator=torch.Generator().manual_seed(step))


def child(args: argparse.Namespace) -> None:
    """One row of part 1, in its own process: prints one JSON line."""
    from ironcore.config.training import OptimConfig
    from ironcore.models import TransformerModel
    from ironcore.models.lora import cast_base, quantize_base
    from ironcore.training.memory import measured_state_bytes, plan_memory
    from ironcore.training.optim import build_optimizer

    torch.set_num_threads(args.threads)
    kind = args.child
    precision = args.precision
    cfg = _config(args, kind)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Python, torch: not the step's
    torch.manual_seed(0)
    model = TransformerModel(cfg)
    if kind == "qlora":
        if precision == "bf16":
            cast_base(model, torch.bfloat16)
        quantize_base(model)
    optimizer = build_optimizer(model, OptimConfig(max_lr=1e-4), precision=precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def train_step(tokens: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=torch.full(tokens[:, 1:].shape,
                                                                                        1.0 / tokens[:, 1:].numel()))
        loss.backward()
        optimizer.step()
        return loss

    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = train_step(_batch(step, args, cfg.vocab_size))
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    plan = plan_memory(cfg, precision=precision, micro_batch_size=args.micro_batch, seq_len=args.seq_len)
    states = sum(measured_state_bytes(model, optimizer))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # one more step, profiled
        train_step(_batch(args.steps + 1, args, cfg.vocab_size))
    print(json.dumps({
        "kind": kind, "step_s": statistics.median(times), "times": times, "loss": loss.item(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "start_rss_gib": before,
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "planned_gib": plan.total / 2**30, "planned_states_gib": plan.states / 2**30,
        "peak_allocated_gib": (states + step_peak(prof)) / 2**30, "states_gib": states / 2**30,
        "matmul_share": matmul_share(prof),
    }))


def matmul_time(prof: profile, device: str = "cpu") -> tuple[float, float]:
    """A profiled step's seconds in GEMMs (aten::mm, addmm, bmm) and in all operators, on the CPU (self CPU time)
    or on the GPU (kernel time)."""
    if device == "cpu":
        times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        gemm = sum(times.get(name, 0) for name in ("aten::mm", "aten::addmm", "aten::bmm"))
        return gemm / 1e6, sum(times.values()) / 1e6
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    gemm = sum(e.self_device_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return gemm / 1e6, sum(e.self_device_time_total for e in ops) / 1e6


def matmul_share(prof: profile) -> float:
    """The share of a profiled step's CPU time in GEMMs."""
    gemm, total = matmul_time(prof)
    return gemm / total


def step_peak(prof: profile) -> int:
    """The most bytes a profiled step had allocated beyond what it started with (the CPU analogue of CUDA's
    ``max_memory_allocated``): each operator's own allocations and frees, summed in the order they started."""
    running = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def matmul_peak(threads: int, device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                repeat: int = 10) -> float:
    """GEMM rate of this device now in ``dtype`` (FLOP/s): the limit a training step's matmuls run against."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for a GPU; the sum adds size^2 to 2 size^3 FLOPs
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peer(args: argparse.Namespace) -> dict:
    """Part 2: IronCore LoRA vs HF + PEFT LoRA on the same weights and batches, interleaved."""
    import peft
    import transformers

    from ironcore.checkpoints.hf import save_hf_model
    from ironcore.checkpoints.load import load_model
    from ironcore.config.training import OptimConfig
    from ironcore.models import TransformerModel
    from ironcore.models.lora import cast_base
    from ironcore.models.stats import model_stats
    from ironcore.training.optim import build_optimizer
    from ironcore.training.perf import retain_freed_host_memory

    torch.set_num_threads(args.threads)
    device, bf16 = torch.device(args.device), args.precision == "bf16"
    if args.retain:  # what the trainer does on a CPU (trainer.retain_host_memory), for both: one process
        retain_freed_host_memory()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_hf_model(TransformerModel(_config(args, "full")), Path(tmp) / "base")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "base", attn_implementation="sdpa")
        theirs = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                         target_modules=TARGETS))  # fmt: skip
        theirs.save_pretrained(Path(tmp) / "adapter")
        ours = load_model(Path(tmp) / "adapter").train()
    if bf16:  # both as their users train in bf16: the frozen base stored in bf16, fp32 adapters, bf16 autocast
        cast_base(ours, torch.bfloat16)  # what the trainer does (trainer.precision bf16)
        for param in theirs.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    ours.to(device)
    theirs.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    opt_ours = build_optimizer(ours, OptimConfig(max_lr=1e-4))
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4, fused=True)
    vocab = ours.config.vocab_size

    def ours_step(tokens: torch.Tensor) -> float:  # each step ends in .item(): on a GPU it waits for its kernels
        opt_ours.zero_grad(set_to_none=True)
        weights = torch.full(tokens[:, 1:].shape, 1.0 / tokens[:, 1:].numel(), device=device)
        with autocast:
            loss = ours(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=weights)
        loss.backward()
        opt_ours.step()
        return loss.item()

    def theirs_step(tokens: torch.Tensor) -> float:
        opt_theirs.zero_grad(set_to_none=True)
        with autocast:
            logits = theirs(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt_theirs.step()
        return loss.item()

    first = (ours_step(_batch(0, args, vocab).to(device)), theirs_step(_batch(0, args, vocab).to(device)))
    for _ in range(2 if device.type == "cuda" else 0):  # a GPU's first steps also choose kernels and allocate
        for step in (ours_step, theirs_step):
            step(_batch(0, args, vocab).to(device))
    ratios, ours_times, their_times = [], [], []
    for pair in range(args.pairs):
        tokens = _batch(pair + 1, args, vocab).to(device)
        timed = {}
        for name, step in (("ours", ours_step), ("theirs", theirs_step))[:: 1 if pair % 2 == 0 else -1]:
            start = time.perf_counter()
            step(tokens)
            timed[name] = time.perf_counter() - start
        ours_times.append(timed["ours"])
        their_times.append(timed["theirs"])
        ratios.append(timed["theirs"] / timed["ours"])
    gemms = {}
    for name, step in (("ours", ours_step), ("theirs", theirs_step)) if args.profile else ():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(_batch(args.pairs + 1, args, vocab).to(device))
        gemms[name] = matmul_time(prof, device.type)
    # The frozen base's step: the forward pass and the backward pass's input gradients (no weight gradients), two
    # forward passes' FLOPs; the adapters add ~2 % at rank 16. At the measured matmul peak that is the fastest step.
    flops = 2 * model_stats(ours.config, args.seq_len).forward_flops_per_token * args.seq_len * args.micro_batch
    peak = matmul_peak(args.threads, args.device, torch.bfloat16 if bf16 else torch.float32,
                       size=1024 if device.type == "cpu" else 8192)  # fmt: skip
    return {"first_losses": first, "ratio_median": statistics.median(ratios), "ratios": ratios,
            "ours_step_s": statistics.median(ours_times), "theirs_step_s": statistics.median(their_times),
            "matmul_peak_gflops": peak / 1e9, "matmul_bound_s": flops / peak, "gemms": gemms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per part-1 row (after one untimed)")
    parser.add_argument("--pairs", type=int, default=10, help="interleaved step pairs of part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the compute (bf16 on a GPU; this CPU's bf16 matmuls are ~3.5x slower than fp32)")
    parser.add_argument("--device", default="cpu", help="part 2's device (part 1 measures host memory: CPU only)")
    parser.add_argument("--kinds", nargs="*", default=["full", "lora", "qlora"], help="part 1's rows (none: skip it)")
    parser.add_argument("--retain", action="store_true",
                        help="part 2 with freed host memory kept for reuse, as the trainer runs on a CPU")
    parser.add_argument("--profile", action="store_true",
                        help="part 2 then profiles one step of each: its time in GEMMs and in all operators")
    parser.add_argument("--child", choices=["full", "lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.device != "cpu" and args.kinds:
        parser.error("part 1 measures host memory: on a GPU run part 2 alone (--kinds with no rows)")
    print(f"{args.model}, {args.micro_batch} x {args.seq_len} tokens, LoRA rank {args.rank} on {', '.join(TARGETS)}, "
          f"{args.threads} threads", flush=True)
    rows = []
    for kind in args.kinds:
        cmd = [sys.executable, __file__, "--child", kind, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"{kind:6s} step {r['step_s']:.2f} s (median of {len(r['times'])}; "
              f"{min(r['times']):.2f}-{max(r['times']):.2f}); peak allocated {r['peak_allocated_gib']:.2f} GiB "
              f"(states {r['states_gib']:.2f}), planned {r['planned_gib']:.2f} (states "
              f"{r['planned_states_gib']:.2f}); peak RSS {r['peak_rss_gib'] - r['start_rss_gib']:.2f} GiB above the "
              f"imports; trained {r['trained'] / 1e6:.2f} M parameters; GEMMs {r['matmul_share']:.0%} of a step",
              flush=True)
    if not args.pairs:
        return
    result = peer(args)
    tokens = args.micro_batch * args.seq_len
    print(f"IronCore LoRA vs HF + PEFT LoRA, {args.pairs} interleaved pairs: step-1 losses "
          f"{result['first_losses'][0]:.4f} / {result['first_losses'][1]:.4f}; step {result['ours_step_s']:.3f} s "
          f"({tokens / result['ours_step_s']:,.0f} tokens/s) vs {result['theirs_step_s']:.3f} s "
          f"({tokens / result['theirs_step_s']:,.0f}); speed ratio median {result['ratio_median']:.2f} "
          f"(range {min(result['ratios']):.2f}-{max(result['ratios']):.2f}); {args.device} {args.precision} matmul peak "
          f"{result['matmul_peak_gflops']:.0f} GFLOP/s, at which the step's matmuls take "
          f"{result['matmul_bound_s']:.2f} s: IronCore {result['matmul_bound_s'] / result['ours_step_s']:.0%} of that "
          f"bound, HF + PEFT {result['matmul_bound_s'] / result['theirs_step_s']:.0%}")
    for name, label in (("ours", "IronCore"), ("theirs", "HF + PEFT")):
        if name in result["gemms"]:
            gemm, total = result["gemms"][name]
            print(f"profiled step, {label}: {gemm:.3f} s in GEMMs of {total:.3f} s in operators "
                  f"({gemm / total:.0%}), {total - gemm:.3f} s in the rest")


if __name__ == "__main__":
    main()

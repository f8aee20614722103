"""End-to-end training throughput: IronCore's trainer vs a plain HF Transformers training loop.

Both train the same architecture from the same initial weights (ours is
exported with ``save_hf_model`` and loaded by ``AutoModelForCausalLM``) on the
same batches of the same preprocessed corpus (tinyshakespeare, GPT-2
tokenizer), fp32 (or bf16 autocast), AdamW + cosine schedule + gradient
clipping, on the same device; each configuration runs in its own process so
peak RSS is its own.
IronCore is measured through ``ironcore.training.trainer.Trainer`` (data loading,
logging and metrics included); the HF side is the loop people write around
``model(input_ids).logits``. IronCore's trainer keeps freed host memory for
reuse (``trainer.retain_host_memory``, see ``ironcore/training/perf.py``); the plain
HF loop does not, so a third row runs the HF loop with that same allocator
setting, to show how much of the gap it accounts for. Reported: median
tokens/s over the timed steps (the fastest of ``--repeat`` interleaved runs,
all of them listed), MFU against the peak (on CPU the fp32 matmul rate
measured in the same run, on a GPU its data-sheet figure), peak RSS, and the
loss of step 1 (equal weights and data must give equal losses).

    python benchmarks/train_throughput.py                        # gpt2-small, eager and compiled
    python benchmarks/train_throughput.py --model llama-tiny --steps 6 --modes eager
    python benchmarks/train_throughput.py --modes eager --impls ironcore hf --repeat 10   # more pairs
    python benchmarks/train_throughput.py --modes eager --impls ironcore hf --profile     # matmuls vs the rest
    python benchmarks/train_throughput.py --device cuda --precision bf16 --micro-batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("ironcore", "hf", "hf-retain")


def prepare_data(workdir: Path, seq_len: int) -> Path:
    """tinyshakespeare tokenized with the GPT-2 tokenizer; returns the data config path."""
    import yaml

    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess

    path = workdir / "data.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tinyshakespeare-gpt2", "task_type": "pretrain",
        "source": {"path": str(ROOT / "examples/data/tinyshakespeare.txt"), "document_split": "paragraph"},
        "tokenizer": {"path": str(ROOT / "examples/data/gpt2")}, "max_seq_length": seq_len,
        "valid_fraction": 0.0, "output_dir": str(workdir / "data"), "num_workers": 2,
    }))
    preprocess(load_data_config(path), progress=False)
    return path


def model_for_gpt2_tokens(name: str) -> dict:
    """The named model with (at least) the GPT-2 vocabulary, so tiny configs can run on the same data."""
    from ironcore.config import load_model_config, to_dict

    model = to_dict(load_model_config(name))
    model["vocab_size"] = max(model["vocab_size"], 50257)
    return model


def training_config(args: argparse.Namespace, data_config: Path, out: Path):
    from ironcore.config import build_config

    return build_config({
        "model": model_for_gpt2_tokens(args.model),
        "data": {"config_path": str(data_config)},
        "trainer": {"micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
                    "output_dir": str(out), "save_interval": 0, "compile": args.compile, "device": args.device,
                    "precision": args.precision},
        "operation": {"train_steps": args.warmup + args.steps + int(args.profile),  # + the profiled step
                      "eval_interval": 0, "log_interval": 1},
        "optim": {"max_lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2},
        "utils": {"tracking": False},
    }, world_size=1)


def run_ironcore(args: argparse.Namespace, data_config: Path, workdir: Path) -> dict:
    from ironcore.training.trainer import Trainer

    cfg = training_config(args, data_config, workdir / "run")
    trainer = Trainer(cfg)
    result = timed_steps(args, lambda step: trainer.train_step()["loss"])
    return {**result, "tokens_per_step": trainer.tokens_per_step}


def run_hf(args: argparse.Namespace, data_config: Path, workdir: Path) -> dict:
    """The plain HF loop ("hf"), or the same loop with IronCore's host-allocator setting ("hf-retain")."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ironcore.checkpoints.hf import save_hf_model
    from ironcore.training.optim import learning_rate
    from ironcore.training.trainer import Trainer

    cfg = training_config(args, data_config, workdir / "run")
    cfg.trainer.retain_host_memory = args.impl == "hf-retain"
    reference = Trainer(cfg)  # same seed -> the same initial weights and the same batches as the IronCore run
    save_hf_model(reference.model, workdir / "hf")
    batches, total = reference.train_data, reference.total_steps
    del reference
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(workdir / "hf", attn_implementation="sdpa").float().to(device).train()
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.max_lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def train_step(step: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, cfg.optim)
        (mb,) = batches.step(step * cfg.trainer.train_batch_size)
        with autocast:
            logits = model(mb["input_ids"].to(device)).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    result = timed_steps(args, train_step)
    return {**result, "tokens_per_step": cfg.trainer.train_batch_size * args.seq_len}


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def timed_steps(args: argparse.Namespace, train_step: Callable[[int], float]) -> dict:
    """Step times after the warm-up and the step-1 loss; with ``--profile`` one more step under the
    profiler, split into time in matmuls and in every other ATen op (self times, so nothing counts twice)."""
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(train_step(step))
        times.append(time.perf_counter() - start)
    result = {"step_times": times[args.warmup:], "first_loss": losses[0]}
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            train_step(args.warmup + args.steps)
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        result["matmul_s"] = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e6
        result["other_s"] = sum(e.self_cpu_time_total for e in ops if e.key not in MATMULS) / 1e6
        result["op_calls"] = sum(e.count for e in ops)  # the profiler's own cost grows with this
    return result


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    run = run_ironcore if args.impl == "ironcore" else run_hf
    result = run(args, Path(args.data_config), Path(tempfile.mkdtemp(dir=workdir)))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_worker(args: argparse.Namespace, impl: str, mode: str, workdir: str, data_config: Path) -> dict:
    """One configuration in a fresh process (its own peak RSS, its own allocator state)."""
    cmd = [sys.executable, __file__, "--impl", impl, "--workdir", workdir, "--data-config", str(data_config),
           "--model", args.model, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision]
    if mode == "compiled":
        cmd.append("--compile")
    if args.profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{impl} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, both sides")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs of every row; the fastest is shown")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="rows to run (hf, the baseline, always runs)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per run: seconds in matmuls vs all other ATen ops (eager)")
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        worker(args)
        return

    from ironcore.config import load_model_config
    from ironcore.models.stats import model_stats
    from ironcore.training.perf import measured_cpu_peak, peak_flops

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = measured_cpu_peak(2048) if device.type == "cpu" else peak_flops(device, args.precision)
    flops_per_token = model_stats(load_model_config(model_for_gpt2_tokens(args.model)), args.seq_len).train_flops_per_token
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_config = prepare_data(workdir, args.seq_len)
        runs: dict[tuple[str, str], list[dict]] = {}  # every run of every row, in order
        for _ in range(args.repeat):  # interleaved, so slow phases of a shared machine hit every row alike
            for mode in args.modes:
                for impl in [i for i in IMPLS if i in args.impls or i == "hf"]:
                    r = run_worker(args, impl, mode, tmp, data_config)
                    r["tokens_per_sec"] = r["tokens_per_step"] / statistics.median(r["step_times"])
                    r["mfu"] = r["tokens_per_sec"] * flops_per_token / peak
                    runs.setdefault((impl, mode), []).append(r)
    results = {key: max(rs, key=lambda r: r["tokens_per_sec"]) for key, rs in runs.items()}
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {where}, {args.precision}; model {args.model}; batch {args.micro_batch} x "
          f"{args.seq_len}; {args.steps} timed steps after {args.warmup}; best of {args.repeat} interleaved runs; "
          f"peak {peak / 1e12:.2f} TFLOP/s ({'measured fp32 matmul' if device.type == 'cpu' else 'data sheet'})")
    header = f"{'mode':<9} {'impl':<10} {'tok/s':>8} {'vs HF eager':>12} {'vs HF same mode':>16} {'MFU':>6} " \
             f"{'peak RSS':>9} {'step-1 loss':>11}  tok/s of each run"
    print(header)
    print("-" * len(header))
    base = results[("hf", "eager")]["tokens_per_sec"] if ("hf", "eager") in results else float("nan")
    for (impl, mode), r in results.items():
        same = r["tokens_per_sec"] / results[("hf", mode)]["tokens_per_sec"]
        print(f"{mode:<9} {impl:<10} {r['tokens_per_sec']:>8.0f} {r['tokens_per_sec'] / base:>11.2f}x {same:>15.2f}x "
              f"{r['mfu']:>6.1%} {r['peak_rss_mb']:>7.0f}MB {r['first_loss']:>11.5f}  "
              + " ".join(f"{x['tokens_per_sec']:.0f}" for x in runs[(impl, mode)]))
    if "hf-retain" in args.impls:
        print("hf-retain: the HF loop with IronCore's host-allocator setting (trainer.retain_host_memory)")
    for mode in args.modes if "ironcore" in args.impls else []:  # each pair ran back to back: the least noisy summary
        pairs = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(runs[("ironcore", mode)], runs[("hf", mode)])]
        print(f"IronCore / HF {mode}, per interleaved run: " + " ".join(f"{x:.2f}" for x in pairs)
              + f" (median {statistics.median(pairs):.2f})")
    for (impl, mode), rs in runs.items() if args.profile else []:  # where the ratio comes from
        print(f"profiled step, {mode} {impl}: matmuls / other ops (s), ATen calls, per run: "
              + "  ".join(f"{r['matmul_s']:.2f}/{r['other_s']:.2f} {r['op_calls']}" for r in rs))


if __name__ == "__main__":
    main()

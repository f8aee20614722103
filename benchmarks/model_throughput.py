"""Training-step throughput of IronCore's TransformerModel vs the identical HF Transformers model.

Both models hold the same weights (ours is exported with ``save_hf_model`` and
loaded by ``AutoModelForCausalLM.from_pretrained``), see the same batch, and run
forward + cross-entropy + backward + AdamW, eager (no torch.compile), on the
same device. HF uses its default attention (SDPA), as we do. Steps alternate
between the two in rounds so that machine noise hits both alike; the median
step time is reported, with MFU against the peak: on CPU the fp32 matmul rate
measured in the same run, on a GPU its data-sheet figure for the precision
(fp32, or bf16 autocast with ``--precision bf16``). Prints; asserts nothing.

    python benchmarks/model_throughput.py                 # gpt2-small and a LLaMA-style 125M model
    python benchmarks/model_throughput.py --models llama-tiny --seq-len 128 --rounds 3
    python benchmarks/model_throughput.py --device cuda --precision bf16 --batch 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from ironcore.checkpoints.hf import save_hf_model
from ironcore.config import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.models import TransformerModel
from ironcore.models.stats import model_stats
from ironcore.training.perf import measured_cpu_peak, peak_flops

# A LLaMA-architecture model of GPT-2-small's compute (GQA, SwiGLU, RMSNorm, RoPE, untied).
LLAMA_125M = dict(
    name="llama-125m", vocab_size=32000, hidden_size=768, num_layers=12, num_attention_heads=12,
    num_key_value_heads=4, ffn_hidden_size=2048, max_position_embeddings=2048, norm_type="rmsnorm",
    norm_eps=1e-5, position_embedding="rope", activation="silu", gated_mlp=True, tie_word_embeddings=False,
)


def twin_models(name: str) -> tuple[ModelConfig, TransformerModel, torch.nn.Module]:
    """The named model (seed 0) and the HF model loaded from its exported weights: one network, twice."""
    from transformers import AutoModelForCausalLM

    cfg = load_model_config(LLAMA_125M if name == "llama-125m" else name)
    torch.manual_seed(0)
    ours = TransformerModel(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").float()
    return cfg, ours, theirs


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def make_step(model: torch.nn.Module, hf: bool, device: torch.device, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast(device, precision):
            logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a host sync: the step's time is all of its kernels

    return step


def bench(name: str, batch: int, seq_len: int, rounds: int, steps_per_round: int, peak: float,
          device: torch.device, precision: str) -> dict:
    cfg, ours, theirs = twin_models(name)
    ours.to(device).train()
    theirs.to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
    steps = {"ironcore": make_step(ours, False, device, precision), "hf": make_step(theirs, True, device, precision)}
    first = {k: step(x, y) for k, step in steps.items()}  # warm-up; identical weights give identical losses
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            for _ in range(steps_per_round):
                start = time.perf_counter()
                step(x, y)
                times[key].append(time.perf_counter() - start)
    flops_per_token = model_stats(cfg, seq_len).train_flops_per_token
    tokens = batch * seq_len
    row = {"model": name, "params_M": sum(p.numel() for p in ours.parameters()) / 1e6,
           "first_loss_diff": abs(first["ironcore"] - first["hf"])}
    for key, samples in times.items():
        tps = tokens / statistics.median(samples)
        row[f"{key}_tok_s"] = tps
        row[f"{key}_mfu"] = tps * flops_per_token / peak
    row["ratio"] = row["ironcore_tok_s"] / row["hf_tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "llama-125m"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = measured_cpu_peak(2048) if device.type == "cpu" else peak_flops(device, args.precision)
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {where}, {args.precision}, eager; peak {peak / 1e12:.2f} TFLOP/s "
          f"({'measured fp32 matmul' if device.type == 'cpu' else 'data sheet'}); batch {args.batch} x {args.seq_len}")
    header = (f"{'model':<12} {'params':>8} {'IronCore tok/s':>15} {'HF tok/s':>10} {'ratio':>6} "
              f"{'IronCore MFU':>13} {'HF MFU':>7} {'|loss diff|':>11}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        r = bench(name, args.batch, args.seq_len, args.rounds, args.steps_per_round, peak, device, args.precision)
        print(f"{r['model']:<12} {r['params_M']:>7.1f}M {r['ironcore_tok_s']:>15.0f} {r['hf_tok_s']:>10.0f} "
              f"{r['ratio']:>5.2f}x {r['ironcore_mfu']:>12.1%} {r['hf_mfu']:>7.1%} {r['first_loss_diff']:>11.2e}")


if __name__ == "__main__":
    main()

"""Training-step throughput of IronCore's TransformerModel vs the identical HF Transformers model.

Both models hold the same weights (ours is exported with ``save_hf_model`` and
loaded by ``AutoModelForCausalLM.from_pretrained``), see the same batch, and run
forward + cross-entropy + backward + AdamW in fp32, eager (no torch.compile),
on the same threads. HF uses its default attention (SDPA), as we do. Steps
alternate between the two in rounds so that machine noise hits both alike;
the median step time is reported, with MFU against the fp32 matmul peak
measured on this machine in the same run. Prints; asserts nothing.

    python benchmarks/model_throughput.py                 # gpt2-small and a LLaMA-style 125M model
    python benchmarks/model_throughput.py --models llama-tiny --seq-len 128 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from ironcore.checkpoints.hf import save_hf_model
from ironcore.config import load_model_config
from ironcore.config.model import ModelConfig
from ironcore.models import TransformerModel
from ironcore.models.stats import model_stats
from ironcore.training.perf import measured_cpu_peak

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


def make_step(model: torch.nn.Module, hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench(name: str, batch: int, seq_len: int, rounds: int, steps_per_round: int, peak: float) -> dict:
    cfg, ours, theirs = twin_models(name)
    ours.train()
    theirs.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    steps = {"ironcore": make_step(ours, hf=False), "hf": make_step(theirs, hf=True)}
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = measured_cpu_peak(2048)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, eager; "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; batch {args.batch} x {args.seq_len} tokens")
    header = (f"{'model':<12} {'params':>8} {'IronCore tok/s':>15} {'HF tok/s':>10} {'ratio':>6} "
              f"{'IronCore MFU':>13} {'HF MFU':>7} {'|loss diff|':>11}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        r = bench(name, args.batch, args.seq_len, args.rounds, args.steps_per_round, peak)
        print(f"{r['model']:<12} {r['params_M']:>7.1f}M {r['ironcore_tok_s']:>15.0f} {r['hf_tok_s']:>10.0f} "
              f"{r['ratio']:>5.2f}x {r['ironcore_mfu']:>12.1%} {r['hf_mfu']:>7.1%} {r['first_loss_diff']:>11.2e}")


if __name__ == "__main__":
    main()

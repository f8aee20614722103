"""What Muon costs per training step next to AdamW, on the `methods` sweep's model (nanoGPT's CPU recipe).

    python benchmarks/optimizer_step_cost.py                 # 10 interleaved pairs of 10 steps, 1 thread
    python benchmarks/optimizer_step_cost.py --pairs 20 --threads 2

The `methods` sweep (configs/pipeline.yaml, docs/playground.md) reports each point's wall time, but its jobs
share the machine with each other. This isolates the optimizer: the sweep's model (4 layers x 128, 257 tokens,
64 positions, tied embeddings), a batch of 12 random sequences, forward, backward and the optimizer step
(``ironcore.training.optim.build_optimizer``: fused AdamW, or muon = torch.optim.Muon on the blocks' matrices +
fused AdamW on the rest, with ``match_rms_adamw``), timed over ``--steps`` steps after 5 warm-up steps. AdamW
and Muon alternate (pairs, the order flipped every other pair) so that the machine's load falls on both; the
result is the median of the per-pair ratios muon/adamw and its spread (min-max), and each one's median
milliseconds per step. The same run times one matrix product of the size Newton-Schulz multiplies (X X^T of a
128 x 512 update) in fp32 and in bf16, the dtype torch's Muon orthogonalises in: a CPU without bf16 matrix
instructions (AVX512-BF16, AMX) emulates bf16, and that is where Muon's time goes there.
Results: docs/benchmarks.md (training methods).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ironcore.config import load_model_config
from ironcore.config.base import from_dict
from ironcore.config.training import OptimConfig
from ironcore.models import TransformerModel
from ironcore.training.optim import build_optimizer

MODEL = {"name": "nanogpt-char", "vocab_size": 257, "hidden_size": 128, "num_layers": 4, "num_attention_heads": 4,
         "max_position_embeddings": 64, "position_embedding": "learned", "norm_type": "layernorm",
         "gated_mlp": False, "activation": "gelu", "attention_bias": False, "attention_out_bias": False,
         "mlp_bias": False, "tie_word_embeddings": True}  # fmt: skip
OPTIM = {"adamw": {"optimizer": "adamw"},
         "muon": {"optimizer": "muon", "optimizer_options": {"adjust_lr_fn": "match_rms_adamw"}}}  # fmt: skip


def milliseconds_per_step(name: str, steps: int) -> float:
    """Mean milliseconds of forward + backward + step of a fresh model with optimizer ``name``."""
    torch.manual_seed(0)
    model = TransformerModel(load_model_config(dict(MODEL)))
    optimizer = build_optimizer(model, from_dict(OptimConfig, {**OPTIM[name], "max_lr": 1e-3, "weight_decay": 0.1}))
    tokens = torch.randint(0, MODEL["vocab_size"], (12, 65))

    def step() -> None:
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) * 1000 / steps


def matmul_ms(dtype: torch.dtype, repeats: int = 200) -> float:
    """Milliseconds of X @ X.T for a 128 x 512 X of ``dtype`` (one of Newton-Schulz's products)."""
    x = torch.randn(128, 512).to(dtype)
    x @ x.T
    started = time.perf_counter()
    for _ in range(repeats):
        x @ x.T
    return (time.perf_counter() - started) * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"adamw": [], "muon": []}
    for pair in range(args.pairs):
        for name in ("adamw", "muon") if pair % 2 == 0 else ("muon", "adamw"):
            times[name].append(milliseconds_per_step(name, args.steps))
        print(f"pair {pair + 1}: adamw {times['adamw'][-1]:.2f} ms, muon {times['muon'][-1]:.2f} ms per step")
    ratios = [m / a for a, m in zip(times["adamw"], times["muon"], strict=True)]
    print(f"{args.pairs} pairs x {args.steps} steps, {args.threads} thread(s), torch {torch.__version__}: "
          f"adamw {statistics.median(times['adamw']):.2f} ms/step, muon {statistics.median(times['muon']):.2f} "
          f"ms/step; muon/adamw median {statistics.median(ratios):.3f} (spread {min(ratios):.3f}-{max(ratios):.3f})")
    fp32, bf16 = matmul_ms(torch.float32), matmul_ms(torch.bfloat16)
    print(f"X @ X.T, X 128 x 512: fp32 {fp32:.3f} ms, bf16 {bf16:.3f} ms ({bf16 / fp32:.1f}x)")


if __name__ == "__main__":
    main()

"""Forward + backward time of IronCore's MoE block vs HF's Mixtral and Qwen3-MoE blocks on the same weights,
and vs the dense gated MLP of the same active parameters.

One MoE layer (router, 8 experts, top-2 by default) in each implementation,
holding the same weights: HF's ``MixtralSparseMoeBlock`` and
``Qwen3MoeSparseMoeBlock`` with their ``eager`` experts (a loop over the
experts that some token chose), ours (the assignments sorted by expert, one
contiguous block per expert, one ``index_add`` back). Before timing, the
outputs are checked equal. Each round times every variant once
(interleaved), fp32, on the same input and upstream gradient; the report is
the median time per variant and, per HF block, the median and spread of the
per-round ratio HF / ours (goal: >= 2x). The dense row is a gated MLP of
width top-k x expert width: the same multiply-adds per token, no routing.
Prints; asserts nothing.

    python benchmarks/moe_throughput.py                     # 8 experts, top-2, hidden 512, 256 to 4096 tokens
    python benchmarks/moe_throughput.py --experts 64 --top-k 8 --ffn 256 --rounds 10
    python benchmarks/moe_throughput.py --device cuda --tokens 16384 --hidden 2048 --ffn 1408

The experts' matmuls are the same in every variant: where they dominate
(many tokens per expert) no implementation can beat the dense row, and the
ratio to HF is bounded by HF's own overhead; where there are few tokens per
expert, HF's per-expert costs (each expert's weight gradient a zero-filled
copy of all experts') dominate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ironcore.config.base import from_dict
from ironcore.config.model import ModelConfig
from ironcore.layers.mlp import MLP
from ironcore.layers.moe import MoE


def blocks(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    """Our MoE block, HF's two on its weights, and the dense MLP of the same active width."""
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = from_dict(ModelConfig, dict(
        hidden_size=args.hidden, num_attention_heads=8, ffn_hidden_size=args.ffn, gated_mlp=True, activation="silu",
        num_experts=args.experts, num_experts_per_token=args.top_k, position_embedding="rope",
    ), "model")  # fmt: skip
    torch.manual_seed(0)
    ours = MoE(cfg)
    ours.reset_parameters(0.02, 0.02)
    common = dict(hidden_size=args.hidden, intermediate_size=args.ffn, num_experts_per_tok=args.top_k,
                  hidden_act="silu", experts_implementation="eager")
    mixtral = MixtralSparseMoeBlock(MixtralConfig(num_local_experts=args.experts, **common))
    qwen = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(num_experts=args.experts, moe_intermediate_size=args.ffn,
                                                 norm_topk_prob=True, **common))
    with torch.no_grad():
        for hf in (mixtral, qwen):
            hf.gate.weight.copy_(ours.router.weight)
            hf.experts.gate_up_proj.copy_(ours.up)
            hf.experts.down_proj.copy_(ours.down)
    dense = MLP(cfg, args.top_k * args.ffn)
    dense.up.reset_parameters(0.02)
    dense.down.reset_parameters(0.02)
    return {name: m.to(device) for name, m in
            (("ironcore", ours), ("hf_mixtral", mixtral), ("hf_qwen3_moe", qwen), ("dense", dense))}


def timed(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> Callable[[], float]:
    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.grad = None
        block(x).backward(grad)
        block.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024, help="each expert's inner width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (one time per variant each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = blocks(args, device)
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {where}, fp32, eager; hidden {args.hidden}, {args.experts} experts x ffn "
          f"{args.ffn}, top-{args.top_k}; {args.rounds} interleaved rounds per size")
    print(f"{'tokens':>7} {'variant':<14} {'median ms':>10} {'tok/s':>10} {'HF / ours (median, min-max)':>30}")
    for tokens in args.tokens:
        bench(variants, tokens, args, device)


def bench(variants: dict[str, torch.nn.Module], tokens: int, args: argparse.Namespace, device: torch.device) -> None:
    x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device)
    x.requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        want = variants["ironcore"](x)
        errors = {k: (variants[k](x) - want).abs().max().item() for k in ("hf_mixtral", "hf_qwen3_moe")}
    load = variants["ironcore"].stats.counts.tolist()
    runs = {k: timed(m, x, grad, device) for k, m in variants.items()}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            times[key].append(run())
    ours = times["ironcore"]
    for key, samples in times.items():
        median = statistics.median(samples)
        ratio = ""
        if key != "ironcore":
            ratios = [t / o for t, o in zip(samples, ours)]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"{tokens:>7} {key:<14} {median * 1e3:>10.1f} {tokens / median:>10.0f} {ratio:>30}")
    print(f"{'':>7} expert load {load}; max |HF - ours| output: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()

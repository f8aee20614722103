"""Decode throughput of ``ironcore.inference.generate`` vs HF ``generate`` on the same model and device.

Both sides hold the same randomly initialised weights (ours is exported with
``save_hf_model`` and loaded by ``AutoModelForCausalLM.from_pretrained`` with
SDPA attention), decode greedily from the same prompts and run on the same
threads under ``torch.inference_mode``. Decode tokens/s is measured by
difference, ``batch x (N - 1) / (t(N new tokens) - t(1 new token))``, so the
prefill and the set-up cancel out; end-to-end tokens/s (prefill included) is
printed too. Calls alternate between the two in rounds so machine noise hits
both alike; the best round of each is reported (noise only ever adds time). "no cache" recomputes the whole prefix for
every token (our model, logits of the last position only): the KV cache's
speed-up is the ratio of the two decode rates. Prints; asserts nothing.

The physical limit is measured in the same run: a decode step must read every
weight once, so at batch 1 it cannot beat ``weight bytes / bandwidth``, where
the bandwidth is what a matrix-vector product over a weight-sized matrix
streams on this device (``streamed_bandwidth``). The ``limit`` column is that
floor as tokens/s per sequence; ``of limit`` is IronCore's share of it.

    python benchmarks/generate_throughput.py                      # gpt2-small and a LLaMA-style 125M model
    python benchmarks/generate_throughput.py --models llama-tiny --new-tokens 16 --rounds 2
    python benchmarks/generate_throughput.py --device cuda --precision bf16 --batches 1 32   # weights in bf16
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from model_throughput import twin_models

from ironcore.inference import generate
from ironcore.models import TransformerModel

Generate = Callable[[int], list[list[int]]]


@torch.inference_mode()
def recompute(model: TransformerModel, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy decoding without a cache: a full forward pass over the whole sequence per token."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -new_tokens:].tolist()


def decoders(model: TransformerModel, hf_model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Generate]:
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def hf(n: int) -> list[list[int]]:
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    return {"ironcore": lambda n: generate(model, ids, n), "hf": hf, "no cache": lambda n: recompute(model, ids, n)}


@torch.inference_mode()
def streamed_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int = 256 * 2**20, repeats: int = 20) -> float:
    """Bytes/s a matrix-vector product streams from a weight-sized matrix (``nbytes``, far beyond the caches):
    the rate at which a batch-1 decode step can read its weights."""
    columns = 4096
    weight = torch.randn(nbytes // (columns * torch.finfo(dtype).bits // 8), columns, device=device, dtype=dtype)
    x = torch.randn(columns, device=device, dtype=dtype)
    for _ in range(3):
        weight @ x
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        weight @ x
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return weight.numel() * weight.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Generate, n: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn(n)  # token lists on the host: every kernel has finished
    return time.perf_counter() - start, out


def bench(name: str, batch: int, prompt_len: int, new_tokens: int, rounds: int, no_cache_rounds: int,
          device: torch.device, dtype: torch.dtype) -> dict:
    cfg, model, hf_model = twin_models(name)
    model.to(device, dtype).eval()
    hf_model.to(device, dtype).eval()
    hf_model.generation_config.eos_token_id = None
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    runs = decoders(model, hf_model, ids)
    for fn in runs.values():
        fn(2)  # warm-up
    short: dict[str, list[float]] = {k: [] for k in runs}
    full: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for r in range(rounds):
        for key, fn in runs.items():
            if key == "no cache" and r >= no_cache_rounds:
                continue
            short[key].append(timed(fn, 1)[0])
            seconds, outputs[key] = timed(fn, new_tokens)
            full[key].append(seconds)
    row = {"model": name, "batch": batch, "same_tokens": outputs["ironcore"] == outputs["hf"],
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    for key in runs:
        t1, tn = min(short[key]), min(full[key])
        row[f"{key}/decode"] = batch * (new_tokens - 1) / (tn - t1)
        row[f"{key}/e2e"] = batch * new_tokens / tn
    row["vs_hf"] = row["ironcore/decode"] / row["hf/decode"]
    row["vs_hf_e2e"] = row["ironcore/e2e"] / row["hf/e2e"]
    row["cache_speedup"] = row["ironcore/decode"] / row["no cache/decode"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "llama-125m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-cache-rounds", type=int, default=1, help="the slow no-cache runs: fewer rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the weights' dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.precision == "bf16" else torch.float32
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    bandwidth = streamed_bandwidth(device, dtype)
    print(f"torch {torch.__version__}, {where}, {args.precision}, greedy; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens; decode tokens/s (prefill excluded) and end-to-end; "
          f"streamed bandwidth {bandwidth / 1e9:.1f} GB/s (matrix-vector product)")  # fmt: skip
    header = (f"{'model':<11} {'batch':>5} {'IronCore':>9} {'HF':>8} {'ratio':>6} {'limit':>8} {'of limit':>8} "
              f"{'no cache':>9} {'KV speed-up':>11} {'e2e ratio':>9} {'same tokens':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name in args.models:
        for batch in args.batches:
            r = bench(name, batch, args.prompt_len, args.new_tokens, args.rounds, args.no_cache_rounds, device, dtype)
            limit = batch * bandwidth / r["weight_bytes"]  # every sequence's token needs the weights read once
            print(f"{r['model']:<11} {r['batch']:>5} {r['ironcore/decode']:>9.1f} {r['hf/decode']:>8.1f} "
                  f"{r['vs_hf']:>5.2f}x {limit:>8.1f} {r['ironcore/decode'] / limit:>7.0%} "
                  f"{r['no cache/decode']:>9.1f} {r['cache_speedup']:>10.1f}x "
                  f"{r['vs_hf_e2e']:>8.2f}x {'yes' if r['same_tokens'] else 'no':>11}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

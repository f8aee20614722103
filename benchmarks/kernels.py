"""Each fused kernel against its torch version (and Liger-Kernel's, when installed), forward + backward: time and
peak memory over a sweep of shapes; on a CPU the chunked cross-entropy's saving in a GPT-2-small training step.

On CUDA (``--device cuda``) every kernel of ``ironcore/kernels`` runs
compiled, bf16, on LLaMA-sized shapes: RMSNorm, LayerNorm, RoPE on q and k,
SwiGLU/GeGLU, and the linear + cross-entropy (the torch row is the output
projection + our vocab-parallel loss, which holds the logits). Rounds
interleave the implementations; the table gives the median time and the
peak of ``torch.cuda.max_memory_allocated`` above the inputs, and the
ratio torch / ours per round (median, min-max).

On a CPU the Triton kernels only run in Triton's interpreter (tests, not
speed), so ``--device cpu`` measures what matters there: one training step
of gpt2-small at 8 x 1024 tokens with the plain loss and with the chunked
linear + cross-entropy, each in a fresh process (peak resident memory of
the step, its time and loss). Prints; asserts nothing.

    python benchmarks/kernels.py --device cpu                 # the CPU step (~2 minutes on 2 cores)
    python benchmarks/kernels.py --device cuda --rounds 20    # the kernel sweep on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

CPU_STEP = r"""
import json, re, sys, time, torch
from ironcore.config import load_model_config
from ironcore.models import TransformerModel
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
cfg = load_model_config("gpt2-small")
cfg.kernel_options.cross_entropy = sys.argv[1]
batch, seq = [int(v) for v in sys.argv[2].split("x")]
model = TransformerModel(cfg)
ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
model(ids[:1, :33], labels=ids[:1, 1:34]).backward()  # warm-up: autograd's and the allocator's fixed costs
model.zero_grad(set_to_none=False)
def peak_rss():  # the process's high-water mark of resident memory, bytes
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from what is resident now
before = peak_rss()
start = time.perf_counter()
loss = model(ids[:, :-1], labels=ids[:, 1:], loss_weights=torch.full((batch, seq), 1 / (batch * seq)))
loss.backward()
seconds = time.perf_counter() - start
peak = peak_rss()
print(json.dumps({"loss": loss.item(), "seconds": seconds, "step_peak": peak - before, "vocab": cfg.vocab_size}))
"""


def cpu_step(args: argparse.Namespace) -> None:
    batch, seq = (int(v) for v in args.cpu_batch.split("x"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    rows = {}
    for backend in ("torch", "chunked"):
        done = subprocess.run([sys.executable, "-c", CPU_STEP, backend, args.cpu_batch, str(args.threads)], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows[backend] = json.loads(done.stdout.splitlines()[-1])
    logits = batch * seq * rows["torch"]["vocab"] * 4
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, fp32: one gpt2-small training step at {batch} x "
          f"{seq} tokens; fp32 logits {logits / 2**30:.2f} GiB")
    print(f"{'loss':<10} {'step peak GiB':>14} {'step s':>8} {'loss value':>12}")
    for backend, r in rows.items():
        print(f"{backend:<10} {r['step_peak'] / 2**30:>14.2f} {r['seconds']:>8.1f} {r['loss']:>12.6f}")
    saved = rows["torch"]["step_peak"] - rows["chunked"]["step_peak"]
    print(f"chunked saves {saved / 2**30:.2f} GiB = {saved / logits:.2f} x the logits; "
          f"|loss difference| {abs(rows['torch']['loss'] - rows['chunked']['loss']):.1e}")


def cases(dtype: torch.dtype) -> list[tuple[str, str, Callable[[], tuple[Callable, ...]]]]:
    """(kernel, shape, make) where make() gives the inputs and one function per implementation."""
    from ironcore import kernels
    from ironcore.layers.norm import LayerNorm, RMSNorm
    from ironcore.layers.rope import apply_rotary
    from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy
    from ironcore.parallel.layers import vocab_logits

    dev = "cuda"
    out: list = []
    for tokens, hidden in ((8192, 2048), (8192, 4096), (4096, 8192)):
        def norm(tokens=tokens, hidden=hidden):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
            w = torch.ones(hidden, device=dev, dtype=dtype, requires_grad=True)
            ref = RMSNorm(hidden, 1e-6).to(dev, dtype)  # our torch path (fp32 inside, as the reference models)
            return {"torch": lambda: ref(x),
                    "ironcore": lambda: kernels.module("norm").rms_norm(x, w, 1e-6),
                    "liger": _liger("rms_norm", x, w)}
        out.append(("rms_norm", f"{tokens}x{hidden}", norm))

        def layer(tokens=tokens, hidden=hidden):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
            w = torch.ones(hidden, device=dev, dtype=dtype, requires_grad=True)
            b = torch.zeros(hidden, device=dev, dtype=dtype, requires_grad=True)
            ref = LayerNorm(hidden, 1e-5).to(dev, dtype)
            return {"torch": lambda: ref(x),
                    "ironcore": lambda: kernels.module("norm").layer_norm(x, w, b, 1e-5),
                    "liger": _liger("layer_norm", x, w, b)}
        out.append(("layer_norm", f"{tokens}x{hidden}", layer))
    for tokens, ffn in ((8192, 8192), (8192, 14336)):
        for act in ("silu", "gelu_tanh"):
            def glu(tokens=tokens, ffn=ffn, act=act):
                h = torch.randn(tokens, 2 * ffn, device=dev, dtype=dtype, requires_grad=True)
                f = F.silu if act == "silu" else (lambda g: F.gelu(g, approximate="tanh"))
                return {"torch": lambda: f(h[:, :ffn]) * h[:, ffn:],
                        "ironcore": lambda: kernels.module("glu").gated_activation(h, act),
                        "liger": _liger("swiglu" if act == "silu" else "geglu", h, ffn)}
            out.append(("swiglu" if act == "silu" else "geglu", f"{tokens}x{ffn}", glu))
    for batch, seq, heads, kv in ((8, 2048, 32, 8), (4, 4096, 32, 32)):
        def rope(batch=batch, seq=seq, heads=heads, kv=kv):
            qkv = torch.randn(batch, seq, (heads + 2 * kv) * 128, device=dev, dtype=dtype, requires_grad=True)
            angles = torch.rand(1, 1, seq, 64, device=dev) * seq
            cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

            def ours():
                x = qkv * 1  # a fresh non-leaf, rotated in place
                return kernels.module("rope").rotate_(x.view(batch, seq, heads + 2 * kv, 128)[:, :, : heads + kv],
                                                      cos, sin)

            def reference():
                q = qkv.view(batch, seq, heads + 2 * kv, 128)[:, :, : heads + kv].transpose(1, 2)
                return apply_rotary(q, cos.to(dtype), sin.to(dtype))
            return {"torch": reference, "ironcore": ours}
        out.append(("rope", f"{batch}x{seq}x{heads}/{kv}", rope))
    for tokens, hidden, vocab in ((8192, 2048, 32000), (8192, 4096, 128256), (16384, 2048, 151936)):
        def ce(tokens=tokens, hidden=hidden, vocab=vocab):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, hidden, device=dev, dtype=dtype) * 0.02).requires_grad_(True)
            t = torch.randint(0, vocab, (tokens,), device=dev)
            tw = torch.full((tokens,), 1 / tokens, device=dev)
            lce = kernels.module("cross_entropy").linear_cross_entropy
            return {"torch": lambda: (vocab_parallel_cross_entropy(vocab_logits(x, w, None, vocab), t) * tw).sum(),
                    "ironcore": lambda: lce(x, w, None, t, tw, vocab, "triton"),
                    "chunked": lambda: lce(x, w, None, t, tw, vocab, "chunked"),
                    "liger": _liger("flce", x, w, t)}
        out.append(("linear_cross_entropy", f"{tokens}x{hidden}x{vocab}", ce))
    return out


def _liger(kind: str, *tensors) -> Callable | None:
    """Liger-Kernel's implementation of the same computation, when it is installed."""
    try:
        if kind == "rms_norm":
            from liger_kernel.transformers.functional import liger_rms_norm
            return lambda: liger_rms_norm(tensors[0], tensors[1], 1e-6)
        if kind == "layer_norm":
            from liger_kernel.transformers.functional import liger_layer_norm
            return lambda: liger_layer_norm(*tensors, 1e-5)
        if kind in ("swiglu", "geglu"):
            from liger_kernel.ops.geglu import LigerGELUMulFunction
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            fn = LigerSiLUMulFunction if kind == "swiglu" else LigerGELUMulFunction
            h, ffn = tensors
            return lambda: fn.apply(h[:, :ffn], h[:, ffn:])
        if kind == "flce":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            x, w, t = tensors
            return lambda: liger_fused_linear_cross_entropy(x, w, t)
    except ImportError:
        return None
    return None


def sweep(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, forward + backward; "
          f"{args.rounds} interleaved rounds, median ms (peak MiB above the inputs)")
    print(f"{'kernel':<22} {'shape':<20} {'torch':>16} {'ironcore':>16} {'chunked':>16} {'liger':>16} "
          f"{'torch / ours (min-max)':>24}")
    for kernel, shape, make in cases(dtype):
        impls = {k: v for k, v in make().items() if v is not None}
        times: dict[str, list[float]] = {k: [] for k in impls}
        peaks: dict[str, int] = {}
        for name, fn in impls.items():  # warm-up (compiles the kernels) and the peak memory
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn().float().sum().backward()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
        for _ in range(args.rounds):
            for name, fn in impls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn().float().sum().backward()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
        cells = {n: f"{statistics.median(t):.3f} ({peaks[n] / 2**20:.0f})" for n, t in times.items()}
        ratios = [t / o for t, o in zip(times["torch"], times["ironcore"])]
        print(f"{kernel:<22} {shape:<20} " + " ".join(f"{cells.get(n, '-'):>16}" for n in
              ("torch", "ironcore", "chunked", "liger"))
              + f" {statistics.median(ratios):>8.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU: threads of the training step")
    parser.add_argument("--cpu-batch", default="8x1024", help="CPU: batch x sequence length of the step")
    args = parser.parse_args()
    if args.device == "cpu":
        cpu_step(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()

"""Generation speed of ``ironcore.inference.generate`` vs HF ``generate``, against the device's physical limits.

Both sides hold the same randomly initialised weights (ours is exported with
``save_hf_model`` and loaded by ``AutoModelForCausalLM.from_pretrained`` with
SDPA attention) and run on the same threads under ``torch.inference_mode``.
Every workload is timed in interleaved pairs (ours, then HF, on the same
inputs) so machine noise hits both alike; ratios are per pair, and the median
and the spread (min-max) over the pairs are printed. Ours runs the **default
path** (``decode="auto"``, what ``ironcore generate``, evaluation and GRPO
run; its choice is printed) and, where it differs, the **best path**
(``--decode``: inductor-compiled on a CPU, CUDA graphs on a GPU), whose
compilation is a row of its own and is counted in an end-to-end figure (the
first call, compilation included, and the new tokens after which compiling
pays against the default path).

- **latency**: batch 1, a 64-token prompt, 128 new tokens, greedy. Decode
  tokens/s is measured by difference, ``(N - 1) / (t(N new) - t(1 new))``, so
  the prefill cancels out. The limit is physical: a decode step reads every
  weight once, so batch 1 cannot beat ``weight bytes / bandwidth`` tokens/s,
  with the bandwidth measured here over a 256 MB matrix (far beyond the
  caches) two ways: as a matrix-vector product streams it (the issue's
  floor, ``gemv``) and as a plain sum reads it (the stricter floor, ``sum``);
  IronCore's share of each is printed.
- **rl**: an RL rollout as GRPO samples it: ``--rl-prompts`` chat-like prompts
  (a shared system prefix, a user turn of 12-40 tokens, a shared assistant
  header) x ``--rl-copies`` completions, temperature ``--temperature``, top-p
  ``--top-p``, each completion with its own length drawn from 8 to
  ``--rl-new`` tokens (ours: one budget per row; HF: a stopping criterion per
  row, so both sides produce the same number of tokens; the tokens differ,
  each side drawing from its own generator). Tokens/s = generated tokens /
  wall time, prefill included.
- **sampling**: at the rl workload's shape, the time ``sample_next`` takes
  (temperature, top-p, the draw) on the model's own logits of the rl prompts
  beside a decode step of those rows (by difference, ``generate`` of 9 vs 1
  greedy tokens: the greedy pick is an argmax), and HF's sampling (its
  temperature and top-p warpers, softmax, ``torch.multinomial``).
- **rollout**: ``--prompts`` prompts x ``--copies`` completions (RL's
  groups), greedy, each completion with its own length drawn from 8..256
  tokens; both sides produce the same tokens (checked: in fp32 every token;
  in bf16 a near-tie may round the other way in kernels of other shapes, so
  the share of rows and tokens that agree is printed).
- **prefill**: one ``--prefill-len`` prompt through the model; tokens/s and
  the FLOP/s it reaches against the matmul peak measured here (the best of
  square matmuls of 1024, 2048 and 4096).

Also printed: the KV cache of the rollout as computed (layers x 2 x batch x
kv heads x head dim x length x bytes) and as measured (the bytes its buffers
hold). Prints; asserts nothing.

    python benchmarks/generate_throughput.py                          # smollm-135m and gpt2-small, CPU
    python benchmarks/generate_throughput.py --models smollm-135m --workloads latency rl sampling --pairs 10
    python benchmarks/generate_throughput.py --models llama-tiny --pairs 2 --prompts 2 --copies 2
    python benchmarks/generate_throughput.py --device cuda --precision bf16 --prompts 64   # weights in bf16
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from model_throughput import twin_models

from ironcore.inference import DecodeReport, generate, sample_next
from ironcore.layers.attention import kv_cache_bytes
from ironcore.models.stats import model_stats

# benchmarks/kernels.py would shadow the ``kernels`` package transformers looks for: out of the path once loaded.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PROMPT_LEN, NEW_TOKENS = 64, 128
LENGTHS = (8, 256)  # rollout completion lengths
RL_MIN_NEW = 8  # rl: the shortest completion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _best(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Shortest of ``repeats`` timed calls, after a warm-up (noise only ever adds time)."""
    fn()
    return min(timed(fn, device) for _ in range(repeats))


@torch.inference_mode()
def streamed_bandwidth(device: torch.device, dtype: torch.dtype, nbytes: int = 256 * 2**20, repeats: int = 20
                       ) -> dict[str, float]:  # fmt: skip
    """Bytes/s at which this device reads a weight-sized matrix (far beyond the caches), two ways: a
    matrix-vector product (what a batch-1 decode step does) and a plain sum (the best streaming read)."""
    columns = 4096
    weight = torch.randn(nbytes // (columns * torch.finfo(dtype).bits // 8), columns, device=device, dtype=dtype)
    x = torch.randn(columns, device=device, dtype=dtype)
    size = weight.numel() * weight.element_size()
    return {"gemv": size / _best(lambda: weight @ x, device, repeats),
            "sum": size / _best(lambda: weight.sum(), device, repeats)}  # fmt: skip


@torch.inference_mode()
def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of square matmuls of a few sizes."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n**3 / _best(lambda a=a, b=b: a @ b, device, 5))
    return best


def agreement(theirs: list[list[int]], ours: list[list[int]]) -> str:
    """"yes" when every row has the same tokens, else the share of rows and of tokens before a row's first
    difference (in bf16 a near-tie can round either way in kernels of different shapes; a row differs from there)."""
    if theirs == ours:
        return "yes"
    rows = sum(a == b for a, b in zip(theirs, ours, strict=True))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(theirs, ours, strict=True))  # fmt: skip
    return (f"NO: {rows} of {len(ours)} rows, {prefix / sum(map(len, theirs)):.0%} of the tokens up to a row's "
            f"first difference")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def latency(model, hf_model, cfg, device, best: str, pairs: int, limits: dict[str, float]) -> None:
    ids = torch.randint(1, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    # The default path first, as a fresh process meets it (auto would reuse a compiled step made before it).
    first: dict[str, tuple[float, DecodeReport]] = {}
    for decode in ("auto", best):
        report = DecodeReport()
        started = time.perf_counter()
        ours = generate(model, ids, NEW_TOKENS, decode=decode, report=report)
        first[decode] = time.perf_counter() - started, report
    default = first["auto"][1].path
    paths = {"default": default, "best": best} if default != best else {"default": default}
    setup = first[best][1].compile_seconds
    print(f"  latency: default path (auto) -> {default}; best path {best}: compiled/captured in {setup:.1f} s "
          f"by its first call (a row of its own below; the timed calls reuse it)", flush=True)  # fmt: skip

    def hf(n: int) -> list[list[int]]:
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)  # fmt: skip
        return out[:, PROMPT_LEN:].tolist()

    same = agreement([hf(NEW_TOKENS)[0]], ours)
    sides = {name: (lambda n, d=decode: generate(model, ids, n, decode=d)) for name, decode in paths.items()}
    sides["hf"] = hf
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(pairs):
        for key, fn in sides.items():
            t1 = timed(lambda fn=fn: fn(1), device)
            tn = timed(lambda fn=fn: fn(NEW_TOKENS), device)
            rates[key].append((NEW_TOKENS - 1) / (tn - t1))
    hf_rate = statistics.median(rates["hf"])
    for name, decode in paths.items():
        ratios = [a / b for a, b in zip(rates[name], rates["hf"], strict=True)]
        print(f"  latency: batch 1, prompt {PROMPT_LEN}, {NEW_TOKENS} new, {name} path ({decode}): IronCore "
              f"{statistics.median(rates[name]):.1f} tok/s, HF {hf_rate:.1f}; vs HF {spread(ratios)}; same tokens: "
              f"{same}", flush=True)  # fmt: skip
        for probe, rate in limits.items():
            print(f"  latency: {name} path, of the {probe} floor ({rate:.1f} tok/s): "
                  f"{spread([a / rate for a in rates[name]])}")  # fmt: skip
    if "best" in paths and setup > 0:
        fast, slow = statistics.median(rates["best"]), statistics.median(rates["default"])
        pays = setup / (1 / slow - 1 / fast) if fast > slow else math.inf
        print(f"  latency: compilation of the best path: {setup:.1f} s once per (model, batch, cache bucket); "
              f"end to end, its first call (compilation + {NEW_TOKENS} tokens) took {first[best][0]:.1f} s = "
              f"{NEW_TOKENS / first[best][0]:.2f} tok/s (the default path's first call: {first['auto'][0]:.1f} s); "
              f"compiling pays after {pays:,.0f} new tokens at batch 1", flush=True)  # fmt: skip


def chat_prompts(cfg, prompts: int, seed: int = 5) -> list[list[int]]:
    """Chat-like prompts of random tokens: a shared system prefix, a user turn of 12-40 tokens, a shared
    assistant header (the shape of a chat template's output; ragged lengths, a common prefix)."""
    gen = torch.Generator().manual_seed(seed)
    system, header = torch.randint(1, cfg.vocab_size, (20,), generator=gen), torch.randint(1, cfg.vocab_size, (3,),
                                                                                              generator=gen)  # fmt: skip
    rng = random.Random(seed)
    return [[*system.tolist(), *torch.randint(1, cfg.vocab_size, (rng.randint(12, 40),), generator=gen).tolist(),
             *header.tolist()] for _ in range(prompts)]  # fmt: skip


def _hf_padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's inputs for ragged prompts: left-padded ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class RowBudgets:
    """HF stopping criterion: each row stops after its own number of new tokens."""

    def __init__(self, start: int, budgets: list[int]) -> None:
        self.start, self.budgets = start, budgets

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids.shape[1] - self.start >= torch.tensor(self.budgets, device=input_ids.device)


def rl(model, hf_model, cfg, device, args) -> None:
    """The RL rollout: chat-like prompts x copies, sampled (temperature, top-p), ragged budgets up to --rl-new."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompts = [p for p in chat_prompts(cfg, args.rl_prompts) for _ in range(args.rl_copies)]
    budgets = [random.Random(7 + i).randint(RL_MIN_NEW, args.rl_new) for i in range(len(prompts))]
    total = sum(budgets)
    ids, mask = _hf_padded(prompts, device)
    stop = type("Budgets", (RowBudgets, StoppingCriteria), {})(ids.shape[1], budgets)
    sampling = dict(temperature=args.temperature, top_p=args.top_p)

    def hf() -> None:
        hf_model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=True, top_k=0,
                          pad_token_id=0, stopping_criteria=StoppingCriteriaList([stop]), **sampling)  # fmt: skip

    reports: dict[str, DecodeReport] = {}

    def ours(decode: str, seed: int) -> None:
        reports[decode] = DecodeReport()
        generate(model, prompts, budgets, seed=seed, decode=decode, report=reports[decode], **sampling)

    started = time.perf_counter()
    ours("auto", 0)
    first = time.perf_counter() - started
    sides = {"default": reports["auto"].path}
    if args.rl_best and args.rl_best != sides["default"]:
        started = time.perf_counter()
        ours(args.rl_best, 0)
        sides["best"] = args.rl_best
        print(f"  rl: best path {args.rl_best} compiled/captured in {reports[args.rl_best].compile_seconds:.1f} s; "
              f"its first call took {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in (*sides, "hf")}
    for pair in range(args.rl_pairs):
        for name, decode in sides.items():
            rates[name].append(total / timed(lambda decode=decode, pair=pair: ours(decode, 1 + pair), device))
        torch.manual_seed(1 + pair)
        rates["hf"].append(total / timed(hf, device))
    for name, decode in sides.items():
        ratios = [a / b for a, b in zip(rates[name], rates["hf"], strict=True)]
        report = reports[decode]
        print(f"  rl: {args.rl_prompts} chat prompts x {args.rl_copies} sampled completions (temperature "
              f"{args.temperature}, top_p {args.top_p}) of {RL_MIN_NEW}-{args.rl_new} tokens ({total} tokens), "
              f"{name} path ({report.path}): IronCore {statistics.median(rates[name]):.1f} tok/s, HF "
              f"{statistics.median(rates['hf']):.1f}; vs HF {spread(ratios)} over {args.rl_pairs} pairs; rows "
              f"computed {report.row_steps} of {len(prompts) * (max(budgets) - 1)} without dropping "
              f"({report.compactions} compactions); prefill {report.prefill_tokens} tokens (HF "
              f"{ids.numel()})", flush=True)  # fmt: skip
    print(f"  rl: end to end, the default path's first call took {first:.1f} s "
          f"({reports['auto'].compile_seconds:.1f} s compiling)", flush=True)


@torch.inference_mode()
def sampling(model, hf_model, cfg, device, args) -> None:
    """``sample_next`` (and HF's sampling) on the rl rows' logits beside a decode step of those rows."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    prompts = [p for p in chat_prompts(cfg, args.rl_prompts) for _ in range(args.rl_copies)]
    ids, mask = _hf_padded(prompts, device)
    logits = hf_model(ids, attention_mask=mask).logits[:, -1].float()
    warpers = [TemperatureLogitsWarper(args.temperature), TopPLogitsWarper(args.top_p)]
    generator = torch.Generator(device=device).manual_seed(0)

    def hf_sample() -> torch.Tensor:
        scores = logits
        for warper in warpers:
            scores = warper(ids, scores)
        return torch.multinomial(scores.softmax(-1), 1)

    def ours() -> torch.Tensor:
        return sample_next(logits, args.temperature, None, args.top_p, generator)

    times: dict[str, list[float]] = {"step": [], "ours": [], "hf": []}
    for _ in range(args.pairs):
        t9 = timed(lambda: generate(model, prompts, 9), device)
        t1 = timed(lambda: generate(model, prompts, 1), device)
        times["step"].append((t9 - t1) / 8)
        times["ours"].append(statistics.median(timed(ours, device) for _ in range(3)))
        times["hf"].append(statistics.median(timed(hf_sample, device) for _ in range(3)))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"  sampling: {len(prompts)} rows x {logits.shape[1]} logits (temperature {args.temperature}, top_p "
          f"{args.top_p}): sample_next {ms['ours']:.1f} ms, HF's warpers + multinomial {ms['hf']:.1f} ms, a decode "
          f"step of these rows {ms['step']:.1f} ms; sample_next / step {spread([a / b for a, b in zip(times['ours'], times['step'], strict=True)])}"
          f", HF's sampling / step {spread([a / b for a, b in zip(times['hf'], times['step'], strict=True)])}"
          f" over {args.pairs} rounds", flush=True)  # fmt: skip


def rollout(model, hf_model, cfg, device, dtype, prompts: int, copies: int, pairs: int) -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    gen = torch.Generator().manual_seed(2)
    unique = torch.randint(1, cfg.vocab_size, (prompts, PROMPT_LEN), generator=gen)
    ids = unique.repeat_interleave(copies, dim=0).to(device)
    longest = min(LENGTHS[1], cfg.max_position_embeddings - PROMPT_LEN)  # tiny test models have few positions
    budgets = [random.Random(3 + i).randint(LENGTHS[0], longest) for i in range(len(ids))]
    total = sum(budgets)

    stop = type("Budgets", (RowBudgets, StoppingCriteria), {})(PROMPT_LEN, budgets)

    def hf() -> list[list[int]]:
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(budgets),
                                do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([stop]))
        return [row[:n] for row, n in zip(out[:, PROMPT_LEN:].tolist(), budgets, strict=True)]

    results: dict[str, list] = {}
    report = DecodeReport()

    def ours() -> None:
        nonlocal report
        report = DecodeReport()  # the last call's
        results["ours"] = generate(model, ids, budgets, report=report)

    def theirs() -> None:
        results["hf"] = hf()

    ours()  # the first call compiles or captures its steps (a graph per batch bucket); the timed calls reuse them
    setup = report.compile_seconds
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(pairs):
        rates["ours"].append(total / timed(ours, device))
        rates["hf"].append(total / timed(theirs, device))
    ratios = [a / b for a, b in zip(rates["ours"], rates["hf"], strict=True)]
    computed = kv_cache_bytes(cfg, *report.kv_cache_shape, dtype)
    print(f"  rollout: {prompts} prompts x {copies} completions of {LENGTHS[0]}-{longest} tokens ({total} tokens): "
          f"IronCore {statistics.median(rates['ours']):.1f} tok/s ({report.path}), HF "
          f"{statistics.median(rates['hf']):.1f}; vs HF {spread(ratios)}; rows computed {report.row_steps} of "
          f"{len(ids) * (max(budgets) - 1)} without dropping ({report.compactions} compactions), prefill "
          f"{report.prefill_tokens} tokens (HF {len(ids) * PROMPT_LEN}); compiled/captured in {setup:.1f} s by a "
          f"first call (excluded); same tokens: {agreement(results['hf'], results['ours'])}", flush=True)  # fmt: skip
    rows, positions = report.kv_cache_shape
    print(f"  KV cache ({rows} rows x {positions} positions): computed {computed / 2**20:.1f} MiB, measured "
          f"{report.kv_cache_bytes / 2**20:.1f} MiB (its buffers)", flush=True)  # fmt: skip


@torch.inference_mode()
def prefill(model, hf_model, cfg, device, length: int, peak: float) -> None:
    ids = torch.randint(1, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(4)).to(device)
    head = 2 * cfg.vocab_size * cfg.hidden_size  # the output projection runs for the last position only
    flops = (model_stats(cfg, length).forward_flops_per_token - head) * length + head
    ours = _best(lambda: generate(model, ids, 1, decode="eager"), device, 3)
    theirs = _best(lambda: hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                             do_sample=False, pad_token_id=0), device, 3)  # fmt: skip
    print(f"  prefill: {length} tokens: IronCore {length / ours:.0f} tok/s = {flops / ours / 1e9:.1f} GFLOP/s "
          f"({flops / ours / peak:.0%} of the matmul peak), HF {length / theirs:.0f} tok/s "
          f"({theirs / ours:.2f}x)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm-135m", "gpt2-small"])
    parser.add_argument("--pairs", type=int, default=10, help="interleaved pairs of the latency workload")
    parser.add_argument("--prompts", type=int, default=64, help="rollout: distinct prompts")
    parser.add_argument("--copies", type=int, default=8, help="rollout: completions of each prompt")
    parser.add_argument("--rollout-pairs", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--rl-prompts", type=int, default=8, help="rl: distinct chat-like prompts")
    parser.add_argument("--rl-copies", type=int, default=8, help="rl: sampled completions of each prompt")
    parser.add_argument("--rl-new", type=int, default=64, help="rl: the longest completion")
    parser.add_argument("--rl-pairs", type=int, default=10)
    parser.add_argument("--rl-best", default=None, help="rl: also time this decode path beside the default (auto)")
    parser.add_argument("--temperature", type=float, default=1.0, help="rl and sampling")
    parser.add_argument("--top-p", type=float, default=0.95, help="rl and sampling")
    parser.add_argument("--workloads", nargs="+", default=["latency", "rl", "sampling", "rollout", "prefill"],
                        choices=["latency", "rl", "sampling", "rollout", "prefill"])
    parser.add_argument("--decode", default=None, help="our best latency path (default: compile on CPU, graph on "
                        "CUDA), timed beside the default path (auto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the weights' dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.precision == "bf16" else torch.float32
    decode = args.decode or ("graph" if device.type == "cuda" else "compile")
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    bandwidth, peak = streamed_bandwidth(device, dtype), matmul_peak(device, dtype)
    print(f"torch {torch.__version__}, {where}, {args.precision}; streamed bandwidth: matrix-vector "
          f"{bandwidth['gemv'] / 1e9:.1f} GB/s, sum {bandwidth['sum'] / 1e9:.1f} GB/s; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)  # fmt: skip
    for name in args.models:
        cfg, model, hf_model = twin_models(name)
        model.to(device, dtype).eval()
        hf_model.to(device, dtype).eval()
        hf_model.generation_config.eos_token_id = None
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        limits = {probe: rate / weight_bytes for probe, rate in bandwidth.items()}
        print(f"{name}: {weight_bytes / 1e6:.0f} MB of weights -> batch-1 floor "
              + ", ".join(f"{1e3 / rate:.1f} ms a token = {rate:.1f} tok/s ({probe})" for probe, rate in limits.items()),
              flush=True)  # fmt: skip
        if "latency" in args.workloads:
            latency(model, hf_model, cfg, device, decode, args.pairs, limits)
        if "rl" in args.workloads:
            rl(model, hf_model, cfg, device, args)
        if "sampling" in args.workloads:
            sampling(model, hf_model, cfg, device, args)
        if "rollout" in args.workloads:
            rollout(model, hf_model, cfg, device, dtype, args.prompts, args.copies, args.rollout_pairs)
        if "prefill" in args.workloads:
            prefill(model, hf_model, cfg, device, args.prefill_len, peak)


if __name__ == "__main__":
    main()

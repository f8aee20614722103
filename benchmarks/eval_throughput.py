"""Evaluation speed of IronCore's lm-eval model vs lm-evaluation-harness's own ``hf`` model, on the same work.

One randomly initialised model (``--model``, the vocabulary of a BPE trained
here) is saved twice: as an IronCore checkpoint, read by
``ironcore.evaluation.harness.IronCoreLM``, and as an HF folder
(``save_hf_model``), read by lm-eval's ``HFLM`` in fp32. Both get the same lm-eval
requests through lm-eval's model API (so the timing is the model's work, not
lm-eval's task machinery), with the same batch size and threads:

- **multiple choice**: ``--mc-items`` items, each a context of about
  ``--context-words`` words and 4 short choices (HellaSwag's shape: a long
  context, short endings), as ``loglikelihood`` requests. IronCore encodes
  each context once for its 4 choices; the ``hf`` model runs every
  (context, choice) sequence whole.
- **generation**: ``--gen-items`` prompts, ``generate_until`` greedy up to
  ``--max-gen-toks`` tokens, ending at a stop string. A task's answers end at
  different lengths, but a random model never writes a task's stop string
  ("." or a blank line: every row would run the whole budget), so by default
  the stop strings are the texts of ``--stop-tokens`` vocabulary tokens drawn
  at random (printed): each step ends a row with a small probability, and the
  answers end at different points. ``--until`` gives stop strings instead.
  A task has more prompts than a batch (the default: 4 batches' worth).
  lm-eval's ``hf`` model runs batch after batch, each row until the whole
  batch has met a stop string; IronCore ends a row once its text holds one
  and the next waiting prompt takes its place (continuous batching).

Items/s = items / seconds of the call. Each workload runs ``--pairs`` times
as interleaved pairs (ours, then lm-eval's), so machine noise hits both
alike; the ratio is per pair, and the median and the spread (min-max) are
printed. Both sides' answers are compared (the chosen choice per item, the
generated strings) and the largest log-likelihood difference is printed.
Prints; asserts nothing.

    python benchmarks/eval_throughput.py                                    # gpt2-small shape, 2 threads
    python benchmarks/eval_throughput.py --model gpt2-tiny --pairs 2 --mc-items 8 --gen-items 4   # a smoke run
    python benchmarks/eval_throughput.py --device cuda                      # on a GPU (CUDA graphs)
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from ironcore.checkpoints import native
from ironcore.checkpoints.hf import save_hf_model
from ironcore.config import load_model_config
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.evaluation.harness import IronCoreLM
from ironcore.inference import generate
from ironcore.models import TransformerModel

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a of and to in is was he she it they we you that with for on as at by this from his her their "
         "river city market winter horse garden letter window evening doctor kitchen village morning story "
         "walked opened carried found watched wrote painted closed followed remembered quickly slowly").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words)).capitalize() + "."


def build(model_name: str, root: Path) -> tuple[Path, Path, int]:
    """The same random model as an IronCore checkpoint and an HF folder, each with the BPE tokenizer."""
    rng = random.Random(0)
    tokenizer = Tokenizer.train_bpe([sentence(rng, 12) for _ in range(2000)], vocab_size=1024)
    cfg = dataclasses.replace(load_model_config(REPO / "configs" / "model" / f"{model_name}.yaml"),
                              vocab_size=tokenizer.vocab_size)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerModel(cfg)
    ours, hf = native.save_model(model, root / "ironcore"), save_hf_model(model, root / "hf")
    for folder in (ours, hf):
        tokenizer.save(folder)
    return ours, hf, sum(p.numel() for p in model.parameters())


def mc_requests(items: int, context_words: int) -> list[Instance]:
    rng = random.Random(1)
    requests = []
    for i in range(items):
        context = " ".join(sentence(rng, context_words // 4) for _ in range(4))
        requests += [Instance("loglikelihood", {}, (context, " " + sentence(rng, rng.randint(2, 5))), 4 * i + j)
                     for j in range(4)]  # fmt: skip
    return requests


def gen_requests(items: int, max_gen_toks: int, until: list[str]) -> list[Instance]:
    rng = random.Random(2)
    settings = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (sentence(rng, 20), dict(settings)), i) for i in range(items)]


def stop_texts(lm: IronCoreLM, n: int) -> list[str]:
    """The texts of ``n`` random vocabulary tokens of 3 or more characters (seeded): stop strings that a random
    model meets after a number of steps that varies from row to row."""
    texts = sorted({lm.tok_decode([i]) for i in range(lm.model.config.vocab_size)} - {""})
    return random.Random(3).sample([t for t in texts if len(t.strip()) >= 3], n)


def answer_lengths(lm: IronCoreLM, requests: list[Instance], budget: int, until: list[str]) -> list[int]:
    """Tokens each greedy answer runs before its text holds a stop string (``budget`` when it never does)."""
    prompts = [lm.tok_encode(r.args[0]) for r in requests]
    lengths = []
    for tokens in generate(lm.model, prompts, budget, max_batch=len(prompts)):
        ends = (k for k in range(1, len(tokens) + 1) if any(s in lm.tok_decode(tokens[:k]) for s in until))
        lengths.append(next(ends, budget))
    return lengths


def pairs(ours: Callable[[], list], theirs: Callable[[], list], n: int
          ) -> tuple[list[float], list, list, list[list[float]]]:  # fmt: skip
    """Per-pair time ratios (theirs / ours: > 1 means ours is faster), the last outputs of both, the times."""
    ratios, out = [], {}
    for _ in range(n):
        times = []
        for key, fn in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            out[key] = fn()
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
        out.setdefault("times", []).append(times)
    return ratios, out["ours"], out["theirs"], out["times"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", help="a configs/model/ name")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--mc-items", type=int, default=40)
    parser.add_argument("--context-words", type=int, default=80)
    parser.add_argument("--gen-items", type=int, default=64)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--until", nargs="+", default=None, help="generation: the stop strings (default: random "
                                                                 "tokens' texts, see --stop-tokens)")
    parser.add_argument("--stop-tokens", type=int, default=16, help="generation: tokens whose texts stop a row")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument("--workloads", nargs="+", default=["mc", "gen"], choices=["mc", "gen"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, hf_dir, params = build(args.model, Path(tmp))
        ours = IronCoreLM(checkpoint=str(ours_dir), device=args.device, batch_size=args.batch_size,
                          max_gen_toks=args.max_gen_toks)  # fmt: skip
        theirs = HFLM(pretrained=str(hf_dir), device=args.device, batch_size=args.batch_size, dtype="float32")
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} threads"
        print(f"torch {torch.__version__}, {where}, fp32; {args.model} shape, {params / 1e6:.1f}M "
              f"parameters, vocabulary {ours.model.config.vocab_size}; batch size {args.batch_size}, "
              f"{args.pairs} interleaved pairs", flush=True)  # fmt: skip
        if "mc" in args.workloads:
            requests = mc_requests(args.mc_items, args.context_words)
            ratios, a, b, times = pairs(lambda: ours.loglikelihood(requests, disable_tqdm=True),
                                        lambda: theirs.loglikelihood(requests, disable_tqdm=True), args.pairs)
            chosen = [[max(range(4), key=lambda j, r=r, i=i: r[4 * i + j][0]) for i in range(args.mc_items)]
                      for r in (a, b)]  # fmt: skip
            worst = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
            tokens = len(ours.tok_encode(requests[0].args[0]))
            print(f"multiple choice: {args.mc_items} items x 4 choices, contexts of ~{tokens} tokens: IronCore "
                  f"{args.mc_items / statistics.median(t[0] for t in times):.2f} items/s, lm-eval hf "
                  f"{args.mc_items / statistics.median(t[1] for t in times):.2f} items/s; vs lm-eval "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); same answers: "
                  f"{'yes' if chosen[0] == chosen[1] else 'NO'}, largest log-likelihood difference {worst:.1e}",
                  flush=True)  # fmt: skip
        if "gen" in args.workloads:
            until = args.until or stop_texts(ours, args.stop_tokens)
            requests = gen_requests(args.gen_items, args.max_gen_toks, until)
            ratios, a, b, times = pairs(lambda: ours.generate_until(requests, disable_tqdm=True),
                                        lambda: theirs.generate_until(requests, disable_tqdm=True), args.pairs)
            same = sum(x == y for x, y in zip(a, b, strict=True))
            lengths = answer_lengths(ours, requests, args.max_gen_toks, until)
            print(f"generation: {args.gen_items} prompts, greedy up to {args.max_gen_toks} tokens until one of "
                  f"{until} ({sum(n < args.max_gen_toks for n in lengths)} answers end early; mean length "
                  f"{statistics.mean(lengths):.1f} tokens): IronCore {args.gen_items / statistics.median(t[0] for t in times):.2f} "
                  f"items/s, lm-eval hf {args.gen_items / statistics.median(t[1] for t in times):.2f} items/s; vs "
                  f"lm-eval {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); same "
                  f"generations: {same} of {args.gen_items}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

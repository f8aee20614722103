"""Peak memory of one GRPO and one DPO step on a SmolLM2-135M-shaped model, beside the memory planner's figure.

Issue 36's settings: GRPO with 16 rows (2 prompts x 8 generations) of a 24-token prompt and 64 new tokens,
one micro-batch; DPO with a micro-batch of one pair of 384 tokens and the live reference. Random weights
(seed 0), AdamW, fp32 (the trainer's default precision), two optimizer steps (rollout, rewards, update,
``optimizer.step``), so that the peak covers a step run with the optimizer states allocated, as every step
after the first is. Each case runs in a fresh process:

- on a CPU the figure is the process's peak resident memory (``ru_maxrss``) minus its resident memory after
  importing torch and ironcore, before anything is built: the weights (the reference's too), gradients,
  optimizer states and every temporary of the step, plus whatever the allocator keeps. ``MALLOC_MMAP_THRESHOLD_``
  is set to 64 KiB in the child so that glibc maps every tensor of 64 KiB or more on its own and unmaps it when
  it is freed: freed tensors then leave the resident set instead of lingering in malloc's heap;
- on CUDA it is ``torch.cuda.max_memory_allocated`` over the same span (the caching allocator's reserve and
  the CUDA context are not counted).

The planner's figure (``ironcore.training.memory.plan_memory`` of the checkout running this script, with the
objective's shape) is printed beside it. ``--ref GIT_REF`` measures the code of another commit with the same
script: it checks ``GIT_REF`` out into a temporary ``git worktree`` and runs the children against that
package::

    python benchmarks/post_training_memory.py --repeats 3                       # this checkout, CPU
    python benchmarks/post_training_memory.py --repeats 3 --ref 0af51a0         # before issue 36's changes
    python benchmarks/post_training_memory.py --device cuda --json out.json

Results: docs/benchmarks.md (post-training memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_YAML = ROOT / "configs" / "model" / "smollm2-135m.yaml"
CASES = ("grpo", "grpo-kl", "dpo")
PROMPT_TOKENS, NEW_TOKENS, PROMPTS, GENERATIONS = 24, 64, 2, 8
DPO_TOKENS = 384
STEPS = 2  # the second step runs with the optimizer states allocated (AdamW makes them in the first one's step)
VOCAB_WORDS = "t"  # the benchmark tokenizer's words: t0, t1, ... (every id decodes)
MIB = 2**20


# ---- the child: one case, one process ----------------------------------------------------------------------


def rss_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose every id decodes (a random policy samples all of them); id 0 ends a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"{VOCAB_WORDS}{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))


def child(case: str, device_name: str, model_fields: dict[str, Any]) -> dict[str, Any]:
    """Build the model, optimizer and objective of ``case`` and run one step; the bytes it took."""
    import torch

    from ironcore.config.loader import build_config
    from ironcore.data.samples.rl import Prompt
    from ironcore.models import TransformerModel
    from ironcore.objectives import build_objective
    from ironcore.objectives.base import ObjectiveContext
    from ironcore.training.optim import build_training_optimizer

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    base_rss = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    tmp = Path(tempfile.mkdtemp(prefix="ironcore-memory-"))
    write_tokenizer(tmp, model_fields["vocab_size"])
    (tmp / "data.yaml").write_text("{}")
    grpo = case.startswith("grpo")
    options: dict[str, Any] = (
        {"num_generations": GENERATIONS, "max_completion_length": NEW_TOKENS,
         "beta": 0.04 if case == "grpo-kl" else 0.0,
         "rewards": [{"function": "regex", "options": {"pattern": "(?s).*t7.*"}}]}
        if grpo else {}
    )  # fmt: skip
    raw = {
        "model": model_fields, "data": {"config_path": str(tmp / "data.yaml")},
        "trainer": {"micro_batch_size": PROMPTS if grpo else 1, "gradient_accumulation_steps": 1,
                    "output_dir": str(tmp / "run"), "device": device_name, "objective": "grpo" if grpo else "dpo",
                    "objective_options": options},
        "optim": {"max_lr": 1e-5}, "init": {"seed": 0}, "utils": {"tracking": False},
    }  # fmt: skip
    cfg = build_config(raw, world_size=1)
    torch.manual_seed(0)
    model = TransformerModel(cfg.model).to(device)
    optimizer = build_training_optimizer(model, cfg)
    seq_len = PROMPT_TOKENS if grpo else DPO_TOKENS
    metadata = {"task_type": "rl" if grpo else "dpo", "tokenizer": {"eod_id": 0}}
    steps = [0]
    context = ObjectiveContext(cfg, device, contextlib.nullcontext(), tmp, metadata, seq_len,
                               model, lambda: steps[0])  # fmt: skip
    objective = build_objective(context)
    generator = torch.Generator().manual_seed(1)
    vocab = model_fields["vocab_size"]
    if grpo:
        prompts = [Prompt(i, torch.randint(1, vocab, (PROMPT_TOKENS,), generator=generator),
                          {"prompt": f"prompt {i}"}) for i in range(PROMPTS)]  # fmt: skip
        objective.prepare({"train": prompts})
        micro_batches = [{"index": torch.arange(PROMPTS)}]
    else:
        response = DPO_TOKENS // 2
        mb = {}
        for side in ("chosen", "rejected"):
            ids = torch.randint(1, vocab, (1, DPO_TOKENS + 1), generator=generator)
            mask = torch.zeros(1, DPO_TOKENS)
            mask[:, DPO_TOKENS - response :] = 1.0
            mb |= {f"{side}_input_ids": ids[:, :-1], f"{side}_labels": ids[:, 1:], f"{side}_loss_mask": mask,
                   f"{side}_position_ids": torch.arange(DPO_TOKENS)[None]}  # fmt: skip
        micro_batches = [{k: v.to(device) for k, v in mb.items()}]
    built_rss, built_peak = rss_bytes(), peak_rss_bytes()
    seconds = []
    for step in range(STEPS):
        started = time.perf_counter()
        result = objective.backward(model, micro_batches)
        optimizer.step(1.0)
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        steps[0] = step + 1
    out = {"case": case, "device": device_name, "seconds": seconds[-1], "loss": result.metrics["loss"],
           "built_mib": (built_rss - base_rss) / MIB, "peak_mib": (peak_rss_bytes() - base_rss) / MIB,
           "peak_before_step_mib": (built_peak - base_rss) / MIB}  # fmt: skip
    if cuda:
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / MIB
    return out


# ---- the parent: planner figures, children, the table --------------------------------------------------------


def planned_mib(case: str, model_fields: dict[str, Any]) -> float:
    """The memory planner's total for the case (this checkout's planner, whatever code the children run)."""
    from ironcore.config.base import from_dict
    from ironcore.config.model import ModelConfig
    from ironcore.objectives.base import MemoryShape
    from ironcore.training.memory import plan_memory

    cfg = from_dict(ModelConfig, model_fields)
    if case.startswith("grpo"):
        shape = MemoryShape(GENERATIONS, NEW_TOKENS, reference=case == "grpo-kl", kv_cache=True)
        plan = plan_memory(cfg, micro_batch_size=PROMPTS, seq_len=PROMPT_TOKENS, objective=shape)
    else:
        plan = plan_memory(cfg, micro_batch_size=1, seq_len=DPO_TOKENS, objective=MemoryShape(2, reference=True))
    return plan.total / MIB


def run_child(case: str, device: str, package_root: Path, model_fields: dict[str, Any], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(package_root), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": str(threads)}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", case, "--device", device, "--model-json", json.dumps(model_fields)]
    done = subprocess.run(cmd, env=env, cwd=package_root, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{case} on {device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def checkout(ref: str | None):
    """The package root to measure: this checkout, or ``ref`` in a temporary git worktree."""
    if ref is None:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        yield ROOT, head + (" + uncommitted changes" if dirty else "")
        return
    folder = Path(tempfile.mkdtemp(prefix="ironcore-ref-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=ROOT, check=True, capture_output=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout
        yield folder, commit.strip()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--ref", help="measure this git commit's code instead of the checkout's (a git worktree)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, json.loads(args.model_json))))
        return
    import yaml

    model_fields = yaml.safe_load(MODEL_YAML.read_text())
    rows = []
    with checkout(args.ref) as (package_root, commit):
        print(f"code measured: {commit} ({'--ref ' + args.ref if args.ref else 'this checkout'}); "
              f"device {args.device}; {args.repeats} fresh processes per case")  # fmt: skip
        print(f"{'case':<8} {'planned MiB':>11} {'measured MiB (median, min-max)':>32} {'weights+opt MiB':>15} "
              f"{'step s':>7}")  # fmt: skip
        for case in args.cases:
            runs = [run_child(case, args.device, package_root, model_fields, args.threads)
                    for _ in range(args.repeats)]  # fmt: skip
            peaks = [r["peak_mib"] for r in runs]
            planned = planned_mib(case, model_fields)
            row = {"case": case, "commit": commit, "device": args.device, "planned_mib": planned,
                   "peak_mib": peaks, "median_mib": statistics.median(peaks),
                   "built_mib": statistics.median(r["built_mib"] for r in runs),
                   "seconds": statistics.median(r["seconds"] for r in runs),
                   "loss": runs[0]["loss"]}  # fmt: skip
            rows.append(row)
            print(f"{case:<8} {planned:>11,.0f} {row['median_mib']:>12,.0f} ({min(peaks):,.0f}-{max(peaks):,.0f})"
                  f"{'':>10} {row['built_mib']:>15,.0f} {row['seconds']:>7.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

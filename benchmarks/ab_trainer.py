"""A/B of the trainer's step time: this working tree against an earlier commit, in interleaved pairs.

Both sides run the real ``Trainer.train_step`` on the same preprocessed data,
model, batch and seed, each in a fresh process (so neither inherits the
other's allocator or caches); the order within a pair alternates, so a slow
phase of a shared machine hits both alike. The earlier commit is checked out
into a temporary git worktree and imported from there. Reported: tokens/s of
every run, the per-pair ratio (this tree / base), its median and spread, and
(``--profile``) whether one profiled step of each side runs the same ATen
operators the same number of times -- the same work, whatever the noise.
Prints; asserts nothing.

    python benchmarks/ab_trainer.py --base f9c432d                        # pretraining, gpt2-small, 10 pairs
    python benchmarks/ab_trainer.py --base f9c432d --task dpo --model gpt2-tiny --seq-len 128
    python benchmarks/ab_trainer.py --base f9c432d --task dpo --dpo-reference precomputed
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _import_trainer():
    """``Trainer`` of whichever layout the imported ironcore has (it moved to ironcore.training)."""
    try:
        from ironcore.training.trainer import Trainer
    except ImportError:
        from ironcore.trainer import Trainer
    return Trainer


def prepare(workdir: Path, task: str, seq_len: int) -> Path:
    """The benchmark's data set, preprocessed with this tree's code (the shard format is the same on both sides)."""
    import yaml

    from ironcore.data.config import load_data_config
    from ironcore.data.preprocess import preprocess

    if task == "pretrain":
        source = {"path": str(DATA / "tinyshakespeare.txt"), "document_split": "paragraph"}
    else:
        source = {"path": str(DATA / "hh_rlhf" / "hh_rlhf_harmless_300.jsonl")}
    path = workdir / "data.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"ab-{task}", "task_type": task, "source": source, "tokenizer": {"path": str(DATA / "gpt2")},
        "max_seq_length": seq_len, "output_dir": str(workdir / "data"), "num_workers": 2,
    }))
    preprocess(load_data_config(path), progress=False)
    return path


def worker(args: argparse.Namespace) -> None:
    """One run: build the trainer from ``--tree``'s code, time ``--steps`` steps after ``--warmup``."""
    sys.path.insert(0, args.tree)
    import torch

    from ironcore.config import build_config, load_model_config, to_dict

    torch.set_num_threads(args.threads)
    Trainer = _import_trainer()
    model = to_dict(load_model_config(args.model))
    model.update(vocab_size=max(model["vocab_size"], 50257),
                 max_position_embeddings=max(model["max_position_embeddings"], args.seq_len))
    raw = {
        "model": model, "data": {"config_path": args.data_config},
        "trainer": {"micro_batch_size": args.micro_batch, "output_dir": str(Path(args.workdir) / "run"),
                    "save_interval": 0},
        "operation": {"train_steps": 10**6, "eval_interval": 0},
        "optim": {"max_lr": 3e-4, "warmup_steps": 2}, "utils": {"tracking": False},
    }
    if args.task == "dpo":
        raw["dpo"] = {"reference": args.dpo_reference}
    trainer = Trainer(build_config(raw, world_size=1))
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    result = {"tokens_per_sec": trainer.tokens_per_step / statistics.median(times[args.warmup:])}
    if args.profile:  # one more step: which ATen operators it runs, how often
        from torch.profiler import profile

        with profile() as prof:
            trainer.train_step()
        result["ops"] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    import ironcore

    print("RESULT " + json.dumps({**result, "code": str(Path(ironcore.__file__).parents[1])}))


def run(args: argparse.Namespace, tree: str, data_config: Path, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tree", tree, "--data-config", str(data_config),
           "--workdir", tempfile.mkdtemp(dir=workdir), "--task", args.task, "--model", args.model,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--dpo-reference", args.dpo_reference]
    if args.profile:
        cmd.append("--profile")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"run of {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[0][7:])
    if Path(result["code"]).resolve() != Path(tree).resolve():
        sys.exit(f"the run imported ironcore from {result['code']}, not from {tree}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=False, help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("--task", choices=["pretrain", "dpo"], default="pretrain")
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences (pretrain) or pairs (dpo) per step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (the median counts)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dpo-reference", choices=["live", "precomputed"], default="live")
    parser.add_argument("--profile", action="store_true",
                        help="compare the ATen operators of one profiled step per run (same work on both sides?)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--data-config", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.base:
        parser.error("--base REV is required")
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = str(Path(tmp) / "base")
        subprocess.run(["git", "worktree", "add", "--detach", base_tree, commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            data_config = prepare(Path(tmp), args.task, args.seq_len)
            if args.task == "dpo" and args.dpo_reference == "precomputed":  # cache the reference once, off the clock
                run(args, str(ROOT), data_config, tmp)
            runs: dict[str, list[dict]] = {"new": [], "base": []}
            for pair in range(args.pairs):
                order = [("new", str(ROOT)), ("base", base_tree)][:: 1 if pair % 2 == 0 else -1]
                for name, tree in order:
                    runs[name].append(run(args, tree, data_config, tmp))
                a, b = runs["new"][-1]["tokens_per_sec"], runs["base"][-1]["tokens_per_sec"]
                print(f"pair {pair + 1}: this tree {a:.1f}, {commit} {b:.1f} tok/s, ratio {a / b:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT, capture_output=True)
    new, base = ([r["tokens_per_sec"] for r in runs[side]] for side in ("new", "base"))
    ratios = sorted(n / b for n, b in zip(new, base))
    unit = "pairs" if args.task == "dpo" else "tokens"
    print(f"{args.task}, model {args.model}, {args.micro_batch} x {args.seq_len}, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup}, {args.pairs} interleaved pairs"
          + (f", dpo.reference {args.dpo_reference}" if args.task == "dpo" else ""))
    print(f"this tree: median {statistics.median(new):.1f} tok/s; {commit}: median {statistics.median(base):.1f} tok/s "
          f"(the trainer counts {unit}' positions)")
    print(f"ratio this tree / {commit}: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
          f"{sum(r >= 1.0 for r in ratios)} of {len(ratios)} pairs >= 1")
    if args.profile:
        ops = {side: runs[side][0]["ops"] for side in runs}
        differ = sorted(k for k in ops["new"].keys() | ops["base"].keys() if ops["new"].get(k) != ops["base"].get(k))
        print(f"ATen calls in a profiled step: this tree {sum(ops['new'].values())}, {commit} "
              f"{sum(ops['base'].values())}; " + (f"differing operators: {differ}" if differ else
                                                 "the same operators, the same number of times"))


if __name__ == "__main__":
    main()

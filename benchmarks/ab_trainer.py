"""A/B of the trainer's step time: this working tree against an earlier commit, step by step in one process.

The earlier commit is checked out into a temporary git worktree and its package
renamed ``ironcore_base`` (imports rewritten), so that both versions load into
one process: two ``Trainer``s on the same preprocessed data, model, batch and
seed, whose ``train_step`` calls alternate (ABBA order), so that the machine's
slow phases and the process's memory layout hit both alike. Separate processes
would add a per-process spread of ±10 % on a shared CPU, larger than the
differences this looks for. ``--processes`` repeats the whole comparison in
fresh processes. Reported per process: the median and range of the per-round
ratio (this tree / base); with ``--profile``, whether one profiled step of each
runs the same ATen operators the same number of times (the same work,
whatever the noise). ``--base HEAD`` on a clean tree is the A/A control.
Prints; asserts nothing.

    python benchmarks/ab_trainer.py --base f9c432d                        # pretraining, gpt2-small
    python benchmarks/ab_trainer.py --base f9c432d --task dpo --model gpt2-tiny --seq-len 128
    python benchmarks/ab_trainer.py --base HEAD --processes 3              # A/A: how precise is this?
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
BASE_PACKAGE = "ironcore_base"


def _trainer_class(package: str):
    """``Trainer`` of ``package`` in whichever layout it has (it moved to ``<package>.training``)."""
    import importlib

    try:
        return importlib.import_module(f"{package}.training.trainer").Trainer
    except ImportError:
        return importlib.import_module(f"{package}.trainer").Trainer


def prepare(workdir: Path, task: str, seq_len: int) -> Path:
    """The benchmark's data set, preprocessed with this tree's code (the shard format is the same on both sides)."""
    import yaml

    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess

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


def renamed_copy(tree: Path, target: Path) -> Path:
    """``tree`` with its package renamed ``ironcore_base`` (and every import of it), in ``target``."""
    shutil.copytree(tree / "configs", target / "configs")
    shutil.copytree(tree / "ironcore", target / BASE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (target / BASE_PACKAGE).rglob("*.py"):
        path.write_text(re.sub(r"\bironcore\b(?=[.\s])", BASE_PACKAGE, path.read_text()))
    return target


def build(package: str, args: argparse.Namespace, data_config: Path, out: Path):
    config_module = __import__(f"{package}.config", fromlist=["build_config", "load_model_config", "to_dict"])
    model = config_module.to_dict(config_module.load_model_config(args.model))
    model.update(vocab_size=max(model["vocab_size"], 50257),
                 max_position_embeddings=max(model["max_position_embeddings"], args.seq_len))
    raw = {
        "model": model, "data": {"config_path": str(data_config)},
        "trainer": {"micro_batch_size": args.micro_batch, "output_dir": str(out), "save_interval": 0},
        "operation": {"train_steps": 10**6, "eval_interval": 0},
        "optim": {"max_lr": 3e-4, "warmup_steps": 2}, "utils": {"tracking": False},
    }
    if args.task == "dpo":  # a `dpo:` group until issue 33, trainer.objective_options since
        options = {"reference": args.dpo_reference}
        if hasattr(__import__(f"{package}.config.training", fromlist=["Config"]), "DPOConfig"):
            raw["dpo"] = options
        else:
            raw["trainer"]["objective_options"] = options
    return _trainer_class(package)(config_module.build_config(raw, world_size=1))


def worker(args: argparse.Namespace) -> None:
    """One process: both trainers, ``--warmup`` steps each, then ``--rounds`` rounds of one timed step each."""
    sys.path.insert(0, args.base_root)
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    trainers = {"new": build("ironcore", args, Path(args.data_config), workdir / "new"),
                "base": build(BASE_PACKAGE, args, Path(args.data_config), workdir / "base")}
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.train_step()
    times: dict[str, list[float]] = {"new": [], "base": []}
    for round_ in range(args.rounds):
        for name in ("new", "base") if round_ % 2 == 0 else ("base", "new"):  # ABBA: no side always goes first
            start = time.perf_counter()
            trainers[name].train_step()
            times[name].append(time.perf_counter() - start)
    result = {"times": times, "tokens_per_step": trainers["new"].tokens_per_step}
    if args.profile:  # one more step each: which ATen operators it runs, how often
        from torch.profiler import profile

        result["ops"] = {}
        for name, trainer in trainers.items():
            with profile() as prof:
                trainer.train_step()
            result["ops"][name] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("--task", choices=["pretrain", "dpo"], default="pretrain")
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences (pretrain) or pairs (dpo) per step")
    parser.add_argument("--rounds", type=int, default=12, help="timed steps of each trainer per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1, help="repeat the comparison in fresh processes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dpo-reference", choices=["live", "precomputed"], default="live")
    parser.add_argument("--profile", action="store_true",
                        help="compare the ATen operators of one profiled step of each (the same work?)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-root", help=argparse.SUPPRESS)
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
    print(f"{args.task}, model {args.model}, {args.micro_batch} x {args.seq_len}, {args.threads} threads, "
          f"{args.rounds} alternating timed steps each after {args.warmup}"
          + (f", dpo.reference {args.dpo_reference}" if args.task == "dpo" else "")
          + f"; this tree vs {commit}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            base_root = renamed_copy(tree, Path(tmp) / "base")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        data_config = prepare(Path(tmp), args.task, args.seq_len)
        medians = []
        for process in range(args.processes):
            cmd = [sys.executable, __file__, "--worker", "--base-root", str(base_root), "--data-config",
                   str(data_config), "--workdir", tempfile.mkdtemp(dir=tmp), "--task", args.task, "--model",
                   args.model, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--rounds",
                   str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--dpo-reference", args.dpo_reference] + (["--profile"] if args.profile else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"the comparison failed:\n{out.stderr[-3000:]}")
            result = json.loads(line[0][7:])
            new, base = result["times"]["new"], result["times"]["base"]
            ratios = sorted(b / n for n, b in zip(new, base))  # step-time ratio base/new = throughput new/base
            medians.append(statistics.median(ratios))
            rate = result["tokens_per_step"]
            print(f"process {process + 1}: this tree {rate / statistics.median(new):.1f} tok/s, {commit} "
                  f"{rate / statistics.median(base):.1f} tok/s; throughput ratio per round: median "
                  f"{medians[-1]:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
                  f"{sum(r >= 1.0 for r in ratios)} of {len(ratios)} rounds >= 1", flush=True)
            if args.profile:
                ops = result["ops"]
                differ = sorted(k for k in ops["new"].keys() | ops["base"].keys()
                                if ops["new"].get(k) != ops["base"].get(k))
                print(f"  ATen calls in a profiled step: this tree {sum(ops['new'].values())}, {commit} "
                      f"{sum(ops['base'].values())}; " + (f"differing operators: {differ}" if differ else
                                                         "the same operators, the same number of times"))
    if args.processes > 1:
        print(f"median over processes of the per-round median ratio: {statistics.median(medians):.3f} "
              f"(each: {' '.join(f'{m:.3f}' for m in medians)})")


if __name__ == "__main__":
    main()

"""Learning from a verifiable reward on 2 CPU cores: SFT on the synthetic addition task, then GRPO.

    python benchmarks/grpo_learning.py [--workdir DIR] [--seed S] [--threads T] [--grpo-steps N]

1. ``ironcore synthetic --task addition``: seeded train and held-out prompts.
2. SFT of a ~1M-parameter LLaMA-style model on it, stopped early at the first
   evaluation (every 50 steps) where its held-out greedy accuracy reaches
   ``--stop-accuracy`` (0.5), so that GRPO starts from the same place on every
   machine (a fixed step count gave 24-56 % on three CPUs).
3. GRPO from that checkpoint with the ``exact`` reward on the prompts: the
   held-out greedy accuracy (and pass@k) at the start, every eval interval and
   at the end.

Prints the accuracy curve, the gain in points and the wall time of each phase;
writes ``grpo_learning.json`` and ``grpo_learning.png`` to the workdir. A
figure, not a test: the numbers go to docs/objectives.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

MODEL = {
    "name": "adder", "vocab_size": 320, "hidden_size": 128, "num_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "ffn_hidden_size": 384, "max_position_embeddings": 64, "position_embedding": "rope",
    "norm_type": "rmsnorm", "gated_mlp": True, "activation": "silu",
}


def data_config(path: Path, task: Path, out: Path, task_type: str) -> Path:
    fields = {"prompt": "prompt", "response": "answer"} if task_type == "sft" else {"prompt": "prompt"}
    config = {"name": f"addition-{task_type}", "task_type": task_type, "fields": fields,
              "source": {"path": str(task / "train.jsonl")}, "valid_source": {"path": str(task / "heldout.jsonl")},
              "tokenizer": {"path": str(out.parent / "tokenizer")} if task_type == "rl" else
              {"train": {"vocab_size": 258}}, "max_seq_length": 16, "output_dir": str(out), "num_workers": 0}
    if task_type == "rl":
        config["reward_fields"] = ["answer"]
    path.write_text(yaml.safe_dump(config))
    return path


def train_config(data: Path, out: Path, steps: int, lr: float, seed: int = 1, **extra) -> dict:
    config = {
        "model": MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 32, "gradient_accumulation_steps": 1, "output_dir": str(out),
                    "save_interval": 0},
        "operation": {"train_steps": steps, "eval_interval": 0, "eval_steps": 8, "log_interval": 10},
        "optim": {"max_lr": lr, "min_lr": lr / 10, "warmup_steps": 10}, "init": {"seed": seed},
        "utils": {"tracking": False},
    }
    for group, values in extra.items():
        config.setdefault(group, {}).update(values)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--sft-steps", type=int, default=4000, help="at most (the stop accuracy ends SFT first)")
    parser.add_argument("--stop-accuracy", type=float, default=0.5, help="held-out greedy accuracy that ends SFT")
    parser.add_argument("--seed", type=int, default=1, help="init.seed of both runs (weights, data order, rollouts)")
    parser.add_argument("--grpo-steps", type=int, default=1600)
    parser.add_argument("--grpo-lr", type=float, default=3e-4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--eval-interval", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ironcore.config import build_config
    from ironcore.data.demo.synthetic import write_task
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess
    from ironcore.training.trainer import Trainer

    root = Path(args.workdir or tempfile.mkdtemp(prefix="grpo-learning-"))
    root.mkdir(parents=True, exist_ok=True)
    task = root / "task"
    write_task(task, "addition", 20_000, 256, seed=0, overrides={"digits": str(args.digits)})
    sft_data = data_config(root / "sft.yaml", task, root / "sft-data", "sft")
    preprocess(load_data_config(sft_data), progress=False)
    (root / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "tokenizer" / name).write_bytes((root / "sft-data" / name).read_bytes())
    rl_data = data_config(root / "rl.yaml", task, root / "rl-data", "rl")
    preprocess(load_data_config(rl_data), progress=False)

    start = time.perf_counter()
    if not (root / "sft" / "final_eval.json").is_file():  # a rerun in the same workdir reuses the SFT start
        sft = train_config(sft_data, root / "sft", args.sft_steps, 3e-3, args.seed,
                           operation={"eval_interval": 50, "eval_tasks": [f"synthetic={task}"],
                                      "stop_metric": "eval/synthetic/accuracy", "stop_threshold": args.stop_accuracy})
        Trainer(build_config(sft, world_size=1)).train()
    sft_seconds = time.perf_counter() - start
    shutil.rmtree(root / "grpo", ignore_errors=True)

    options = {"num_generations": args.generations, "max_completion_length": 6, "temperature": 1.0,
               "rewards": [{"function": "exact"}], "eval_num_samples": 4}
    grpo = train_config(
        rl_data, root / "grpo", args.grpo_steps, args.grpo_lr, args.seed,
        trainer={"micro_batch_size": args.prompts_per_step, "objective_options": options},
        operation={"eval_interval": args.eval_interval, "eval_steps": 256 // args.prompts_per_step,
                   "eval_at_start": True, "log_interval": 5},
        init={"init_from": str(root / "sft")},
    )
    start = time.perf_counter()
    Trainer(build_config(grpo, world_size=1)).train()
    grpo_seconds = time.perf_counter() - start

    lines = [json.loads(line) for line in (root / "grpo" / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["val_accuracy"], m["val_pass_at_4"]) for m in lines if "val_accuracy" in m]
    rewards = [(m["step"], m["reward"]) for m in lines if "reward" in m]
    gain = 100 * (curve[-1][1] - curve[0][1])
    sft_steps = json.loads((root / "sft" / "final_eval.json").read_text())["step"]
    result = {"digits": args.digits, "seed": args.seed, "threads": args.threads, "sft_steps": sft_steps,
              "grpo_steps": args.grpo_steps,
              "sft_seconds": round(sft_seconds, 1), "grpo_seconds": round(grpo_seconds, 1),
              "accuracy": curve, "train_reward": rewards, "gain_points": round(gain, 1)}
    (root / "grpo_learning.json").write_text(json.dumps(result, indent=2))
    print(f"SFT {sft_steps} steps: {sft_seconds:.0f} s; GRPO {args.grpo_steps} steps: {grpo_seconds:.0f} s")
    print("step  held-out greedy accuracy  pass@4")
    for step, accuracy, passed in curve:
        print(f"{step:>4}  {accuracy:>24.3f}  {passed:>6.3f}")
    print(f"gain: {gain:+.1f} points in {grpo_seconds / 60:.1f} min of GRPO")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
    from rl_summary import plot_grpo_curve  # the `rl` pipeline target's figure

    plot_grpo_curve(lines, root / "grpo_learning.png", "GRPO on 2-digit addition from an SFT start (2 CPU cores)")
    print(f"wrote {root / 'grpo_learning.json'} and {root / 'grpo_learning.png'}")


if __name__ == "__main__":
    main()

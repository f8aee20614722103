"""DPO training throughput: pairs/s with a live reference model vs precomputed reference log-probs.

Both runs use the real trainer (``Trainer.train_step``) on the same
preprocessed HH-RLHF pairs, model, batch and seed; only the ``reference`` option
differs. A live reference costs one extra forward pass over both responses
per step (and the reference's memory); the precomputed one costs a single
pass over the data set before training, reported separately and amortised
over every later run on the same data and starting weights (it is cached
beside the shards). Steps alternate between the two trainers in rounds so
machine noise hits both alike; the median step time is reported. Prints;
asserts nothing.

    python benchmarks/dpo_throughput.py                                   # gpt2-tiny, 128 positions, CPU
    python benchmarks/dpo_throughput.py --model gpt2-small --seq-len 512 --micro-batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ironcore.config import build_config, load_model_config, to_dict
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "examples" / "data" / "hh_rlhf" / "hh_rlhf_harmless_300.jsonl"


def prepare(root: Path, seq_len: int) -> Path:
    """Preprocess the example pairs with the GPT-2 tokenizer; returns the data config path."""
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hh-bench", "task_type": "dpo", "source": {"path": str(PAIRS)},
        "tokenizer": {"path": str(ROOT / "examples" / "data" / "gpt2")}, "max_seq_length": seq_len,
        "output_dir": str(root / "data"), "num_workers": 0,
    }))
    metadata = preprocess(load_data_config(path), progress=False)
    print(f"data: {metadata['splits']['train']['documents']} pairs, skipped {json.dumps(metadata['counts'])}")
    return path


def trainer(args: argparse.Namespace, data: Path, out: Path, reference: str) -> tuple[Trainer, float]:
    """A trainer with the dpo ``reference`` option set, and the seconds its set-up took (precomputation included)."""
    model = to_dict(load_model_config(args.model))
    model.update(vocab_size=max(model["vocab_size"], 50257), max_position_embeddings=max(
        model["max_position_embeddings"], args.seq_len))
    cfg = build_config({
        "model": model, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": args.micro_batch, "output_dir": str(out), "save_interval": 0,
                    "device": args.device, "precision": args.precision,
                    "objective_options": {"reference": reference}},
        "operation": {"train_steps": 10**6, "eval_interval": 0},
        "optim": {"max_lr": 1e-5}, "utils": {"tracking": False},
    }, world_size=1)
    start = time.perf_counter()
    built = Trainer(cfg)
    return built, time.perf_counter() - start


def step_time(t: Trainer) -> float:
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    t.train_step()
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-tiny", help="model name (configs/model/) or YAML")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root, args.seq_len)
        trainers = {}
        for reference in ("live", "precomputed"):
            trainers[reference], setup = trainer(args, data, root / reference, reference)
            print(f"{reference:>11}: set-up {setup:.2f} s" + (" (reference log-probs of every pair computed "
                                                                 "and cached)" if reference == "precomputed" else ""))
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(args.warmup + args.steps):
            for name, t in trainers.items():
                elapsed = step_time(t)
                if round_ >= args.warmup:
                    times[name].append(elapsed)
    rates = {name: args.micro_batch / statistics.median(ts) for name, ts in times.items()}
    print(f"model {args.model}, {args.seq_len} positions, {args.micro_batch} pairs/step, {args.device} "
          f"{args.precision}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"{name:>11}: {rate:8.2f} pairs/s (median of {args.steps} steps)")
    print(f"precomputed / live: {rates['precomputed'] / rates['live']:.2f}x")


if __name__ == "__main__":
    main()

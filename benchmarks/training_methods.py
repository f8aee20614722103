"""nanoGPT's CPU recipe as a grid of training methods: AdamW vs Muon, cosine vs WSD, two learning rates each.

    python benchmarks/training_methods.py                          # the 8 points, 2,000 steps each
    python benchmarks/training_methods.py --steps 200 --out /tmp/m # a quick look

The recipe of nanoGPT's README for a CPU (``train_shakespeare_char`` with ``--block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``): tinyshakespeare
with bytes as tokens (a byte-level BPE of 257 tokens: the 256 bytes and the end of document), a GPT-2 layout
without biases, 4 layers of 128, 64 positions, 12 sequences a step, warmup 100, min_lr a tenth of max_lr,
beta2 0.99, weight decay 0.1, seed 1337. Each point is one ``ironcore train`` (fp32, 2 threads), one after
the other; Muon runs with torch's ``match_rms_adamw`` learning-rate adjustment, so the same max_lr means the
same update size. Printed and written to ``OUT/results.json``, ``OUT/summary.md`` and ``OUT/curves.png``:
each point's final validation loss (the mean of 20 batches of the 10 % of paragraphs held out) and its wall
time (the process's, import and data loading included), ranked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "nanogpt-char", "vocab_size": 257, "hidden_size": 128, "num_layers": 4, "num_attention_heads": 4,
         "max_position_embeddings": 64, "position_embedding": "learned", "norm_type": "layernorm",
         "gated_mlp": False, "activation": "gelu", "attention_bias": False, "attention_out_bias": False,
         "mlp_bias": False, "tie_word_embeddings": True}  # fmt: skip
OPTIMIZERS = {"adamw": {}, "muon": {"optimizer_options": {"adjust_lr_fn": "match_rms_adamw"}}}
SCHEDULES = {"cosine": {}, "wsd": {"decay_fraction": 0.2}}


def prepare(out: Path) -> Path:
    """tinyshakespeare as bytes, 10 % held out: the data config's path."""
    config = out / "data.yaml"
    config.write_text(yaml.safe_dump({
        "name": "shakespeare_char", "task_type": "pretrain",
        "source": {"path": str(ROOT / "examples/data/tinyshakespeare.txt"), "document_split": "paragraph"},
        "tokenizer": {"train": {"vocab_size": 257, "min_frequency": 1_000_000_000}}, "max_seq_length": 64,
        "valid_fraction": 0.1, "output_dir": str(out / "data"), "num_workers": 0,
    }))
    subprocess.run([sys.executable, "-m", "ironcore", "preprocess", "--config", str(config), "--no-progress"],
                   check=True, cwd=ROOT)  # fmt: skip
    return config


def point(data: Path, out: Path, optimizer: str, schedule: str, lr: float, steps: int) -> dict:
    """One training run; its final validation loss, curve and wall time."""
    name = f"{optimizer}-{schedule}-lr{lr:g}"
    run = out / name
    config = out / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": MODEL, "data": {"config_path": str(data)},
        "trainer": {"micro_batch_size": 12, "output_dir": str(run), "save_interval": 0},
        "operation": {"train_steps": steps, "eval_interval": max(steps // 10, 1), "eval_steps": 20,
                      "log_interval": max(steps // 40, 1)},
        "optim": {"optimizer": optimizer, "max_lr": lr, "min_lr": lr / 10, "warmup_steps": min(100, steps // 10),
                  "beta2": 0.99, "weight_decay": 0.1, "lr_schedule": schedule, **SCHEDULES[schedule],
                  **OPTIMIZERS[optimizer]},
        "init": {"seed": 1337}, "utils": {"tracking": False},
    }))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ironcore", "train", "--config", str(config), "--threads", "2"],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    return {"name": name, "optimizer": optimizer, "schedule": schedule, "max_lr": lr, "steps": steps,
            "val_loss": curve[-1][1], "seconds": round(seconds, 1), "curve": curve}


def report(points: list[dict], out: Path) -> None:
    ranked = sorted(points, key=lambda p: p["val_loss"])
    lines = ["| rank | point | final val loss | wall s |", "|---|---|---|---|"]
    lines += [f"| {i} | {p['name']} | {p['val_loss']:.4f} | {p['seconds']:.0f} |" for i, p in enumerate(ranked, 1)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(points, indent=2))
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for p in ranked:
        steps, losses = zip(*p["curve"], strict=True)
        axes.plot(steps, losses, label=f"{p['name']} ({p['val_loss']:.3f})",
                  linestyle="-" if p["optimizer"] == "muon" else "--")  # fmt: skip
    axes.set(xlabel="step", ylabel="validation loss (nats per byte)", title="nanoGPT CPU recipe, shakespeare bytes")
    axes.legend(fontsize=8)
    figure.savefig(out / "curves.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--out", type=Path, default=Path("/tmp/training_methods"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args.out)
    points = []
    for optimizer, schedule, lr in itertools.product(OPTIMIZERS, SCHEDULES, args.lrs):
        points.append(point(data, args.out, optimizer, schedule, lr, args.steps))
        print(f"{points[-1]['name']}: val loss {points[-1]['val_loss']:.4f} in {points[-1]['seconds']:.0f} s",
              flush=True)  # fmt: skip
    report(points, args.out)


if __name__ == "__main__":
    main()

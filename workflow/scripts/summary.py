"""The pipeline's summary: one table and one loss-curve plot comparing the experiments.

Baseline: the unigram entropy of the training tokens, H = -sum p(t) ln p(t) in nats per token,
is the loss of the best model that ignores context; a model that has learned anything ends far
below it. The unigram cross-entropy of the validation tokens (add-one smoothed training
frequencies) is reported beside it, since validation loss is measured on those tokens.

Writes summary.md, summary.html, summary.json and loss_curves.png into --output-dir.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from task_table import cell, task_columns  # noqa: E402 (beside this script)

from ironcore.checkpoints.hf_families import model_config_from_folder  # noqa: E402
from ironcore.config import load_config  # noqa: E402
from ironcore.data.preprocessing.indexed import IndexedDataset  # noqa: E402
from ironcore.data.preprocessing.metadata import load_metadata  # noqa: E402
from ironcore.models.stats import model_stats  # noqa: E402

NOTE = (
    "Losses are cross-entropies in nats per token. The val loss column is ironcore eval over the whole "
    "validation split; the curves' validation points are the trainer's periodic evaluations on its first "
    "operation.eval_steps batches, so the two differ."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", required=True)
    for name in ("evals", "samples", "tasks", "metrics", "configs", "data"):
        parser.add_argument(f"--{name}", nargs="+", required=True, help=f"one {name} file per experiment")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    datasets: dict[str, dict[str, Any]] = {}
    rows = []
    for i, exp in enumerate(args.experiments):
        data_dir = str(Path(args.data[i]).parent)
        if data_dir not in datasets:
            datasets[data_dir] = unigram_baseline(data_dir)
        rows.append(experiment_row(exp, args, i, datasets[data_dir]))
    tasks, values = task_columns(args.tasks)  # accuracy on the tasks an experiment configures, if any
    for row, task_values in zip(rows, values, strict=True):
        row["tasks"] = task_values

    plot_losses(rows, datasets, out / "loss_curves.png")
    summary = {"datasets": datasets, "experiments": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(rows, datasets, tasks))
    (out / "summary.html").write_text(html_page(rows, datasets, tasks))
    print((out / "summary.md").read_text())


def unigram_baseline(data_dir: str) -> dict[str, Any]:
    """Unigram entropy of the training tokens and unigram cross-entropy of the validation tokens."""
    metadata = load_metadata(data_dir)
    vocab = metadata["tokenizer"]["vocab_size"]
    counts = {}
    for split in ("train", "valid"):
        shard = metadata["splits"][split]["shards"]["tokens"]
        total = np.zeros(vocab, dtype=np.int64)
        for chunk in IndexedDataset(Path(data_dir) / shard).iter_chunks():
            total += np.bincount(chunk, minlength=vocab)[:vocab]
        counts[split] = total
    train = counts["train"]
    p = train[train > 0] / train.sum()
    smoothed = (train + 1) / (train.sum() + vocab)
    valid = counts["valid"]
    return {
        "name": metadata["name"],
        "vocab_size": vocab,
        "train_tokens": int(train.sum()),
        "valid_tokens": int(valid.sum()),
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "unigram_valid_cross_entropy": float(-(valid * np.log(smoothed)).sum() / valid.sum()),
    }


def experiment_row(exp: str, args: argparse.Namespace, i: int, baseline: dict[str, Any]) -> dict[str, Any]:
    cfg = load_config(args.configs[i], read_folder=model_config_from_folder)  # `model:` may name an HF folder
    seq_len = load_metadata(Path(args.data[i]).parent)["max_seq_length"]
    stats = model_stats(cfg.model, seq_len)
    lines = [json.loads(line) for line in Path(args.metrics[i]).read_text().splitlines() if line.strip()]
    train = [(line["step"], line["loss"]) for line in lines if "loss" in line]
    valid = [(line["step"], line["val_loss"]) for line in lines if "val_loss" in line]
    speeds = [line["tokens_per_sec"] for line in lines if "tokens_per_sec" in line]
    result = json.loads(Path(args.evals[i]).read_text())
    samples = json.loads(Path(args.samples[i]).read_text())
    steps = train[-1][0] if train else 0
    return {
        "experiment": exp,
        "model": cfg.model.name,
        "parameters": stats.params,
        "train_flops_per_token": stats.train_flops_per_token,
        "steps": steps,
        "train_tokens": steps * cfg.trainer.train_batch_size * seq_len,
        "final_train_loss": float(np.mean([loss for _, loss in train[-4:]])) if train else math.nan,
        "val_loss": result["val_loss"],
        "val_ppl": result["val_ppl"],
        "val_loss_vs_unigram": result["val_loss"] - baseline["unigram_entropy"],
        "tokens_per_sec": float(np.median(speeds)) if speeds else math.nan,
        "samples": samples,
        "curve": {"train": train, "valid": valid, "tokens_per_step": cfg.trainer.train_batch_size * seq_len},
    }


COLUMNS = [
    ("experiment", "experiment", "{}"),
    ("model", "model", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("steps", "steps", "{:,}"),
    ("train_tokens", "tokens trained", "{:,}"),
    ("final_train_loss", "train loss (last logs)", "{:.3f}"),
    ("val_loss", "val loss", "{:.3f}"),
    ("val_ppl", "val ppl", "{:.1f}"),
    ("val_loss_vs_unigram", "val loss - unigram H", "{:+.3f}"),
    ("tokens_per_sec", "tokens/s (median)", "{:,.0f}"),
]


def _titles(tasks: list[str]) -> list[str]:
    return [title for _, title, _ in COLUMNS] + tasks


def _cells(row: dict[str, Any], tasks: list[str]) -> list[str]:
    return [fmt.format(row[key]) for key, _, fmt in COLUMNS] + [cell(row["tasks"], task) for task in tasks]


def _baseline_line(data: dict[str, Any]) -> str:
    return (
        f"Data set `{data['name']}`: {data['train_tokens']:,} training and {data['valid_tokens']:,} validation "
        f"tokens, vocabulary {data['vocab_size']:,}. Unigram entropy of the training tokens "
        f"**{data['unigram_entropy']:.3f} nats/token** (unigram cross-entropy of the validation tokens "
        f"{data['unigram_valid_cross_entropy']:.3f}): a model below it has learned from context."
    )


def markdown(rows: list[dict[str, Any]], datasets: dict[str, dict[str, Any]], tasks: list[str]) -> str:
    lines = ["# IronCore pipeline summary", ""]
    lines += [_baseline_line(data) for data in datasets.values()]
    lines += ["", "| " + " | ".join(_titles(tasks)) + " |"]
    lines += ["|" + "|".join("---" for _ in _titles(tasks)) + "|"]
    lines += ["| " + " | ".join(_cells(row, tasks)) + " |" for row in rows]
    lines += ["", NOTE, "", "![loss curves](loss_curves.png)", ""]
    for row in rows:
        lines += [f"## Samples: {row['experiment']}", ""]
        if row["samples"]["note"]:
            lines += [row["samples"]["note"], ""]
        for sample in row["samples"]["samples"]:
            lines += ["```", sample["text"], "```", ""]
    return "\n".join(lines)


def html_page(rows: list[dict[str, Any]], datasets: dict[str, dict[str, Any]], tasks: list[str]) -> str:
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>IronCore pipeline summary</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}pre{background:#f4f4f4;padding:.6em;"
             "white-space:pre-wrap}</style>",
             "<h1>IronCore pipeline summary</h1>"]
    parts += [f"<p>{esc(_baseline_line(data)).replace('**', '')}</p>" for data in datasets.values()]
    parts.append("<table><tr>" + "".join(f"<th>{esc(title)}</th>" for title in _titles(tasks)) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(text)}</td>" for text in _cells(row, tasks)) + "</tr>" for row in rows]
    parts += [f"</table><p>{NOTE}</p>",
              "<img src='loss_curves.png' alt='loss curves' style='max-width:100%'>"]
    for row in rows:
        parts.append(f"<h2>Samples: {esc(row['experiment'])}</h2>")
        if row["samples"]["note"]:
            parts.append(f"<p>{esc(row['samples']['note'])}</p>")
        parts += [f"<pre>{esc(sample['text'])}</pre>" for sample in row["samples"]["samples"]]
    return "\n".join(parts) + "\n"


def plot_losses(rows: list[dict[str, Any]], datasets: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        curve = row["curve"]
        scale = curve["tokens_per_step"] / 1e6
        (line,) = ax.plot([s * scale for s, _ in curve["train"]], [v for _, v in curve["train"]],
                          label=f"{row['experiment']} train", alpha=0.8)
        if curve["valid"]:
            ax.plot([s * scale for s, _ in curve["valid"]], [v for _, v in curve["valid"]], "o--",
                    color=line.get_color(), label=f"{row['experiment']} validation (periodic, subset)")
    for data in datasets.values():
        ax.axhline(data["unigram_entropy"], color="gray", linestyle=":",
                   label=f"unigram entropy ({data['name']}) {data['unigram_entropy']:.2f}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("IronCore pipeline: loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

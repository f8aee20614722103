"""A sweep's summary: its points ranked by final validation loss, with their curves overlaid in one figure.

Each point is an experiment the pipeline trained and evaluated; its final validation loss is ``ironcore eval``'s
over the whole validation split (results/eval/POINT/eval.json), its curves the trainer's metrics.jsonl, its wall
time and CPU time the training job's (Snakemake's benchmark file: process start, data loading and evaluations
included; on a shared machine the CPU time is the steadier of the two).

Writes summary.md, summary.html, summary.json and curves.png into --output-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ironcore.tables import html_table  # noqa: E402

NOTE = ("Ranked by final validation loss (nats per token, `ironcore eval` over the whole validation split). "
        "Wall and CPU time are the training job's, start to end. The curves are the trainer's periodic validation "
        "on its first operation.eval_steps batches, and its training loss.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True)
    parser.add_argument("--base", required=True, help="the experiment the points start from")
    parser.add_argument("--points", required=True, help="JSON: point -> its swept keys and values")
    for name in ("evals", "metrics", "times"):
        parser.add_argument(f"--{name}", nargs="+", required=True, help=f"one {name} file per point, in order")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args()
    points: dict[str, dict[str, Any]] = json.loads(args.points)
    rows = sorted((point_row(name, swept, *files) for (name, swept), *files
                   in zip(points.items(), args.evals, args.metrics, args.times, strict=True)),
                  key=lambda row: row["val_loss"])  # fmt: skip
    keys = list(dict.fromkeys(key for swept in points.values() for key in swept))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.sweep, out / "curves.png")
    title = f"Sweep {args.sweep}: {len(rows)} points from experiment {args.base}"
    (out / "summary.json").write_text(json.dumps({"sweep": args.sweep, "base": args.base, "keys": keys,
                                                  "points": rows}, indent=2) + "\n")  # fmt: skip
    table = ranked(rows, keys)
    (out / "summary.md").write_text(markdown(title, table))
    page = html_table(title, NOTE, table) + "<img src='curves.png' alt='curves' style='max-width:100%'>\n"
    (out / "summary.html").write_text(page)
    print((out / "summary.md").read_text())


def point_row(name: str, swept: dict[str, Any], eval_path: str, metrics_path: str, times_path: str
              ) -> dict[str, Any]:  # fmt: skip
    """One point: its swept values, final validation loss, wall time and curves."""
    result = json.loads(Path(eval_path).read_text())
    lines = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    with open(times_path, newline="") as tsv:
        times = next(csv.DictReader(tsv, delimiter="\t"))
    return {
        "point": name,
        "swept": swept,
        "val_loss": result["val_loss"],
        "val_ppl": result["val_ppl"],
        "steps": result["step"],
        "seconds": float(times["s"]),
        "cpu_seconds": float(times["cpu_time"]),
        "train": [(line["step"], line["loss"]) for line in lines if "loss" in line],
        "valid": [(line["step"], line["val_loss"]) for line in lines if "val_loss" in line],
    }


def ranked(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, str]]:
    """The summary's table, as both summary.md and summary.html show it: one row per point, best first."""
    return [{"rank": str(rank), "point": row["point"], **{key: str(row["swept"].get(key, "-")) for key in keys},
             "val loss": f"{row['val_loss']:.4f}", "val ppl": f"{row['val_ppl']:.2f}", "steps": f"{row['steps']:,}",
             "wall s": f"{row['seconds']:.0f}", "cpu s": f"{row['cpu_seconds']:.0f}"}
            for rank, row in enumerate(rows, 1)]  # fmt: skip


def markdown(title: str, table: list[dict[str, str]]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in table]
    return "\n".join([*lines, "", NOTE, "", "![curves](curves.png)", ""])


def plot(rows: list[dict[str, Any]], sweep: str, path: Path) -> None:
    """Training loss (left) and periodic validation loss (right) of every point against the step."""
    fig, (train, valid) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for row in rows:
        label = row["point"].removeprefix(f"{sweep}-")
        (line,) = train.plot(*zip(*row["train"], strict=True), alpha=0.8, label=label)
        if row["valid"]:
            valid.plot(*zip(*row["valid"], strict=True), "o-", color=line.get_color(), label=label)
    for ax, what in ((train, "training loss"), (valid, "validation loss (periodic)")):
        ax.set_xlabel("step")
        ax.set_title(f"sweep {sweep}: {what}")
        ax.grid(alpha=0.3)
    train.set_ylabel("cross-entropy (nats/token)")
    valid.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

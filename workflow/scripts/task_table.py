"""Task results (results/eval/EXP/tasks.json from `ironcore eval --task`) as a table, one row per experiment.

Imported by summary.py (its task columns) and run by the `chain_summary` rule for the optional chain:

    python task_table.py --experiments sft dpo --tasks results/eval/sft/tasks.json ... --output-dir results/chain

which writes tasks.md, tasks.html and tasks.json there.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

NOT_METRICS = ("items", "seconds")


def task_columns(paths: list[str]) -> tuple[list[str], list[dict[str, float]]]:
    """The columns ("gsm8k accuracy", ...) any file has, in first-seen order, and each file's values."""
    columns: list[str] = []
    rows = []
    for path in paths:
        tasks = json.loads(Path(path).read_text()).get("tasks", {})
        row = {f"{task} {metric}": value for task, metrics in tasks.items() for metric, value in metrics.items()
               if metric not in NOT_METRICS}  # fmt: skip
        columns += [c for c in row if c not in columns]
        rows.append(row)
    return columns, rows


def cell(row: dict[str, float], column: str) -> str:
    return f"{row[column]:.3f}" if column in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--tasks", nargs="+", required=True, help="one tasks.json per experiment")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    columns, rows = task_columns(args.tasks)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = [{"experiment": exp, **row} for exp, row in zip(args.experiments, rows, strict=True)]
    (out / "tasks.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = ["# Task accuracy", "", "| experiment | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    lines += [f"| {exp} | " + " | ".join(cell(row, c) for c in columns) + " |"
              for exp, row in zip(args.experiments, rows, strict=True)]  # fmt: skip
    (out / "tasks.md").write_text("\n".join(lines) + "\n")
    esc = html.escape
    page = ["<!doctype html><meta charset='utf-8'><title>Task accuracy</title><h1>Task accuracy</h1><table>",
            "<tr><th>experiment</th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"]  # fmt: skip
    page += [f"<tr><td>{esc(exp)}</td>" + "".join(f"<td>{cell(row, c)}</td>" for c in columns) + "</tr>"
             for exp, row in zip(args.experiments, rows, strict=True)]  # fmt: skip
    (out / "tasks.html").write_text("\n".join(page) + "</table>\n")
    print((out / "tasks.md").read_text())


if __name__ == "__main__":
    main()

"""The `rl` target's summary: held-out accuracy before and after GRPO, and the reward curve.

Reads the before/after evaluations (`ironcore eval --as-validation`, the rl_eval rule) and the GRPO
run's metrics.jsonl; writes a Markdown and an HTML page, the figure (training
reward per step, held-out greedy accuracy and pass@k at each evaluation) and
the numbers as JSON.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="evaluation JSON of the starting (SFT) checkpoint")
    parser.add_argument("--after", required=True, help="evaluation JSON of the GRPO run's final checkpoint")
    parser.add_argument("--metrics", required=True, help="the GRPO run's metrics.jsonl")
    parser.add_argument("--names", nargs=2, default=["sft", "grpo"], help="the two experiments' names")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    before, after = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    lines = [json.loads(line) for line in Path(args.metrics).read_text().splitlines() if line.strip()]
    rewards = [(m["step"], m["reward"]) for m in lines if "reward" in m]
    evals = [m for m in lines if "val_accuracy" in m]
    pass_key = next((k for k in after if k.startswith("val_pass_at_")), None)
    k = pass_key.rsplit("_", 1)[1] if pass_key else None

    rows = [(f"{args.names[0]} (start)", before), (f"{args.names[1]} (after GRPO)", after)]
    gain = 100 * (after["val_accuracy"] - before["val_accuracy"])
    header = "| checkpoint | step | held-out greedy accuracy |" + (f" pass@{k} |" if k else "")
    table = [header, "|---|---|---|" + ("---|" if k else "")]
    for name, result in rows:
        cells = [name, str(result.get("step")), f"{100 * result['val_accuracy']:.1f} %"]
        if k:
            cells.append(f"{100 * result[pass_key]:.1f} %")
        table.append("| " + " | ".join(cells) + " |")
    summary = {"before": before, "after": after, "gain_points": round(gain, 2),
               "train_reward_first": rewards[0][1] if rewards else None,
               "train_reward_last": rewards[-1][1] if rewards else None,
               "evaluations": [{key: m[key] for key in m if key == "step" or key.startswith("val_")} for m in evals]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_grpo_curve(lines, out / "reward_curve.png")
    markdown = ["# RL: GRPO on the synthetic task", "",
                f"Held-out {before['prompts']} prompts; gain **{gain:+.1f} points** of greedy accuracy.", "",
                *table, "", "![reward curve](reward_curve.png)", ""]
    (out / "summary.md").write_text("\n".join(markdown))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row.strip("|").split("|")) + "</tr>"
                   for row in table[2:])
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table[0].strip("|").split("|"))
    (out / "summary.html").write_text(
        "<!doctype html><meta charset=utf-8><title>RL summary</title><h1>RL: GRPO on the synthetic task</h1>"
        f"<p>Gain: {gain:+.1f} points of held-out greedy accuracy.</p><table border=1><tr>{head}</tr>{body}"
        "</table><p><img src=reward_curve.png></p>\n")
    print("\n".join(markdown))
    return 0


def plot_grpo_curve(lines: list[dict], path: Path, title: str | None = None) -> None:
    """A GRPO run's curve from its metrics.jsonl lines: the training reward per step, and the held-out greedy
    accuracy and pass@k at each evaluation (also used by benchmarks/grpo_learning.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [(m["step"], m["reward"]) for m in lines if "reward" in m]
    evals = [m for m in lines if "val_accuracy" in m]
    pass_key = next((k for m in evals for k in m if k.startswith("val_pass_at_")), None)
    fig, ax = plt.subplots(figsize=(7, 4))
    if rewards:
        ax.plot([s for s, _ in rewards], [r for _, r in rewards], alpha=0.5, label="training reward (mean)")
    ax.plot([m["step"] for m in evals], [m["val_accuracy"] for m in evals], "o-", label="held-out greedy accuracy")
    if pass_key:
        ax.plot([m["step"] for m in evals if pass_key in m], [m[pass_key] for m in evals if pass_key in m], "s--",
                label=f"held-out pass@{pass_key.rsplit('_', 1)[1]}")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""Held-out accuracy of a checkpoint on a verifiable task, for the `rl` target's before/after table.

The built-in ``synthetic`` task of ``ironcore eval --task`` (ironcore/evaluation/tasks.py) over the held-out
records of ``ironcore synthetic``: greedy accuracy (the mean reward of one greedy completion per prompt) and
pass@k (k seeded samples per prompt), with the reward the task names in its task.json (``exact`` for the
synthetic tasks). Writes JSON with the names the GRPO run logs (``val_accuracy``, ``val_pass_at_k``) and the
task's ``eval/synthetic/*`` metrics, and a Markdown table of the first prompts with their greedy completions.
"""

from __future__ import annotations

import argparse
import json

from ironcore.checkpoints import native
from ironcore.evaluation.tasks import evaluate_task, load_for_eval, load_task, trained_step
from ironcore.files import write_text_atomically

SHOWN = 12  # prompts shown in the Markdown table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run or checkpoint folder")
    parser.add_argument("--task", required=True, help="folder of `ironcore synthetic` (heldout.jsonl, task.json)")
    parser.add_argument("--output", required=True, help="JSON file")
    parser.add_argument("--markdown", required=True, help="Markdown file")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt for pass@k (0: greedy only)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    task = load_task(f"synthetic={args.task}")
    task.samples, task.pass_at = args.k, [args.k] if args.k else []
    task.max_new_tokens, task.temperature, task.seed, task.batch_size = (args.max_new_tokens, args.temperature,
                                                                         args.seed, args.batch_size)  # fmt: skip
    folder = native.resolve(args.checkpoint)
    model, tokenizer = load_for_eval(folder, args.device)
    details: list[dict] = []
    metrics = evaluate_task(model, tokenizer, task, details=details)
    result = {"checkpoint": str(folder), "step": trained_step(folder), "prompts": metrics["items"],
              "val_accuracy": metrics["accuracy"]}  # fmt: skip
    if args.k:
        result[f"val_pass_at_{args.k}"] = metrics[f"pass_at_{args.k}"]
    result |= {f"eval/{task.name}/{key}": value for key, value in metrics.items() if key not in ("items", "seconds")}
    write_text_atomically(args.output, json.dumps(result, indent=2) + "\n")
    table = [f"# Held-out prompts of {folder}", "",
             ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("val_")), "",
             "| prompt | greedy completion | reward |", "|---|---|---|"]
    for item in details[:SHOWN]:
        table.append(f"| `{_cell(item['prompt'])}` | `{_cell(item['completion'])}` | {item['score']:.0f} |")
    write_text_atomically(args.markdown, "\n".join(table) + "\n")
    print(json.dumps(result))
    return 0


def _cell(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


if __name__ == "__main__":
    raise SystemExit(main())

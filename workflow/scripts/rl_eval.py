"""Held-out accuracy of a checkpoint on a verifiable task, for the `rl` target's before/after table.

Greedy accuracy (the mean reward of one greedy completion per prompt) and
pass@k (a prompt passes when one of k seeded samples scores at least 1), with
the reward the task names in its task.json (``exact`` for the synthetic
tasks), through IronCore's generation engine and reward functions: the same
numbers the GRPO run logs as ``val_accuracy`` and ``val_pass_at_k``. Writes
JSON (with the ``val_*`` names the MLflow hook logs) and a Markdown table of
the first prompts with their greedy completions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ironcore.checkpoints import native
from ironcore.checkpoints.load import load_model
from ironcore.data.tokenizer import Tokenizer
from ironcore.files import write_text_atomically
from ironcore.inference import generate
from ironcore.inference.settings import completion_texts, stop_ids
from ironcore.rewards import RewardSet, RewardSpec, load_reward

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

    task = Path(args.task)
    rows = [json.loads(line) for line in (task / "heldout.jsonl").read_text().splitlines() if line.strip()]
    reward_name = json.loads((task / "task.json").read_text())["reward"]
    rewards = RewardSet([load_reward(RewardSpec(reward_name), "task.json reward")])
    folder = native.resolve(args.checkpoint)
    model, tokenizer = load_model(folder, args.device), Tokenizer.from_path(folder)
    stops = stop_ids(tokenizer)
    prompts = [row["prompt"] for row in rows]
    fields = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    ids = tokenizer.encode_batch(prompts)

    def complete(copies: int, temperature: float, seed: int) -> list[str]:
        texts = []
        for start in range(0, len(ids), args.batch_size):
            batch = [p for p in ids[start : start + args.batch_size] for _ in range(copies)]
            out = generate(model, batch, args.max_new_tokens, temperature=temperature, eos_token_id=stops,
                           seed=seed + start)
            texts += completion_texts(tokenizer, out, stops)
        return texts

    with torch.inference_mode():
        greedy = complete(1, 0.0, args.seed)
        scores = rewards.score(prompts, greedy, fields).total
        result = {"checkpoint": str(folder), "step": _step(folder), "prompts": len(rows),
                  "val_accuracy": float(torch.nanmean(scores))}
        if args.k:
            sampled = complete(args.k, args.temperature, args.seed)
            repeated = {key: [v for v in values for _ in range(args.k)] for key, values in fields.items()}
            total = rewards.score([p for p in prompts for _ in range(args.k)], sampled, repeated).total
            result[f"val_pass_at_{args.k}"] = float((total.view(-1, args.k) >= 1.0).any(dim=1).float().mean())
    write_text_atomically(args.output, json.dumps(result, indent=2) + "\n")
    table = [f"# Held-out prompts of {folder}", "",
             ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("val_")), "",
             "| prompt | greedy completion | reward |", "|---|---|---|"]
    for prompt, text, score in list(zip(prompts, greedy, scores.tolist(), strict=True))[:SHOWN]:
        table.append(f"| `{_cell(prompt)}` | `{_cell(text)}` | {score:.0f} |")
    write_text_atomically(args.markdown, "\n".join(table) + "\n")
    print(json.dumps(result))
    return 0


def _cell(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def _step(folder: Path) -> int | None:
    state = folder / native.TRAINER_STATE
    return json.loads(state.read_text()).get("step") if state.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())

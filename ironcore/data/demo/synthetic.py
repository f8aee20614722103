"""Synthetic tasks with a verifiable answer, generated from a seed.

Reinforcement learning from a checked reward needs a task whose answers a
program can verify and that a CPU-sized model learns in minutes, so that
learning from reward is visible on a laptop. A task here is a generator of
``(prompt, answer)`` pairs and the name of the reward function (a built-in of
:mod:`ironcore.rewards`) that scores a completion against the answer.

``ironcore synthetic TASK --output DIR`` writes ``DIR/train.jsonl`` and
``DIR/heldout.jsonl`` (records ``{"prompt", "answer"}``; no held-out prompt
occurs in the training set) and ``DIR/task.json`` (task, options, seed,
counts, reward). The same seed gives the same files. The records serve SFT
(``fields: {prompt: prompt, response: answer}``), RL (``task_type: rl``,
``reward_fields: [answer]``) and evaluation alike.

Adding a task is one generator function and one entry in :data:`TASKS`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironcore.config.base import did_you_mean
from ironcore.errors import ConfigError
from ironcore.files import write_text_atomically


@dataclass(frozen=True)
class SyntheticTask:
    """One task: its generator, the defaults of its options, and the reward that checks it."""

    generate: Callable[..., tuple[str, str]]  # (rng, **options) -> (prompt, answer)
    defaults: dict[str, int]
    reward: str  # a built-in reward function of ironcore.rewards
    description: str


def addition(rng: random.Random, digits: int) -> tuple[str, str]:
    """``"417+86="`` -> ``"503"``: each operand has 1 to ``digits`` digits (the count drawn uniformly first,
    so short and long operands are equally common)."""

    def operand() -> int:
        n = rng.randint(1, digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    a, b = operand(), operand()
    return f"{a}+{b}=", str(a + b)


TASKS: dict[str, SyntheticTask] = {
    "addition": SyntheticTask(addition, {"digits": 3}, "exact", "add two numbers of up to `digits` digits"),
}


def task_options(task: str, overrides: dict[str, str]) -> dict[str, int]:
    """The task's options: its defaults with ``overrides`` (KEY=VALUE strings parsed) applied and checked."""
    if task not in TASKS:
        raise ConfigError(f"'{task}' is not a synthetic task ({', '.join(TASKS)}){did_you_mean(task, TASKS)}")
    options = dict(TASKS[task].defaults)
    for key, value in overrides.items():
        if key not in options:
            raise ConfigError(f"{key}={value}: {task} takes {', '.join(options)}{did_you_mean(key, options)}")
        try:
            options[key] = int(value)
        except ValueError:
            raise ConfigError(f"{key}={value}: must be an integer") from None
        if options[key] < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    return options


def generate(task: str, num_train: int, num_heldout: int, seed: int, options: dict[str, int]) -> dict[str, list]:
    """Distinct held-out records first, then training records that avoid every held-out prompt.

    Training records may repeat each other (as real data does); a task too small for the requested number of
    distinct held-out prompts is an error rather than a silent shortfall.
    """
    rng, spec = random.Random(seed), TASKS[task]
    heldout: dict[str, str] = {}
    attempts = 0
    while len(heldout) < num_heldout:
        prompt, answer = spec.generate(rng, **options)
        heldout.setdefault(prompt, answer)
        attempts += 1
        if attempts > 100 * num_heldout + 1000:
            raise ConfigError(f"--heldout {num_heldout}: {task} with {options} has fewer distinct prompts")
    train = []
    while len(train) < num_train:
        prompt, answer = spec.generate(rng, **options)
        if prompt not in heldout:
            train.append({"prompt": prompt, "answer": answer})
    return {"train": train, "heldout": [{"prompt": p, "answer": a} for p, a in heldout.items()]}


def write_task(output: str | Path, task: str, num_train: int, num_heldout: int, seed: int,
               overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Generate the task's records into ``output`` (each file written atomically); returns the manifest."""
    options = task_options(task, overrides or {})
    records = generate(task, num_train, num_heldout, seed, options)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for split, rows in records.items():
        write_text_atomically(output / f"{split}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    manifest = {"task": task, "options": options, "seed": seed, "reward": TASKS[task].reward,
                "records": {split: len(rows) for split, rows in records.items()}}
    write_text_atomically(output / "task.json", json.dumps(manifest, indent=2) + "\n")
    return manifest

"""``ironcore synthetic``: write a synthetic task with verifiable answers (train and held-out prompts)."""

from __future__ import annotations

import argparse

from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from ironcore.data.demo.synthetic import TASKS

    tasks = "; ".join(f"{name}: {task.description} ({', '.join(f'{k}={v}' for k, v in task.defaults.items())}, "
                      f"reward {task.reward})" for name, task in TASKS.items())
    parser = subparsers.add_parser(
        "synthetic",
        help="generate a task with verifiable answers (for SFT, RL and evaluation) from a seed",
        description="Write OUTPUT/train.jsonl and OUTPUT/heldout.jsonl (records {prompt, answer}; no held-out "
        f"prompt is in the training set) and OUTPUT/task.json. Tasks: {tasks}.",
    )
    parser.add_argument("--task", required=True, help=" | ".join(TASKS))
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=5000, help="training records")
    parser.add_argument("--heldout", type=int, default=500, help="distinct held-out records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("options", nargs="*", metavar="KEY=VALUE", help="the task's options, e.g. digits=2")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.data.demo.synthetic import write_task
    from ironcore.files import check_writable

    for flag in ("train", "heldout"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    overrides = {}
    for option in args.options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ConfigError(f"{option}: expected KEY=VALUE")
        overrides[key] = value
    check_writable(args.output, "folder")
    manifest = write_task(args.output, args.task, args.train, args.heldout, args.seed, overrides)
    print(f"{args.output}: {args.task} {manifest['options']}, seed {args.seed}: "
          + ", ".join(f"{split} {n:,} records" for split, n in manifest["records"].items())
          + f"; reward '{manifest['reward']}'")
    return 0

"""``ironcore eval``: validation loss and perplexity of a checkpoint, or what it can do on tasks.

    ironcore eval --checkpoint runs/x                                  # validation loss and perplexity
    ironcore eval --checkpoint runs/x --task gsm8k=test.jsonl --task my_task.yaml
    ironcore eval --checkpoint runs/x --lm-eval hellaswag,arc_easy [--include-path DIR]   # ironcore[eval]

Task results go to ``eval.json`` in the checkpoint folder (or ``--output``), as ``eval/<task>/<metric>``,
and to the MLflow run that trained the checkpoint when the run recorded one (``--no-mlflow``: not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: validation loss, or accuracy on tasks")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (uses its latest)")
    parser.add_argument("--data-config", help="data config whose validation split to use (default: the training one)")
    parser.add_argument("--task", action="append", default=[], metavar="SPEC",
                        help="a task YAML file, or a built-in as NAME=DATA (gsm8k=FILE.jsonl, synthetic=FOLDER); "
                             "repeatable")  # fmt: skip
    parser.add_argument("--lm-eval", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated "
                                                            "(pip install 'ironcore[eval]')")  # fmt: skip
    parser.add_argument("--include-path", help="lm-eval: a folder of task YAML files of your own")
    parser.add_argument("--limit", type=int, default=None, help="tasks: evaluate the first N items of each")
    parser.add_argument("--output", help="write the results as JSON to this file (tasks: default "
                                         "CHECKPOINT/eval.json)")  # fmt: skip
    parser.add_argument("--no-mlflow", action="store_true", help="tasks: do not log to the training run")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="evaluate although the checkpoint's tokenizer is not the one that tokenized the data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.files import check_writable, write_text_atomically

    if args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    for key in ("max_batches", "limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.task or args.lm_eval:
        result, output = _tasks(args)
    else:
        from ironcore.evaluation.validation import evaluate_checkpoint

        output = args.output
        if output:  # before the evaluation, not after it: a bad path must not cost the result
            check_writable(output, "file")
        result = evaluate_checkpoint(args.checkpoint, args.data_config, args.micro_batch_size, args.max_batches,
                                     args.device, args.allow_other_tokenizer)  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output, text + "\n")
    return 0


def _tasks(args: argparse.Namespace) -> tuple[dict, str]:
    """Every task's metrics on the checkpoint (configs and data checked before the model is loaded)."""
    from ironcore.checkpoints.load import locate
    from ironcore.evaluation.tasks import check_task, evaluate_task, load_for_eval, load_task, trained_step
    from ironcore.files import check_writable

    tasks = [load_task(spec) for spec in args.task]
    names = [task.name for task in tasks]
    for task in tasks:
        if names.count(task.name) > 1:
            raise ConfigError(f"two tasks are named '{task.name}': give one a 'name' of its own")
        task.limit = args.limit or task.limit
        check_task(task)
    lm_tasks = [t for t in (args.lm_eval or "").split(",") if t]
    for name in lm_tasks:  # one eval.json entry and one set of eval/<task>/<metric> names per task
        if name in names:
            raise ConfigError(f"--lm-eval {name} and --task {args.task[names.index(name)]} both name a task "
                              f"'{name}': give the task YAML a 'name' of its own")  # fmt: skip
    if lm_tasks:
        try:
            from ironcore.evaluation.harness import IronCoreLM, run_lm_eval
        except ImportError as err:
            raise ConfigError(f"--lm-eval needs lm-evaluation-harness ({err}): pip install 'ironcore[eval]'") from None
    kind, folder = locate(args.checkpoint)
    output = args.output or str(folder / "eval.json")
    check_writable(output, "file")
    model, tokenizer = load_for_eval(args.checkpoint, args.device)
    results = {}
    for task in tasks:
        results[task.name] = evaluate_task(model, tokenizer, task, lambda line, n=task.name: _say(f"{n}: {line}"))
        _say(f"{task.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[task.name].items()))
    if lm_tasks:
        lm = IronCoreLM(loaded=(model, tokenizer), device=args.device, batch_size=args.micro_batch_size)
        for name, values in run_lm_eval(lm, lm_tasks, args.include_path, args.limit).items():
            if name in results:  # a subtask or group lm-eval expanded a task into, named like one of ours
                _say(f"lm-eval's task '{name}' is named like a --task: its results are 'lm_eval:{name}'")
                name = f"lm_eval:{name}"
            results[name] = values
    step = trained_step(folder) if kind == "ironcore" else None
    metrics = {f"eval/{task}/{metric}": value for task, values in results.items() for metric, value in values.items()
               if metric not in ("items", "seconds")}  # fmt: skip
    if not args.no_mlflow and kind == "ironcore" and folder.parent.name == "checkpoints":
        from ironcore.training.tracking import log_to_recorded_run

        _say(log_to_recorded_run(folder.parent.parent, metrics, step or 0))
    return {"checkpoint": str(folder), "step": step, "tasks": results, **metrics}, output


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

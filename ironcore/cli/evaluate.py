"""``ironcore eval``: a checkpoint's validation metrics, scored by its run's objective, or what it can do on tasks.

    ironcore eval --checkpoint runs/x                                  # val_loss, val_ppl; DPO, reward models: theirs
    ironcore eval --checkpoint runs/x --task gsm8k=test.jsonl --task my_task.yaml
    ironcore eval --checkpoint runs/x --lm-eval hellaswag,arc_easy [--include-path DIR]   # ironcore[eval]
    ironcore eval --checkpoint runs/x --task synthetic=DIR --pass-at 4 --as-validation --samples-markdown s.md
    ironcore eval --checkpoint runs/instruct --task gsm8k=test.jsonl --chat --log-samples   # an instruct model

Task results go to ``eval.json`` in the checkpoint folder (or ``--output``), as ``eval/<task>/<metric>``,
and to the MLflow run that trained the checkpoint when the run recorded one (``--no-mlflow``: not).
``--pass-at``, ``--max-new-tokens``, ``--temperature``, ``--seed`` and ``--micro-batch-size`` replace the
tasks' own settings. ``--as-validation`` also reports one generation task's accuracy and pass@k under the
names a GRPO run logs for its held-out prompts (``val_accuracy``, ``val_pass_at_<k>``, with ``prompts``), so
the two compare; ``--samples-markdown`` writes each task's first prompts with their greedy completions.
``--log-samples`` writes every item (prompt, completion, the answer the checker read, reference, score) as
``samples_<task>.jsonl`` and ``.html`` beside the results, the HTML also to the training run in MLflow.
``--chat`` asks each task's items as user turns of the tokenizer's chat template (``--system``: a system turn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ironcore.errors import ConfigError

if TYPE_CHECKING:
    from ironcore.evaluation.task_config import TaskConfig

DEFAULT_BATCH = 8  # validation samples or lm-eval requests per batch
SHOWN = 12  # prompts of each task in --samples-markdown
TASK_OPTIONS = ("pass_at", "max_new_tokens", "temperature", "seed", "as_validation", "samples_markdown",
                "log_samples", "chat", "system")  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint: validation metrics (its objective's), or "
                                                "accuracy on tasks")  # fmt: skip
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
    parser.add_argument("--pass-at", type=int, metavar="K",
                        help="tasks: pass@K from K seeded samples per prompt (0: greedy accuracy only), instead of "
                             "the tasks' samples and pass_at")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="tasks: the generation budget per prompt")
    parser.add_argument("--temperature", type=float, metavar="T", help="tasks: the temperature of the samples")
    parser.add_argument("--seed", type=int, metavar="S", help="tasks: the seed of the samples")
    parser.add_argument("--as-validation", action="store_true",
                        help="one generation task: also report its accuracy, pass@k and prompt count as "
                             "val_accuracy, val_pass_at_<k> and prompts, the names of a GRPO run's held-out "
                             "evaluation")  # fmt: skip
    parser.add_argument("--samples-markdown", metavar="FILE",
                        help=f"tasks: write the first {SHOWN} prompts of each with the greedy completion and its "
                             "score (multiple choice: the chosen and the gold choice) as Markdown tables")  # fmt: skip
    parser.add_argument("--log-samples", action="store_true",
                        help="tasks: write every item (prompt, greedy completion, extracted answer, reference, "
                             "score; multiple choice: log-likelihoods, chosen, gold) to samples_<task>.jsonl and "
                             ".html beside the results (--lm-eval: lm-eval's own log), the files also to the "
                             "training run in MLflow")  # fmt: skip
    parser.add_argument("--chat", action="store_true",
                        help="tasks: each item is a user turn rendered with the tokenizer's chat template, answered "
                             "until its end-of-turn token (built-ins take their chat prompt; --lm-eval: lm-eval's "
                             "--apply_chat_template)")  # fmt: skip
    parser.add_argument("--system", metavar="TEXT", help="tasks with --chat: a system message before each item")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help=f"batch size: validation samples (preference data: pairs), or --lm-eval requests "
                             f"(default {DEFAULT_BATCH}), or --task prompts (default: the task's batch_size)")  # fmt: skip
    parser.add_argument("--max-batches", type=int, default=None, help="validation: score at most this many batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="evaluate although the checkpoint's tokenizer is not the one that tokenized the data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.files import check_writable, write_text_atomically

    for key in ("micro_batch_size", "max_batches", "limit", "max_new_tokens"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.pass_at is not None and args.pass_at < 0:
        raise ConfigError(f"--pass-at must be >= 0, got {args.pass_at}")
    if args.task or args.lm_eval:
        result, output = _tasks(args)
    else:
        from ironcore.evaluation.validation import evaluate_checkpoint

        given = [key for key in TASK_OPTIONS if getattr(args, key) not in (None, False)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is an option of --task evaluations")
        output = args.output
        if output:  # before the evaluation, not after it: a bad path must not cost the result
            check_writable(output, "file")
        result = evaluate_checkpoint(args.checkpoint, args.data_config, args.micro_batch_size or DEFAULT_BATCH,
                                     args.max_batches, args.device, args.allow_other_tokenizer)  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output, text + "\n")
    return 0


def _tasks(args: argparse.Namespace) -> tuple[dict, str]:
    """Every task's metrics on the checkpoint (configs and data checked before the model is loaded)."""
    from ironcore.checkpoints.load import locate
    from ironcore.evaluation.samples import write_samples
    from ironcore.evaluation.tasks import check_chat_template, evaluate_task, load_for_eval, trained_step
    from ironcore.files import check_writable
    from ironcore.inference.settings import GenerationConfig

    tasks = _load_tasks(args)
    names = [task.name for task in tasks]
    lm_tasks = [t for t in (args.lm_eval or "").split(",") if t]
    for name in lm_tasks:  # one eval.json entry and one set of eval/<task>/<metric> names per task
        if name in names:
            raise ConfigError(f"--lm-eval {name} and --task {args.task[names.index(name)]} both name a task "
                              f"'{name}': give the task YAML a 'name' of its own")  # fmt: skip
    if args.system is not None and not args.chat:
        raise ConfigError("--system is the system turn of a chat evaluation: give --chat too")
    if args.as_validation and (len(tasks) != 1 or tasks[0].type != "generate" or lm_tasks):
        raise ConfigError("--as-validation reports one generation task: give one --task (and no --lm-eval)")
    if lm_tasks:
        try:
            from ironcore.evaluation.harness import IronCoreLM, run_lm_eval
        except ImportError as err:
            raise ConfigError(f"--lm-eval needs lm-evaluation-harness ({err}): pip install 'ironcore[eval]'") from None
    kind, folder = locate(args.checkpoint)
    output = args.output or str(folder / "eval.json")
    written = Path(output).parent  # --log-samples: samples_<task>.jsonl and .html beside the results
    for path in (output, args.samples_markdown, written if args.log_samples else None):
        if path:
            check_writable(path, "folder" if path == written else "file")
    eos = GenerationConfig.read(folder).eos_token_ids  # a chat model's end of turn may be one of these only
    model, tokenizer = load_for_eval(args.checkpoint, args.device)
    for task in tasks:  # all of them before the first runs
        check_chat_template(task, tokenizer)
    if args.chat and lm_tasks and not tokenizer.chat_template:
        raise ConfigError(f"--chat: the tokenizer of {folder} has no chat template for the --lm-eval tasks")
    results, details = {}, {task.name: [] for task in tasks}
    for task in tasks:
        results[task.name] = evaluate_task(model, tokenizer, task, lambda line, n=task.name: _say(f"{n}: {line}"),
                                           details[task.name], eos)  # fmt: skip
        _say(f"{task.name}: " + _summary(results[task.name]))
    logged: dict[str, list[dict]] = {}
    if lm_tasks:
        lm = IronCoreLM(loaded=(model, tokenizer), device=args.device, batch_size=args.micro_batch_size or DEFAULT_BATCH)
        for name, values in run_lm_eval(lm, lm_tasks, args.include_path, args.limit,
                                        logged if args.log_samples else None, args.chat, args.system).items():
            if name in results:  # a subtask or group lm-eval expanded a task into, named like one of ours
                _say(f"lm-eval's task '{name}' is named like a --task: its results are 'lm_eval:{name}'")
                if name in logged:
                    logged[f"lm_eval:{name}"] = logged.pop(name)
                name = f"lm_eval:{name}"
            results[name] = values
    step = trained_step(folder) if kind == "ironcore" else None
    metrics = {f"eval/{task}/{metric}": value for task, values in results.items() for metric, value in values.items()
               if metric not in ("items", "seconds")}  # fmt: skip
    files = []
    if args.log_samples:
        for name, rows in [*details.items(), *logged.items()]:  # lm-eval's own rows: JSONL only, as lm-eval's
            files += write_samples(written, name, rows, _summary(results.get(name, {})), table=name in details)
        _say(f"samples of {len(details) + len(logged)} tasks written to {written}")
    if not args.no_mlflow and kind == "ironcore" and folder.parent.name == "checkpoints":
        from ironcore.training.tracking import log_to_recorded_run

        _say(log_to_recorded_run(folder.parent.parent, metrics, step or 0, files))
    if args.samples_markdown:
        _write_samples(Path(args.samples_markdown), folder, results, details)
    validation = _validation_names(results[names[0]]) if args.as_validation else {}
    return {"checkpoint": str(folder), "step": step, **validation, "tasks": results, **metrics}, output


def _load_tasks(args: argparse.Namespace) -> list[TaskConfig]:
    """The ``--task`` configs with the command line's settings over their own, checked with their data."""
    from ironcore.evaluation.task_config import load_task
    from ironcore.evaluation.tasks import check_task

    tasks = [load_task(spec, args.chat) for spec in args.task]
    names = [task.name for task in tasks]
    for task in tasks:
        if names.count(task.name) > 1:
            raise ConfigError(f"two tasks are named '{task.name}': give one a 'name' of its own")
        task.system = args.system if args.system is not None else task.system
        task.limit = args.limit or task.limit
        if args.pass_at is not None:
            task.samples, task.pass_at = args.pass_at, [args.pass_at] if args.pass_at else []
        given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
                 "batch_size": args.micro_batch_size}  # fmt: skip
        for key, value in given.items():
            if value is not None:
                setattr(task, key, value)
        try:
            task.validate()
        except ConfigError as err:
            raise ConfigError(f"task {task.name} with the options given: {err}") from None
        check_task(task)
    return tasks


def _summary(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _validation_names(metrics: dict) -> dict:
    """A generation task's accuracy and pass@k under the names a GRPO run logs for its held-out prompts."""
    names = {"prompts": metrics["items"], "val_accuracy": metrics["accuracy"]}
    return names | {f"val_{key}": value for key, value in metrics.items() if key.startswith("pass_at_")}


def _write_samples(path: Path, folder: Path, results: dict, details: dict) -> None:
    """Each task's first prompts as a Markdown table: the greedy completion and its score, or the chosen and
    the gold choice of multiple choice."""
    from ironcore.files import write_text_atomically

    lines = [f"# The first prompts of each task, {folder}", ""]
    for name, items in details.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in results[name].items() if k not in ("items", "seconds"))
        choice = bool(items) and "chosen" in items[0]
        lines += [f"## {name}", "", shown, "",
                  "| prompt | chosen | gold |" if choice else "| prompt | greedy completion | score |", "|---|---|---|"]
        for item in items[:SHOWN]:
            if choice:
                lines.append(f"| `{_cell(item['prompt'])}` | {item['chosen']} | {item['gold']} |")
            else:
                score = "-" if item["score"] is None else f"{item['score']:g}"
                lines.append(f"| `{_cell(item['prompt'])}` | `{_cell(item['completion'])}` | {score} |")
        lines.append("")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "\n".join(lines))


def _cell(text: str) -> str:
    """``text`` in a Markdown table cell's code span: newlines shown as \\n, no | or ` to break it."""
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

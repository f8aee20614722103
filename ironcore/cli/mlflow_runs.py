"""``ironcore mlflow``: the MLflow parent runs of a pipeline, one per experiment and ``snakemake`` invocation.

    ironcore mlflow init                                # onstart: the store and the experiment, before jobs race
    ironcore train ... --mlflow-parent EXP              # the training run: a child of EXP's parent run
    ironcore mlflow finish --run EXP --eval eval.json [tasks.json] --config config.yaml [--artifacts DIR FILE ...]
    ironcore mlflow attach [--runs EXP ...] --artifacts DIR FILE ...
    ironcore mlflow sweep --sweep NAME --artifacts DIR FILE ...   # a sweep's summary to its run, closed
    ironcore mlflow close --status FAILED               # onerror: the parent runs this invocation left open

* ``parent --run EXP``: print the id of EXP's parent run in this invocation, creating it (for
  ``MLFLOW_PARENT_RUN_ID``; ``ironcore train --mlflow-parent EXP`` does this itself).
* ``finish --run EXP``: log the resolved training config as params, the eval JSONs' ``val_*`` numbers as
  ``val/*`` (val/loss, val/ppl; val/accuracy, val/pass_at_4), the task results ``eval/<task>/<metric>`` as they
  are, and artifacts (eval JSON, samples, configs, metrics, data report) to the parent; close it.
* ``attach [--runs EXP ...]``: add artifacts (the summaries) to the parent runs of this invocation (all, or
  those of the named experiments).
* ``sweep --sweep NAME``: add artifacts (the sweep's summary) to the sweep's run and close it.

A sweep's points (``--sweep NAME`` to ``parent`` and ``finish``, ``ironcore train --mlflow-sweep NAME``) have their
parent runs made children of one run per sweep (``sweep_NAME``, tagged ``pipeline_sweep_run``), which lasts across
invocations: a point added later joins it, and MLflow's compare view and parallel-coordinates chart of its children
show every point with its params (the resolved config, the swept keys among them) and ``val/loss``. It is created
under a file lock, as two points' jobs may start at once. A point's run that an invocation left unfinished (a job
failed) is taken over by the next invocation, so each point has one child unless it is redone after it finished.

The settings come from the environment the workflow sets (workflow/rules/common.smk): ``IRONCORE_TRACKING``
(``false``: every command does nothing), ``IRONCORE_MLFLOW_EXPERIMENT`` and ``IRONCORE_PIPELINE_INVOCATION``;
the options override them. Environment, not command-line values of the rules: they change no result, so
changing them must rerun no job.

Parent runs are found by their tags (``pipeline_invocation``, ``pipeline_experiment``), so jobs need no shared
state but the invocation id; they carry MLflow's source tags (``mlflow.source.name``, ``.type``,
``.git.commit``) as training runs do. Like ``ironcore.training.tracking``, a tracking failure is never fatal:
it prints one warning and exits 0 (``parent`` then prints nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ironcore.training.tracking import experiment_id

INVOCATION_TAG = "pipeline_invocation"
EXPERIMENT_TAG = "pipeline_experiment"
SWEEP_TAG = "pipeline_sweep"  # a sweep's point: the sweep's name
SWEEP_RUN_TAG = "pipeline_sweep_run"  # the sweep's own run: its name
PARAMS_PER_CALL = 100
SOURCE = "snakemake (workflow/Snakefile)"  # the parent runs' mlflow.source.name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mlflow", help="the MLflow parent runs of a pipeline invocation (one per "
                                                  "experiment): create, log eval results, attach, close")  # fmt: skip
    parser.add_argument("--experiment", default=os.environ.get("IRONCORE_MLFLOW_EXPERIMENT", "ironcore-pipeline"),
                        help="MLflow experiment name (default: $IRONCORE_MLFLOW_EXPERIMENT, else ironcore-pipeline)")
    parser.add_argument("--invocation", default=os.environ.get("IRONCORE_PIPELINE_INVOCATION", ""),
                        help="id of the snakemake invocation (default: $IRONCORE_PIPELINE_INVOCATION)")
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    commands.add_parser("init", help="create the tracking store and the experiment")
    parent = commands.add_parser("parent", help="print the id of an experiment's parent run, creating it")
    finish = commands.add_parser("finish", help="log eval results, config and artifacts to a parent run; close it")
    for command in (parent, finish):
        command.add_argument("--run", required=True, help="pipeline experiment")
        command.add_argument("--sweep", help="the sweep the experiment is a point of (its parent run is a child of "
                                             "the sweep's run)")  # fmt: skip
    finish.add_argument("--eval", nargs="+", required=True,
                        help="eval JSON files: step, val_* numbers, eval/<task>/<metric> numbers")
    finish.add_argument("--config", required=True, help="resolved training config.yaml")
    attach = commands.add_parser("attach", help="add artifacts to the parent runs of this invocation")
    attach.add_argument("--runs", nargs="+", help="only the parent runs of these experiments (default: all)")
    sweep = commands.add_parser("sweep", help="add artifacts to a sweep's run and close it")
    sweep.add_argument("--sweep", required=True, help="the sweep's name")
    for command in (finish, attach, sweep):
        command.add_argument("--artifacts", nargs="+", action="append", default=[], metavar=("FOLDER", "PATH"),
                             help="artifact folder followed by the files to log into it (repeatable)")
    commands.add_parser("close", help="close the parent runs still open").add_argument("--status", default="FAILED")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.environ.get("IRONCORE_TRACKING") == "false":
        return 0
    if not args.invocation:
        print("ironcore mlflow: no invocation id (IRONCORE_PIPELINE_INVOCATION); nothing logged", file=sys.stderr)
        return 0
    _guarded(args.action, lambda client: ACTIONS[args.action](client, experiment_id(client, args.experiment), args))
    return 0


def parent_run_id(experiment: str, run: str, sweep: str | None = None) -> str | None:
    """The id of ``run``'s parent run in this invocation (``$IRONCORE_PIPELINE_INVOCATION``), created on first
    use (a child of ``sweep``'s run for a sweep's point); None, after one line on stderr, without an invocation id
    or when MLflow fails (never fatal)."""
    invocation = os.environ.get("IRONCORE_PIPELINE_INVOCATION", "")
    if not invocation:
        print("ironcore: --mlflow-parent: no invocation id (IRONCORE_PIPELINE_INVOCATION); no parent run",
              file=sys.stderr)  # fmt: skip
        return None
    found: list[str] = []
    _guarded("parent", lambda client: found.append(_parent_id(client, experiment_id(client, experiment),
                                                              invocation, run, sweep)))  # fmt: skip
    return found[0] if found else None


def _guarded(action: str, work: Callable[[Any], None]) -> None:
    """``work(client)`` on a client of the tracking store; a failure is one warning on stderr, not an error."""
    from ironcore.training.tracking import tracking_uri

    try:
        from mlflow.tracking import MlflowClient

        work(MlflowClient(tracking_uri()))
    except Exception as err:  # noqa: BLE001 - tracking must never fail the pipeline
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"ironcore mlflow {action}: MLflow tracking skipped ({type(err).__name__}: {first})", file=sys.stderr)


def _parents(client: Any, experiment_id: str, invocation: str, run: str | None = None) -> list:
    query = f"tags.{INVOCATION_TAG} = '{invocation}'"
    if run is not None:
        query += f" and tags.{EXPERIMENT_TAG} = '{run}'"
    return client.search_runs([experiment_id], filter_string=query)


def _parent_id(client: Any, experiment_id: str, invocation: str, run: str, sweep: str | None = None) -> str:
    """The parent run of ``run`` in this invocation, created on first use (a sweep's point: as a child of the
    sweep's run, or the point's run that an earlier invocation left unfinished, taken over)."""
    from ironcore.training.tracking import source_tags

    found = _parents(client, experiment_id, invocation, run)
    if found:
        return found[0].info.run_id
    if sweep:  # one child per point: a failed invocation's run is continued, not left beside a new one
        query = (f"tags.{SWEEP_TAG} = '{sweep}' and tags.{EXPERIMENT_TAG} = '{run}' "
                 "and attributes.status != 'FINISHED'")  # fmt: skip
        unfinished = client.search_runs([experiment_id], filter_string=query)
        if unfinished:
            run_id = unfinished[0].info.run_id
            client.set_tag(run_id, INVOCATION_TAG, invocation)
            client.update_run(run_id, status="RUNNING")
            return run_id
    tags = {INVOCATION_TAG: invocation, EXPERIMENT_TAG: run, "mlflow.note.content": f"pipeline run {invocation}",
            **source_tags(SOURCE)}  # fmt: skip
    if sweep:
        tags |= {SWEEP_TAG: sweep, "mlflow.parentRunId": _sweep_run_id(client, experiment_id, sweep)}
    return client.create_run(experiment_id, run_name=run, tags=tags).info.run_id


def _sweep_run_id(client: Any, experiment_id: str, sweep: str) -> str:
    """The run of ``sweep``, created on first use; one for all invocations, so points added later join it."""
    from ironcore.training.tracking import source_tags

    with _store_lock(client.tracking_uri):
        found = client.search_runs([experiment_id], filter_string=f"tags.{SWEEP_RUN_TAG} = '{sweep}'")
        if found:
            return found[0].info.run_id
        tags = {SWEEP_RUN_TAG: sweep, "mlflow.note.content": f"sweep {sweep}: its points are the child runs",
                **source_tags(SOURCE)}  # fmt: skip
        return client.create_run(experiment_id, run_name=f"sweep_{sweep}", tags=tags).info.run_id


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock of this machine (and of a shared file system) for the store at ``uri``: beside a sqlite
    database, else in the temporary folder."""
    import fcntl
    import hashlib
    import tempfile

    from ironcore.training.tracking import sqlite_path

    database = sqlite_path(uri)
    path = (database.parent / f".{database.name}.lock" if database is not None
            else Path(tempfile.gettempdir()) / f"ironcore-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log_artifacts(client: Any, run_id: str, groups: list[list[str]]) -> None:
    for folder, *paths in groups:
        for path in paths:
            if Path(path).is_file():
                client.log_artifact(run_id, path, artifact_path=folder)


def _init(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    from ironcore.training.tracking import tracking_uri

    print(f"MLflow: experiment {args.experiment} ({experiment_id}) at {tracking_uri()}")


def _parent(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    print(_parent_id(client, experiment_id, args.invocation, args.run, args.sweep))


def _finish(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    from mlflow.entities import Metric, Param

    from ironcore.files import read_yaml
    from ironcore.training.tracking import flatten

    run_id = _parent_id(client, experiment_id, args.invocation, args.run, args.sweep)
    settings = flatten(read_yaml(args.config, "resolved training config"))
    params = [Param(key, str(value)[:6000]) for key, value in settings.items()]
    for start in range(0, len(params), PARAMS_PER_CALL):
        client.log_batch(run_id, params=params[start : start + PARAMS_PER_CALL])
    metrics, now = [], int(time.time() * 1000)
    for path in args.eval:  # val_loss, val_accuracy, ... -> val/...; task results eval/<task>/<metric> as they are
        result = json.loads(Path(path).read_text())
        step = int(result.get("step") or 0)
        metrics += [Metric(f"val/{key[4:]}" if key.startswith("val_") else key, float(value), now, step)
                    for key, value in result.items() if key.startswith(("val_", "eval/"))
                    and isinstance(value, (int, float))]  # fmt: skip
    client.log_batch(run_id, metrics=metrics)
    _log_artifacts(client, run_id, args.artifacts)
    client.set_terminated(run_id, "FINISHED")
    shown = ", ".join(f"{m.key} {m.value:.4f}" for m in metrics[:2])
    print(f"MLflow: parent run {args.run} ({run_id}): {shown}, closed")


def _attach(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    runs = [run for run in _parents(client, experiment_id, args.invocation)
            if args.runs is None or run.data.tags.get(EXPERIMENT_TAG) in args.runs]  # fmt: skip
    for run in runs:
        _log_artifacts(client, run.info.run_id, args.artifacts)
    print(f"MLflow: artifacts attached to {len(runs)} parent run(s) of invocation {args.invocation}")


def _sweep(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    run_id = _sweep_run_id(client, experiment_id, args.sweep)
    _log_artifacts(client, run_id, args.artifacts)
    client.set_terminated(run_id, "FINISHED")
    print(f"MLflow: sweep run sweep_{args.sweep} ({run_id}): summary attached, closed")


def _close(client: Any, experiment_id: str, args: argparse.Namespace) -> None:
    for run in _parents(client, experiment_id, args.invocation):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, args.status)


ACTIONS = {"init": _init, "parent": _parent, "finish": _finish, "attach": _attach, "sweep": _sweep, "close": _close}

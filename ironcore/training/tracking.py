"""MLflow tracking that can never take training down.

Only rank 0 tracks. The tracking URI comes from ``MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working directory. Metrics are buffered and
sent with one ``log_batch`` call per log interval. Any tracking failure (a
server that is down, a locked database) prints one warning and turns tracking
off for the rest of the run; training goes on. HTTP retries are kept short
(unless the user set them) so a dead server costs seconds, not minutes.

A run is tagged with the code that ran: MLflow's standard
``mlflow.source.git.commit`` (and branch) of the IronCore checkout the
package was imported from -- not of the working directory, which may be any
folder -- plus ``git_dirty`` and ``ironcore_version``; and with its source,
``mlflow.source.name`` (the command) and ``mlflow.source.type`` (``LOCAL``),
which the runs table shows as "Source" (:func:`source_tags`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ironcore import __version__
from ironcore.config import Config
from ironcore.config.base import to_dict
from ironcore.files import check_writable, write_text_atomically

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
_MAX_PARAMS_PER_CALL = 100
RUN_FILE = "mlflow_run.json"  # in a run's output folder: which MLflow run trained it (for later evaluations)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name`` of ``client``'s store, created when missing; a local (sqlite) store keeps
    the artifacts of an experiment it creates in ``mlruns/`` beside its database file, not in whatever folder
    the first run happened to start from (MLflow's default)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    store = sqlite_path(client.tracking_uri)
    artifacts = (store.resolve().parent / "mlruns").as_uri() if store is not None else None
    return client.create_experiment(name, artifact_location=artifacts)


def run_params(config: Config, options: Any) -> dict[str, Any]:
    """A run's MLflow params: its own config, with its objective's options in full (defaults included) as
    ``trainer.objective_options.*`` and nothing of other objectives (no deprecated ``dpo`` group)."""
    params = to_dict(config)
    params.pop("dpo", None)
    params["trainer"]["objective_options"] = to_dict(options) if options is not None else {}
    return params


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the ironcore package that is running


def code_version_tags(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """The IronCore version, and the commit, branch and dirty flag of the checkout holding the package.

    An installed (non-editable) package lives in no checkout and gets the
    version only.
    """
    tags = {"ironcore_version": __version__}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return tags
    tags["mlflow.source.git.commit"] = commit
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    status = git("status", "--porcelain", "--", ".")  # changes to the package's own files
    tags["git_dirty"] = str(bool(status)).lower()
    return tags


def source_tags(name: str, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """MLflow's source tags of a run started by the command ``name`` (what the runs table shows as "Source",
    with the commit beside it) and the code version (:func:`code_version_tags`)."""
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", **code_version_tags(package_dir)}


def run_tags(
    config: Config, metadata: Mapping[str, Any], objective: str, dp_size: int, world_size: int
) -> dict[str, str]:
    """The tags of a training run: its source and code version, what is trained on what, and the parallel
    layout."""
    return {
        **source_tags("ironcore train"),
        "task_type": str(metadata.get("task_type")),
        "objective": objective,
        "model_name": config.model.name,
        "tensor_parallel_size": str(config.trainer.tensor_model_parallel_size),
        "data_parallel_size": str(dp_size),
        "world_size": str(world_size),
    }


def tracked_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """MLflow names of logged metrics: ``loss`` -> ``train/loss``, ``val_loss`` -> ``val/loss``; names with a
    ``/`` (TRL's ``rewards/margins``) keep it, their validation values going under ``val/``."""
    tracked = {}
    for key, value in metrics.items():
        name = key.removeprefix("val_")
        if name == key:
            tracked[key if "/" in key else f"train/{key}"] = value
        else:
            tracked[f"val/{name}"] = value
    return tracked


class Tracker:
    """One MLflow run; every method is a no-op when disabled or after a failure."""

    def __init__(
        self,
        enabled: bool,
        experiment: str,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> None:
        self.client = None
        self.run_id: str | None = None
        self._pending: list[Any] = []
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self._guard("start the MLflow run", self._start, experiment, run_name, params, tags)

    def _start(self, experiment: str, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        store = sqlite_path(uri)
        if store is not None:  # fail in one line here: MLflow itself retries for seconds, printing each try
            check_writable(store, "file")
        client = MlflowClient(uri)
        exp_id = experiment_id(client, experiment)
        all_tags = dict(tags)
        parent = os.environ.get("MLFLOW_PARENT_RUN_ID")
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.client, self.run_id = client, run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_CALL):
            client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_CALL])

    def _guard(self, what: str, fn, *args) -> None:
        mlflow_log = logging.getLogger("mlflow")
        level = mlflow_log.level
        mlflow_log.setLevel(logging.ERROR)  # its own retry warnings and tracebacks: ours is the one line
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never be fatal
            log.warning("MLflow tracking disabled: could not %s at %s: %s", what, tracking_uri(), _one_line(err))
            self.client = None
        finally:
            mlflow_log.setLevel(level)

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics; they are sent by the next :meth:`flush`."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        if self.active and self._pending:
            pending, self._pending = self._pending, []
            self._guard("log metrics", self.client.log_batch, self.run_id, pending)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload the file ``path`` into the run's artifacts (into ``folder`` when given)."""
        if self.active and Path(path).exists():
            self._guard(f"upload {path}", self.client.log_artifact, self.run_id, str(path), folder)

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self._guard("set a tag", self.client.set_tag, self.run_id, key, value)

    def record(self, path: str | Path) -> None:
        """Write where this run lives (tracking URI, run id) to ``path``, so that ``ironcore eval`` can log to it."""
        if self.active:
            write_text_atomically(path, json.dumps({"tracking_uri": tracking_uri(), "run_id": self.run_id}) + "\n")

    def finish(self, status: str = "FINISHED") -> None:
        """Flush and close the run as FINISHED, FAILED or KILLED."""
        self.flush()
        if self.active:
            self._guard("end the run", self.client.set_terminated, self.run_id, status)
            self.client = None


def log_to_recorded_run(run_dir: str | Path, metrics: Mapping[str, float], step: int,
                        artifacts: list[Path] | tuple[Path, ...] = ()) -> str:  # fmt: skip
    """Log ``metrics`` at ``step`` to the MLflow run that trained ``run_dir`` (its :data:`RUN_FILE`), and the
    files ``artifacts`` (an evaluation's sample tables) under ``eval/step_NNNNNNN/``, one folder per step so
    that evaluations of other checkpoints do not replace them.

    Returns one line saying what happened; never raises: an unreachable server must not cost an evaluation.
    """
    record = Path(run_dir) / RUN_FILE
    if not record.is_file():
        return f"MLflow: no run recorded in {run_dir} (trained without tracking): metrics not logged"
    folder = f"eval/step_{step:07d}"
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        found = json.loads(record.read_text())
        now = int(time.time() * 1000)
        client = MlflowClient(found["tracking_uri"])
        client.log_batch(found["run_id"], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        for path in artifacts:
            client.log_artifact(found["run_id"], str(path), folder)
    except Exception as err:  # noqa: BLE001 - tracking must never be fatal
        return f"MLflow: could not log to the run recorded in {record}: {_one_line(err)}"
    files = f", {len(artifacts)} files to {folder}/" if artifacts else ""
    return f"MLflow: {len(metrics)} metrics logged to run {found['run_id']} at step {step}{files}"


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]

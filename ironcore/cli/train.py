"""``ironcore train``: pretraining, SFT, DPO or an objective of your own, on one process or under torchrun.

    ironcore train --config C [KEY=VALUE ...]          # resumes from OUTPUT_DIR/checkpoints/latest
    torchrun ... -m ironcore train --config C --signature data/metadata.json --export results/train/x \\
        --mlflow-parent x --threads 8                  # what the pipeline's train rule runs

The options for a workflow manager (Snakemake), which must not lose a killed run nor resume a stale one:

* ``--signature FILE``: the run folder (``trainer.output_dir``) keeps a signature of the run's settings
  (the resolved config but ``utils``, which changes no result) and of the FILEs' contents. An unfinished run
  of the same signature resumes; a finished run (``final_eval.json`` written), or one of another signature,
  is cleared and trained from scratch.
* ``--export DIR``: when training has finished, copy ``final_eval.json``, ``metrics.jsonl`` and
  ``config.yaml`` into DIR, each atomically: the declared outputs of a job whose run folder is not one.
* ``--mlflow-parent NAME``: the MLflow run becomes a child of NAME's parent run (``ironcore mlflow``);
  ``--mlflow-sweep SWEEP``: NAME is a point of SWEEP, whose run is that parent's parent.
* ``--threads N``: the CPU threads of this node's training processes together.

Under torchrun, rank 0 prepares the run folder and the parent run while the other ranks wait for it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ironcore.cli.common import add_config_arguments, config_from_args, log_to_stderr
from ironcore.config import Config, to_dict
from ironcore.errors import ConfigError

SIGNATURE = "signature"  # the file in the run folder
FINISHED = "final_eval.json"  # written by the trainer when a run has finished
EXPORTED = (FINISHED, "metrics.jsonl", "config.yaml")
RUN_ENTRIES = {SIGNATURE, "config.yaml", "checkpoints", "metrics.jsonl"}  # what marks a folder as a run's
GROUP_TIMEOUT = datetime.timedelta(seconds=600)  # init_parallel's default, which the trainer uses


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (pretraining, SFT, DPO, or trainer.objective); resumes from checkpoints/latest",
        description="Train with the objective of trainer.objective, or the data set's default: lm (next-token "
        "cross-entropy) for pretrain and sft data, dpo for dpo data. Rerunning the same command resumes from "
        "OUTPUT_DIR/checkpoints/latest. Launch under torchrun for tensor and data parallelism.",
    )
    add_config_arguments(parser)
    parser.add_argument("--signature", action="append", default=[], metavar="FILE",
                        help="resume the run folder's unfinished run only if it has the same settings (the resolved "
                             "config but utils) and FILE contents; clear a finished run or one of another signature "
                             "and start over (repeatable)")  # fmt: skip
    parser.add_argument("--export", metavar="DIR",
                        help=f"when training has finished, copy {', '.join(EXPORTED)} into DIR (each atomically)")
    parser.add_argument("--mlflow-parent", metavar="NAME",
                        help="make the MLflow run a child of NAME's parent run in this pipeline invocation "
                             "($IRONCORE_PIPELINE_INVOCATION), creating it (see `ironcore mlflow`)")  # fmt: skip
    parser.add_argument("--mlflow-sweep", metavar="SWEEP",
                        help="with --mlflow-parent: NAME is a point of SWEEP, its parent run a child of the "
                             "sweep's run")  # fmt: skip
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of this node's training processes together: each gets N / its node's "
                             "processes, at least 1 (default: torchrun's, or torch's)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.files import check_writable
    from ironcore.parallel.setup import destroy_parallel
    from ironcore.training.trainer import Trainer

    cfg = config_from_args(args)
    log_to_stderr(logging.getLogger(), cfg.utils.log_level.upper(), "%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        _set_threads(args.threads)
    if args.export:
        check_writable(args.export, "folder")  # before training: a bad path must not cost the run
    try:
        if args.signature or args.mlflow_parent:
            _first_on_rank_zero(lambda: _prepare(cfg, args), cfg.trainer.device)
        Trainer(cfg).train()
    finally:
        destroy_parallel()
    if args.export and int(os.environ.get("RANK", "0")) == 0:
        export(Path(cfg.trainer.output_dir), Path(args.export))
    return 0


def _set_threads(total: int) -> None:
    """This process's share of the node's ``total`` CPU threads (torchrun would give each process one)."""
    import torch

    if total < 1:
        raise ConfigError(f"--threads must be >= 1, got {total}")
    share = max(total // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    os.environ["OMP_NUM_THREADS"] = str(share)  # for the processes this one starts
    torch.set_num_threads(share)


def _prepare(cfg: Config, args: argparse.Namespace) -> None:
    """Rank 0, before any rank reads the run folder: resume or start over, then the MLflow parent run."""
    if args.signature:
        start_or_resume(Path(cfg.trainer.output_dir), signature(cfg, args.signature))
    if args.mlflow_parent and cfg.utils.tracking:
        from ironcore.cli.mlflow_runs import parent_run_id

        parent = parent_run_id(cfg.utils.experiment_name, args.mlflow_parent, args.mlflow_sweep)
        if parent:
            os.environ["MLFLOW_PARENT_RUN_ID"] = parent  # the trainer's tracker reads it


def signature(cfg: Config, files: list[str]) -> str:
    """16 hex digits of the run's settings (the resolved config but ``utils``) and the files' contents: the
    digest of the settings' digest line followed by the files (what the pipeline's train rule computed with
    sha256sum before this option, so an unfinished run of an earlier version still resumes)."""
    settings = to_dict(cfg)
    settings.pop("utils")
    digest = hashlib.sha256(f"{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()}\n".encode())
    for path in files:
        digest.update(Path(path).read_bytes())  # a missing file: an OSError naming it, one line (cli.main)
    return digest.hexdigest()[:16]


def start_or_resume(folder: Path, expected: str) -> None:
    """Clear ``folder`` unless it holds an unfinished run of the ``expected`` signature, then record it there.

    A folder that holds no run (none of a run's files, but something else) is refused, not cleared."""
    if folder.is_dir():
        recorded = (folder / SIGNATURE).read_text().strip() if (folder / SIGNATURE).is_file() else None
        if recorded == expected and not (folder / FINISHED).exists():
            return
        entries = {entry.name for entry in folder.iterdir()}
        if entries and not entries & RUN_ENTRIES:
            raise ConfigError(f"--signature: {folder} (trainer.output_dir) holds files but no training run: "
                              "refusing to clear it; give the run a folder of its own")  # fmt: skip
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / SIGNATURE).write_text(expected + "\n")


def export(run_folder: Path, destination: Path) -> None:
    """Copy the finished run's declared outputs into ``destination``, each through a temporary and a rename."""
    from ironcore.files import read_text, write_text_atomically

    destination.mkdir(parents=True, exist_ok=True)
    names = [name for name in EXPORTED if (run_folder / name).is_file()]  # no validation data: no final_eval.json
    for name in names:
        write_text_atomically(destination / name, read_text(run_folder / name, "run output"))
    logging.getLogger(__name__).info("exported %s of %s to %s", ", ".join(names), run_folder, destination)


def _first_on_rank_zero(work: Callable[[], None], device: str) -> None:
    """Run ``work`` on global rank 0 while the other ranks of a torchrun launch wait for it (the run folder it
    may clear is what they read first); its error stops them all.

    The default process group made here is the one the trainer's ``init_parallel`` then builds on (same
    backend, same timeout); the wait itself is on a gloo group, which needs no device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        work()
        return
    import torch
    import torch.distributed as dist

    cuda = device in ("cuda", "auto") and torch.cuda.is_available()  # cuda without a GPU: init_parallel says so
    dist.init_process_group("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)
    group = dist.new_group(backend="gloo")
    error, failed = None, [False]
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - raised below, once the other ranks know
            error, failed[0] = err, True
    dist.broadcast_object_list(failed, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed[0]:
        raise SystemExit(2)  # rank 0 says why, in one line

"""Which ironcore files each pipeline stage runs, and their digest (an input of the stage's jobs).

Snakemake reruns a job when its rule's own code changes, but it cannot see the
``ironcore`` modules the job imports. Each stage therefore takes
``results/code/<stage>.sha256`` as an input: a digest of the package files the
stage runs, rewritten (new mtime -> rerun) only when that digest changes.

By construction a stage covers **every** ``ironcore/**/*.py`` except the
files it is stated not to run (``excludes``), so a new module or sub-package
reruns every stage until someone excludes it here. ``runs`` names the modules
a stage's command imports; ``tests/test_pipeline.py`` imports them in a fresh
interpreter and fails when one of the modules they pull in is excluded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Packages the data stages never import (they need no torch model).
_MODEL_SIDE = tuple(f"{package}/**/*.py" for package in (
    "training", "objectives", "rewards", "models", "layers", "kernels", "parallel", "checkpoints", "inference",
    "evaluation"))
_COMMANDS = ("corpus", "synthetic", "tokenizer", "preprocess", "train", "evaluate", "generate", "convert",
             "model_info", "reference", "common")
_TRAINING = ("__init__", "trainer", "checkpointing", "optim", "perf", "tracking")
_DATA = ("config", "tasks", "tokenizer", "corpus", "synthetic", "sources", "encode", "preprocess", "indexed",
         "metadata", "inspect", "pretrain", "sft", "dpo", "rl", "batches")
_SAMPLES = ("config", "tasks", "tokenizer", "sources", "encode", "indexed", "metadata", "pretrain", "sft", "dpo",
            "rl", "batches")  # what building training samples from shards needs


def _data_except(*used: str) -> tuple[str, ...]:
    """The data modules a stage does not run."""
    return tuple(f"data/{name}.py" for name in _DATA if name not in used)


def _training_except(*used: str) -> tuple[str, ...]:
    """The training modules a stage does not run."""
    return tuple(f"training/{name}.py" for name in _TRAINING if name not in used)


def _other_commands(*used: str) -> tuple[str, ...]:
    """The cli modules of the commands a stage does not run (registering a parser changes no result)."""
    return tuple(f"cli/{name}.py" for name in _COMMANDS if name not in used)


@dataclass(frozen=True)
class Stage:
    runs: tuple[str, ...]  # modules the stage's command imports
    excludes: tuple[str, ...]  # globs (relative to the package) of files it does not run


STAGES = {
    "corpus": Stage(
        runs=("ironcore.cli.corpus", "ironcore.data.corpus"),
        excludes=(*_MODEL_SIDE, *_data_except("corpus"), "config/*.py", *_other_commands("corpus")),
    ),
    "synthetic": Stage(
        runs=("ironcore.cli.synthetic", "ironcore.data.synthetic"),
        excludes=(*_MODEL_SIDE, *_data_except("synthetic"), *_other_commands("synthetic")),
    ),
    "tokenizer": Stage(
        runs=("ironcore.cli.tokenizer", "ironcore.data.config", "ironcore.data.sources", "ironcore.data.tokenizer"),
        excludes=(*_MODEL_SIDE, *_data_except("config", "tasks", "tokenizer", "sources", "encode", "metadata"),
                  *_other_commands("tokenizer")),
    ),
    "preprocess": Stage(
        runs=("ironcore.cli.preprocess", "ironcore.data.preprocess"),
        excludes=(*_MODEL_SIDE, *_data_except("config", "tasks", "tokenizer", "sources", "encode", "preprocess",
                                             "indexed", "metadata"), *_other_commands("preprocess", "common")),
    ),
    "inspect": Stage(
        runs=("ironcore.cli.preprocess", "ironcore.data.inspect"),
        excludes=(*_MODEL_SIDE, *_data_except("config", "tasks", "tokenizer", "sources", "encode", "inspect",
                                             "indexed", "metadata"), *_other_commands("preprocess", "common")),
    ),
    "train": Stage(
        runs=("ironcore.cli.train", "ironcore.training.trainer"),
        excludes=("evaluation/harness.py", "evaluation/validation.py",
                  *_data_except(*_SAMPLES), *_other_commands("train", "common")),  # operation.eval_tasks: tasks
    ),
    "eval": Stage(  # validation loss, samples and tasks (ironcore eval --task logs to the training run's MLflow)
        runs=("ironcore.cli.evaluate", "ironcore.cli.generate", "ironcore.evaluation.validation",
              "ironcore.evaluation.tasks", "ironcore.training.tracking", "ironcore.inference",
              "ironcore.checkpoints.load", "ironcore.data.tokenizer", "ironcore.rewards"),
        excludes=(*_training_except("__init__", "tracking"), *_data_except(*_SAMPLES), *_other_commands("evaluate", "generate")),
    ),
}


def stage_files(package: Path, stage: str) -> list[Path]:
    """Every ``*.py`` of the package except the stage's exclusions, sorted."""
    files = set(package.glob("**/*.py"))
    for pattern in STAGES[stage].excludes:
        files -= set(package.glob(pattern))
    return sorted(files)


def fingerprint_text(package: Path, stage: str) -> str:
    """A digest line, then one ``sha256  path`` line per file the stage runs."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(package)}" for p in stage_files(package, stage)]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return f"{digest}  ironcore {stage}\n" + "\n".join(lines) + "\n"

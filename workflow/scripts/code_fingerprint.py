"""Which ironcore files each pipeline stage runs, and their digest (an input of the stage's jobs).

Snakemake reruns a job when its rule's own code changes, but it cannot see the
``ironcore`` modules the job imports. Each stage therefore takes
``results/code/<stage>.sha256`` as an input: a digest of the package files the
stage runs, rewritten (new mtime -> rerun) only when that digest changes.

A stage is named by its entry points only: the ``ironcore`` command modules its
rules run (``ironcore.cli.train`` for ``ironcore train``) and the scripts of
``workflow/scripts/`` that import the package. The files it runs are derived
from the import graph (``import_graph.py``): the closure of the imports of its
entry points, so a module that a stage starts to import joins its digest by
itself, and an edit of a module no stage reaches reruns nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from import_graph import Package

# Stage -> its entry points: `ironcore` command modules, and scripts (paths) that import the package.
STAGES: dict[str, tuple[str | Path, ...]] = {
    "corpus": ("ironcore.cli.corpus",),
    "synthetic": ("ironcore.cli.synthetic",),
    "tokenizer": ("ironcore.cli.tokenizer",),
    "preprocess": ("ironcore.cli.preprocess",),
    "inspect": ("ironcore.cli.preprocess",),  # ironcore preprocess --only-inspect
    "train": ("ironcore.cli.train",),
    "eval": ("ironcore.cli.evaluate", "ironcore.cli.generate", "ironcore.cli.mlflow_runs"),  # generate: samples.py
}


def stage_files(package: Path, stage: str) -> list[Path]:
    """The files of ``package`` that the stage's entry points import, directly or not, sorted."""
    return Package(package).closure(STAGES[stage])


def fingerprint_text(package: Path, stage: str) -> str:
    """A digest line, then one ``sha256  path`` line per file the stage runs."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(package)}" for p in stage_files(package, stage)]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return f"{digest}  ironcore {stage}\n" + "\n".join(lines) + "\n"

"""Finding a checkpoint folder from a run folder, its ``checkpoints/`` folder or a ``latest`` pointer.

Kept apart from ``native`` (which it serves) and free of torch: a data config's ``tokenizer.path`` may be
a run folder, and the data stages' code digests should not take in the model side to resolve it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ironcore.errors import CheckpointError
from ironcore.files import describe_os_error

WEIGHTS = "model.safetensors"
SHARDS = "shards"  # a sharded checkpoint's weights (and optimizer state): torch.distributed.checkpoint's folder
MODEL_CONFIG = "model_config.yaml"
LATEST = "latest"

log = logging.getLogger(__name__)


def is_checkpoint_source(path: str | Path) -> bool:
    """Does ``path`` look like a checkpoint folder, a ``checkpoints/`` folder or a run folder? (Whether it is a
    complete one, :func:`resolve` says.)"""
    path = Path(path)
    if path.name == LATEST and path.is_file():  # the pointer file itself: checkpoints/latest
        return True
    return any((path / name).exists() for name in (LATEST, f"checkpoints/{LATEST}", WEIGHTS, SHARDS, MODEL_CONFIG))


def weights_path(folder: Path) -> Path:
    """Where a checkpoint folder keeps its weights: ``model.safetensors``, or ``shards/`` when it has no such
    file but a complete sharded checkpoint (DCP writes ``.metadata`` last)."""
    if not (folder / WEIGHTS).exists() and (folder / SHARDS / ".metadata").is_file():
        return folder / SHARDS
    return folder / WEIGHTS


def is_sharded(folder: Path) -> bool:
    """Does ``folder`` keep its weights in a (complete) sharded checkpoint rather than ``model.safetensors``?"""
    return weights_path(folder).name == SHARDS


def has_weights(folder: Path) -> bool:
    """Is there a complete weights file (or sharded checkpoint) in ``folder``?"""
    return is_sharded(folder) or (folder / WEIGHTS).is_file()


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from itself, a ``checkpoints/`` folder or a run folder (via ``latest``), or from the
    ``checkpoints/latest`` pointer itself.

    A ``latest`` that is empty or names a folder that is not there falls back, with a warning, to the newest
    complete step folder (older than the one it names); with none, it is one line naming the pointer.
    """
    folder = Path(path)
    if not is_checkpoint_source(folder):
        raise CheckpointError(f"{folder}: not an IronCore checkpoint (expected {WEIGHTS} and {MODEL_CONFIG})")
    if folder.is_file():  # the pointer file itself (checkpoints/latest): the folder that holds it
        folder = folder.parent
    for candidate in (folder, folder / "checkpoints"):
        if (candidate / LATEST).is_file():
            folder = _resolve_latest(candidate)
            break
    for path in (folder / MODEL_CONFIG, *(() if is_sharded(folder) else (folder / WEIGHTS,))):
        if not path.is_file():
            what = "is a folder" if path.exists() else "missing"
            raise CheckpointError(f"{path}: {what} (an incomplete checkpoint)")
    return folder


def _resolve_latest(checkpoints: Path) -> Path:
    """The folder ``checkpoints/latest`` names or, when it names none, the newest complete one before it."""
    candidates, problem = newest_first(checkpoints)
    if problem is None:
        return candidates[0]
    complete = [c for c in candidates if (c / MODEL_CONFIG).is_file() and has_weights(c)]
    if not complete:
        raise CheckpointError(f"{checkpoints / LATEST}: {problem}, and no complete checkpoint is left to use instead")
    log.warning("%s: %s: using %s, the newest complete checkpoint", checkpoints / LATEST, problem, complete[0])
    return complete[0]


def newest_first(checkpoints: Path) -> tuple[list[Path], str | None]:
    """Where to look for the newest checkpoint of a ``checkpoints/`` folder, in order, and what is wrong with its
    ``latest`` pointer (None: it names a step folder that exists, the first of the list).

    The list is the folder ``latest`` names followed by the step folders older than it, newest first; when the
    pointer is empty, names no step folder or one that is missing, the step folders that exist (older than
    the one it names, if it names one). No pointer: an empty list (nothing was saved).
    """
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return [], None
    try:
        name = pointer.read_text(errors="replace").strip()
    except OSError as err:
        raise CheckpointError(describe_os_error(err, pointer)) from None
    steps = sorted((p for p in checkpoints.glob("step_*") if p.is_dir()), reverse=True)
    if not is_step_name(name):
        return steps, "is empty" if not name else f"names {name!r}, not a checkpoint folder"
    older = [p for p in steps if p.name < name]
    if (checkpoints / name).is_dir():
        return [checkpoints / name, *older], None
    return older, f"names {name}, which is missing"


def is_step_name(name: str) -> bool:
    """Is ``name`` (a pointer file's text) the name of a step folder beside the pointer?"""
    return name.startswith("step_") and "/" not in name and "\\" not in name


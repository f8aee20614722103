"""``metadata.json``: what a preprocessed data set is, so training can trust (and check) it.

It is written last, into the temporary build folder that is then renamed into
place, so its presence means the shards beside it are complete. The trainer
compares ``tokenizer.vocab_size`` / ``tokenizer.identity`` with the model and
``max_seq_length`` with the model's positions.

Layout of an output folder (``SPLIT`` is ``train`` or ``valid``)::

    metadata.json                 written last
    tokenizer.json (+ tokenizer_config.json)   the tokenizer the ids belong to
    SPLIT.bin/.idx                pretrain and sft tokens
    SPLIT_loss_mask.bin/.idx      sft: uint8 loss mask, same lengths as the tokens
    SPLIT_chosen[_loss_mask], SPLIT_rejected[_loss_mask]   dpo
    inspect/                      reports from --inspect
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ironcore.errors import DataError
from ironcore.files import read_json

METADATA_FILE = "metadata.json"
FORMAT = "ironcore-preprocessed"
FORMAT_VERSION = 1


def shard_prefix(output_dir: str | Path, split: str, stream: str) -> Path:
    """Path prefix (no .bin/.idx) of one stream of one split: ``train``, ``train_loss_mask``, …"""
    name = split if stream == "tokens" else f"{split}_{stream}"
    return Path(output_dir) / name


def fields_path(output_dir: str | Path, split: str) -> Path:
    """The JSONL beside a split's shards holding each example's record fields (rl prompts: for the rewards)."""
    return Path(output_dir) / f"{split}_fields.jsonl"


def load_metadata(output_dir: str | Path) -> dict[str, Any]:
    """The metadata of a complete preprocessed data set, or a DataError saying what to run."""
    path = Path(output_dir) / METADATA_FILE
    if not path.exists():
        raise DataError(f"{path} not found: {output_dir} is not a preprocessed data set (run ironcore preprocess)")
    metadata = read_json(path, "data set metadata")
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: not IronCore preprocessed data of format version {FORMAT_VERSION}; rebuild it"
        )
    return metadata


def write_metadata(output_dir: str | Path, metadata: dict[str, Any]) -> None:
    path = Path(output_dir) / METADATA_FILE
    path.write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}, indent=2) + "\n"
    )

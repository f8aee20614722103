"""RL prompts: each sample is a prompt's tokens and the fields its rewards need.

A preprocessed ``rl`` data set holds, per split, the prompt token shard
(``{split}_prompt``) and ``{split}_fields.jsonl``: one JSON object per prompt,
in shard order, with the original prompt (text or messages) and the record's
``reward_fields`` (e.g. the reference ``answer``). Prompts have their own
lengths (no padding here): the rollout engine completes a batch of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.metadata import fields_path, shard_prefix
from ironcore.errors import DataError


@dataclass
class Prompt:
    """One prompt to complete: its token ids and the fields its reward functions receive."""

    index: int  # position in the split
    ids: torch.Tensor  # [prompt length] int64
    fields: dict[str, Any]  # "prompt" (the original text or messages) and the reward fields


class PromptDataset(torch.utils.data.Dataset):
    """The prompts of one split of an ``rl`` data set, with their fields."""

    def __init__(self, output_dir: str | Path, split: str) -> None:
        self.prompts = IndexedDataset(shard_prefix(output_dir, split, "prompt"))
        path = fields_path(output_dir, split)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            self.fields = [json.loads(line) for line in lines]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read the prompts' fields ({type(err).__name__}: {err}); "
                            "rebuild the data with ironcore preprocess --force") from None
        if len(self.fields) != len(self.prompts):
            raise DataError(f"{path}: {len(self.fields)} records for {len(self.prompts)} prompts; rebuild the data "
                            "with ironcore preprocess --force")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        ids = torch.from_numpy(self.prompts.get(index).astype("int64"))
        return Prompt(index, ids, self.fields[index])

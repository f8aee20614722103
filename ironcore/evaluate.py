"""Validation loss and perplexity, for the trainer's periodic evaluation and for ``ironcore eval``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ironcore import checkpoint
from ironcore.config.data import load_data_config
from ironcore.config.loader import read_yaml
from ironcore.data.batches import MicroBatch, StepBatches, build_dataset
from ironcore.data.metadata import load_metadata
from ironcore.errors import ConfigError, DataError
from ironcore.parallel.cross_entropy import vocab_parallel_cross_entropy


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in fp32 from (vocab-parallel) logits, never gathering the vocabulary."""
    return vocab_parallel_cross_entropy(logits, labels)


@torch.no_grad()
def loss_sums(
    forward: Callable[..., torch.Tensor],
    batches: Iterable[list[MicroBatch]],
    autocast: AbstractContextManager | None = None,
) -> tuple[float, float]:
    """(sum of trained-token losses, number of trained tokens) over all micro-batches."""
    total, count = 0.0, 0.0
    for micro_batches in batches:
        for mb in micro_batches:
            with autocast or nullcontext():
                logits = forward(mb["input_ids"], mb.get("position_ids"), mb.get("attention_mask"), parallel_output=True)
            total += float((token_losses(logits, mb["labels"]) * mb["loss_mask"]).sum())
            count += float(mb["loss_mask"].sum())
    return total, count


def summarize(total: float, count: float) -> dict[str, float]:
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def evaluate_checkpoint(
    path: str | Path,
    data_config: str | Path | None = None,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Loss and perplexity of a checkpoint on the validation split of a data set.

    The data config defaults to the one the checkpoint was trained with.
    """
    folder = checkpoint.resolve(path)
    if data_config is None:
        saved = folder / "config.yaml"
        data_config = read_yaml(saved).get("data", {}).get("config_path") if saved.is_file() else None
        if not data_config:
            raise ConfigError(f"{folder}: no training config.yaml with data.config_path; pass --data-config")
    data_cfg = load_data_config(data_config)
    metadata = load_metadata(data_cfg.output_dir)
    if metadata["task_type"] == "dpo":
        raise ConfigError(
            f"{data_cfg.output_dir}: ironcore eval scores pretrain and sft data; DPO runs report their validation "
            "rewards during training (val_rewards/* in metrics.jsonl)"
        )
    if not metadata["splits"].get("valid"):
        raise DataError(f"{data_cfg.output_dir}: no validation split (set valid_fraction or valid_source)")
    model = checkpoint.load_model(folder, device).eval()
    dataset = build_dataset(data_cfg.output_dir, metadata, "valid", data_cfg.max_seq_length, seed=0)
    batches = StepBatches(dataset, micro_batch_size, micro_batch_size, 0, 1, 0, False, torch.device(device))
    total, count = loss_sums(model, batches.eval_steps(max_batches))
    step = None
    if (folder / checkpoint.TRAINER_STATE).is_file():
        step = json.loads((folder / checkpoint.TRAINER_STATE).read_text())["step"]
    return {"checkpoint": str(folder), "step": step, "data": data_cfg.name, **summarize(total, count),
            "tokens": int(count)}

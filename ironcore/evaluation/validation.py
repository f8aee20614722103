"""Validation loss and perplexity of a checkpoint (``ironcore eval``).

The loss is the language-model objective's cross-entropy over the trained
tokens of a data set's validation split (:mod:`ironcore.objectives.lm`), the
same number the trainer logs as ``val_loss``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ironcore.checkpoints import native
from ironcore.checkpoints.load import load_language_model
from ironcore.data.batches import StepBatches
from ironcore.data.config import load_data_config
from ironcore.data.metadata import load_metadata
from ironcore.data.tasks import build_dataset, dataset_task
from ironcore.data.tokenizer import check_same_tokenizer
from ironcore.errors import ConfigError, DataError
from ironcore.evaluation.tasks import trained_step
from ironcore.files import read_yaml
from ironcore.objectives.lm import loss_sums, perplexity


def evaluate_checkpoint(
    path: str | Path,
    data_config: str | Path | None = None,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "cpu",
    allow_other_tokenizer: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity of a checkpoint (or a run folder's latest) on the validation split of a data set.

    The data config defaults to the one the checkpoint was trained with.
    """
    folder = native.resolve(path)
    if data_config is None:
        saved = folder / "config.yaml"
        data_config = read_yaml(saved).get("data", {}).get("config_path") if saved.is_file() else None
        if not data_config:
            raise ConfigError(f"{folder}: no training config.yaml with data.config_path; pass --data-config")
    data_cfg = load_data_config(data_config)
    metadata = load_metadata(data_cfg.output_dir)
    task = dataset_task(metadata, data_cfg.output_dir)
    if task.objective != "lm":
        raise ConfigError(
            f"{data_cfg.output_dir}: ironcore eval scores the language-model loss of pretrain and sft data; "
            f"{task.name} runs report their validation metrics during training (val_* in metrics.jsonl)"
        )
    if not metadata["splits"].get("valid"):
        raise DataError(f"{data_cfg.output_dir}: no validation split (set valid_fraction or valid_source)")
    if not allow_other_tokenizer:
        check_same_tokenizer(folder, metadata["tokenizer"]["identity"], f"the one that tokenized {data_cfg.output_dir}",
                             "--allow-other-tokenizer")
    step = trained_step(folder)  # read before the work: a bad file must not cost the evaluation
    model = load_language_model(folder, device)
    dataset = build_dataset(data_cfg.output_dir, metadata, "valid", data_cfg.max_seq_length, seed=0)
    batches = StepBatches(dataset, micro_batch_size, micro_batch_size, 0, 1, 0, False, torch.device(device))
    total, count = loss_sums(model, batches.eval_steps(max_batches))
    if count == 0:
        raise DataError(f"{data_cfg.output_dir}: the validation batches hold no trained tokens: nothing to evaluate")
    return {"checkpoint": str(folder), "step": step, "data": data_cfg.name, **perplexity(total, count),
            "tokens": int(count)}

"""Validation metrics of a checkpoint (``ironcore eval``), scored by the objective it was trained with.

The objective (the run's ``trainer.objective``, else the data set's default) scores the validation split
with its own :meth:`~ironcore.objectives.Objective.evaluate`, under the run's options, precision, seed and
packing, read from the ``config.yaml`` saved with the checkpoint. So the numbers are the ``val_*`` metrics
the trainer logs: cross-entropy and perplexity of a language model, TRL's reward metrics of DPO (against
the run's reference), Bradley–Terry's of a reward model. One process scores batches of ``micro_batch_size``
samples; the metrics do not depend on the batch size (up to float rounding; GRPO's pass@k excepted, whose
draws are seeded by the batch layout).
"""

from __future__ import annotations

import dataclasses
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ironcore.checkpoints import native
from ironcore.checkpoints.load import load_language_model, load_model
from ironcore.config.base import from_dict
from ironcore.config.training import Config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.metadata import load_metadata
from ironcore.data.preprocessing.tasks import dataset_task
from ironcore.data.preprocessing.tokenizer import check_same_tokenizer
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.build import build_dataset
from ironcore.errors import ConfigError, DataError
from ironcore.evaluation.tasks import trained_step
from ironcore.files import read_yaml
from ironcore.models.transformer import TransformerModel
from ironcore.objectives import ObjectiveContext, build_objective


def evaluate_checkpoint(
    path: str | Path,
    data_config: str | Path | None = None,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "cpu",
    allow_other_tokenizer: bool = False,
) -> dict[str, Any]:
    """The validation metrics (``val_*``) of a checkpoint (or a run folder's latest) on a data set's validation split.

    The data config defaults to the one the checkpoint was trained with.
    """
    folder = native.resolve(path)
    run_config = saved_run_config(folder)
    data_config = data_config or (run_config.data.config_path if run_config else None)
    if not data_config and run_config is not None and run_config.data.blend:
        names = ", ".join(source.config_path for source in run_config.data.blend)
        raise ConfigError(f"{folder}: trained on a data.blend ({names}); pass --data-config with the one to evaluate on")
    if not data_config:
        raise ConfigError(f"{folder}: no training config.yaml with data.config_path; pass --data-config")
    data_cfg = load_data_config(data_config)
    data_dir = Path(data_cfg.output_dir)
    metadata = load_metadata(data_dir)
    if not metadata["splits"].get("valid"):
        raise DataError(f"{data_dir}: no validation split (set valid_fraction or valid_source)")
    if not allow_other_tokenizer:
        check_same_tokenizer(folder, metadata["tokenizer"]["identity"], f"the one that tokenized {data_dir}",
                             "--allow-other-tokenizer")
    task = dataset_task(metadata, data_dir)
    if run_config is None and task.objective != "lm":  # the language model's loss depends on nothing else
        raise ConfigError(f"{folder}: no training config.yaml; ironcore eval scores {task.name} data with the run's "
                          "objective, its options and its reference, which only that config names")
    step = trained_step(folder)  # read before the work: a bad file must not cost the evaluation
    bf16 = run_config is not None and run_config.trainer.precision == "bf16"
    # bf16: the weights the trainer ran. Without the run's config, a language model's (a reward model is refused).
    model = (load_model if run_config else load_language_model)(folder, device, torch.bfloat16 if bf16 else None)
    metrics = objective_metrics(run_config or Config(model=model.config), model, data_dir, metadata,
                                data_cfg.max_seq_length, device=torch.device(device), step=step or 0,
                                micro_batch_size=micro_batch_size, max_batches=max_batches)  # fmt: skip
    return {"checkpoint": str(folder), "step": step, "data": data_cfg.name, **metrics}


def saved_run_config(folder: Path) -> Config | None:
    """The training config saved with a checkpoint (None without one), as the run read it.

    Each group is checked as at training time; the checks of the launch layout (world size, batch sizes)
    are left out, since the evaluation runs in one process whatever the run's layout was.
    """
    saved = folder / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return from_dict(Config, read_yaml(saved, "training config"))
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(saved)) else f"{saved}: {message}") from None


def objective_metrics(
    config: Config,
    model: TransformerModel,
    data_dir: Path,
    metadata: dict[str, Any],
    seq_len: int,
    *,
    device: torch.device,
    step: int,
    micro_batch_size: int,
    max_batches: int | None,
) -> dict[str, float]:
    """What the run's objective's :meth:`evaluate` says of ``model`` on the validation split, built and called
    as the trainer does (``prepare`` first: DPO's precomputed reference), in batches of ``micro_batch_size``.

    Files an objective writes while it evaluates (GRPO's sample tables, under ``trainer.output_dir``) go to a
    temporary folder: evaluating adds nothing to the training run's folder.
    """
    autocast = _autocast(config, device)
    with tempfile.TemporaryDirectory(prefix="ironcore-eval-") as scratch:
        cfg = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, output_dir=scratch))
        objective = build_objective(ObjectiveContext(cfg, device, autocast, data_dir, metadata, seq_len, model,
                                                     lambda: step))  # fmt: skip
        valid = build_dataset(data_dir, metadata, "valid", seq_len, cfg.init.seed, cfg.data.packing)
        dataset = objective.prepare({"valid": valid})["valid"]
        batches = StepBatches(dataset, global_batch_size=micro_batch_size, micro_batch_size=micro_batch_size,
                              device=device)
        return objective.evaluate(model, batches.eval_steps(max_batches))


def _autocast(config: Config, device: torch.device) -> AbstractContextManager:
    """The trainer's autocast for the run's precision."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if config.trainer.precision == "bf16" else nullcontext()


"""What a model family needs from the training loop, behind one interface the loop calls blindly.

The trainer calls every hook at fixed points of a step; what the hooks do
(a mixture-of-experts model's auxiliary-loss weight and routing log,
:mod:`ironcore.training.router_log`) stays out of the loop. A new model
family with bookkeeping of its own adds a hook to :func:`step_hooks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ironcore.models import TransformerModel
from ironcore.training.router_log import RouterLog


class StepHook(Protocol):
    """Called by the trainer at fixed points of each optimizer step."""

    def start_step(self, passes: int) -> None:
        """Before the step's backward passes; ``passes``: forward passes with gradients of the global batch
        (micro-batches per rank x data-parallel ranks)."""

    def after_forward(self) -> None:
        """After each forward pass with gradients."""

    def step_metrics(self) -> dict[str, float]:
        """The step's metrics, after its backward passes (collective: every rank calls it)."""

    def log_metrics(self, step: int) -> tuple[dict[str, float], list[Path]]:
        """At a log line: metrics since the last one, and files written for the tracker (collective)."""


def step_hooks(model: TransformerModel, device: torch.device, out_dir: Path, is_main: bool) -> list[StepHook]:
    """The hooks ``model`` needs (``out_dir``: where they write files, on the main rank)."""
    return [RouterLog(model, device, out_dir, is_main)] if model.config.num_experts else []

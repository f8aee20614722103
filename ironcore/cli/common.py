"""What the sub-commands share: the arguments of those that read a training config, and their logging."""

from __future__ import annotations

import argparse
import logging
import sys

from ironcore.checkpoints.hf_families import model_config_from_folder
from ironcore.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/example.yaml)")
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=None,
        help="shortcut for trainer.tensor_model_parallel_size=N",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. trainer.micro_batch_size=2 optim.max_lr=3e-4",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The training config of ``--config`` and the overrides; its ``model:`` may be an HF checkpoint folder."""
    return load_config(args.config, args.overrides, args.tensor_model_parallel_size,
                       read_folder=model_config_from_folder)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when it writes, not to the one it was made with (a caller
    that swaps stderr, such as pytest's capture, must not leave the handler on a closed stream)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def log_to_stderr(logger: logging.Logger, level: str | int, fmt: str) -> None:
    """``logger`` logs at ``level`` to stderr in ``fmt``, unless it has handlers already."""
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.setLevel(level)

"""Arguments shared by the sub-commands that read a training config."""

from __future__ import annotations

import argparse

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
    return load_config(args.config, args.overrides, args.tensor_model_parallel_size)

"""``ironcore train``: validate the config; the training loop arrives with issue #4."""

from __future__ import annotations

import argparse
import sys

from ironcore.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model (pretraining, SFT, DPO)")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(
        f"ironcore train: config {args.config} is valid (model {cfg.model.name}), but the training loop "
        "is not implemented yet: it arrives with issue #4",
        file=sys.stderr,
    )
    return 1

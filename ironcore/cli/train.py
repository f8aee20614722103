"""``ironcore train``: pretraining or SFT (the task type comes from the data config)."""

from __future__ import annotations

import argparse
import logging

from ironcore.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model; resumes from OUTPUT_DIR/checkpoints/latest when present"
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.parallel.setup import destroy_parallel
    from ironcore.trainer import Trainer

    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.utils.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        Trainer(cfg).train()
    finally:
        destroy_parallel()
    return 0

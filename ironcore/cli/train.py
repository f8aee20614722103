"""``ironcore train``: pretraining, SFT, DPO or an objective of your own, on one process or under torchrun."""

from __future__ import annotations

import argparse
import logging

from ironcore.cli.common import add_config_arguments, config_from_args, log_to_stderr


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (pretraining, SFT, DPO, or trainer.objective); resumes from checkpoints/latest",
        description="Train with the objective of trainer.objective, or the data set's default: lm (next-token "
        "cross-entropy) for pretrain and sft data, dpo for dpo data. Rerunning the same command resumes from "
        "OUTPUT_DIR/checkpoints/latest. Launch under torchrun for tensor and data parallelism.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.parallel.setup import destroy_parallel
    from ironcore.training.trainer import Trainer

    cfg = config_from_args(args)
    log_to_stderr(logging.getLogger(), cfg.utils.log_level.upper(), "%(levelname)s %(name)s: %(message)s")
    try:
        Trainer(cfg).train()
    finally:
        destroy_parallel()
    return 0

"""``ironcore preprocess``: tokenize a data set into Megatron shards, and/or inspect it."""

from __future__ import annotations

import argparse
import logging

from ironcore.cli.common import log_to_stderr


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize a data config's source into .bin/.idx shards (+ inspection report)",
        description="Tokenize the source of a data config (pretrain, sft or dpo) into Megatron .bin/.idx "
        "shards in its output_dir. A re-run with unchanged config, source and tokenizer does nothing.",
    )
    parser.add_argument("--config", required=True, help="data config YAML (configs/data/*.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--inspect", action="store_true", help="also write the inspection report afterwards")
    mode.add_argument("--only-inspect", action="store_true", help="only inspect the existing output_dir")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="data config overrides, e.g. num_workers=4"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Heavy imports stay here so that `ironcore --help` stays fast.
    from ironcore.data.demo.inspect import inspect_dataset, summary_lines
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.data.preprocessing.preprocess import preprocess

    log_to_stderr(logging.getLogger("ironcore"), logging.INFO, "ironcore preprocess: %(message)s")
    config = load_data_config(args.config, args.overrides)
    if not args.only_inspect:
        metadata = preprocess(config, force=args.force, progress=not args.no_progress)
        for split, info in metadata["splits"].items():
            print(f"{config.output_dir}: {split}: {info.get('documents', 0):,} examples, {info.get('tokens', 0):,} tokens")
        counts = {key: value for key, value in metadata["counts"].items() if value and key != "records"}
        if counts:
            print(f"{config.output_dir}: {counts}")
    if args.inspect or args.only_inspect:
        for line in summary_lines(inspect_dataset(config.output_dir)):
            print(line)
    return 0

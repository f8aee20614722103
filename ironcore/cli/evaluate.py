"""``ironcore eval``: validation loss and perplexity of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on validation data")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (uses its latest)")
    parser.add_argument("--data-config", help="data config whose validation split to use (default: the training one)")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="evaluate although the checkpoint's tokenizer is not the one that tokenized the data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.evaluation.validation import evaluate_checkpoint
    from ironcore.files import check_writable, write_text_atomically

    if args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise ConfigError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.output:  # before the evaluation, not after it: a bad path must not cost the result
        check_writable(args.output, "file")
    result = evaluate_checkpoint(args.checkpoint, args.data_config, args.micro_batch_size, args.max_batches,
                                 args.device, args.allow_other_tokenizer)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.output, text + "\n")
    return 0

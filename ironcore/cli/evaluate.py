"""``ironcore eval``: validation loss and perplexity of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on validation data")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (uses its latest)")
    parser.add_argument("--data-config", help="data config whose validation split to use (default: the training one)")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.evaluation.validation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data_config, args.micro_batch_size, args.max_batches, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0

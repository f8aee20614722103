"""``ironcore eval``: checkpoint evaluation arrives with the trainer (issue #4)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint on validation data")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--data-config", help="data config whose validation split to use")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("ironcore eval: not implemented yet: checkpoint evaluation arrives with issue #4", file=sys.stderr)
    return 1

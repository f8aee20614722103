"""``ironcore generate``: KV-cache generation arrives with the inference engine (issue #8)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("ironcore generate: not implemented yet: generation arrives with issue #8", file=sys.stderr)
    return 1

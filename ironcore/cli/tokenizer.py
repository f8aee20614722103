"""``ironcore tokenizer``: train a byte-level BPE on a text or JSONL source and save it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer on a source and save tokenizer.json",
        description="Train a GPT-2-style byte-level BPE (EOD <|endoftext|>) on a local source, read the way "
        "a data config's source is read, and save OUTPUT_DIR/tokenizer.json and OUTPUT_DIR/tokenizer_config.json. "
        "A data config uses it with `tokenizer: {path: OUTPUT_DIR}`.",
    )
    parser.add_argument("--source", required=True, help="text/JSONL file, folder or glob (like source.path)")
    parser.add_argument("--field", action="append", help="record field(s) with text (default: text)")
    parser.add_argument(
        "--document-split", choices=("file", "paragraph", "line"), default="paragraph",
        help="how a text file is cut into documents",
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    parser.add_argument(
        "--output", required=True, metavar="OUTPUT_DIR", help="folder to write tokenizer.json and tokenizer_config.json to"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.data.preprocessing.config import SourceConfig
    from ironcore.data.preprocessing.sources import read_all_texts
    from ironcore.data.preprocessing.tokenizer import Tokenizer
    from ironcore.files import check_writable

    output = Path(args.output)
    if output.is_file() or output.suffix == ".json":
        raise ConfigError(f"--output {output}: give a folder; tokenizer.json and tokenizer_config.json go into it")
    check_writable(output, "folder")
    if args.vocab_size < 257:
        raise ConfigError(f"--vocab-size must be at least 257 (256 bytes + EOD), got {args.vocab_size}")
    source = SourceConfig(path=args.source, document_split=args.document_split)
    texts = read_all_texts(source, args.field or ["text"], skip_bad=False)
    tokenizer = Tokenizer.train_bpe(texts, args.vocab_size, args.min_frequency)
    folder = tokenizer.save(args.output)
    print(f"{folder}/tokenizer.json: byte-level BPE, {tokenizer.vocab_size:,} tokens, EOD {tokenizer.eod_token}")
    return 0

"""``ironcore corpus``: write the built-in corpus (the Python standard library's docs and sources)."""

from __future__ import annotations

import argparse

from ironcore.data.demo.corpus import DEFAULT_MAX_FILE_BYTES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corpus",
        help="write the built-in offline corpus (pydoc topics + stdlib sources) as train/valid JSONL",
        description="Build an English + Python corpus from the running interpreter's standard library "
        "(pydoc topic texts and module sources), in a deterministic order with a held-out validation part: "
        "OUTPUT_DIR/train.jsonl, valid.jsonl and manifest.json.",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents held out")
    parser.add_argument("--max-bytes", type=int, default=None, help="keep at most this many bytes of text")
    parser.add_argument(
        "--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES, help="skip source files larger than this"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.data.demo.corpus import build_corpus
    from ironcore.files import check_writable

    check_writable(args.output, "folder")
    manifest = build_corpus(args.output, args.valid_fraction, args.max_bytes, max_file_bytes=args.max_file_bytes)
    for split, info in manifest["splits"].items():
        print(
            f"{args.output}/{info['file']}: {split}: {info['documents']:,} documents "
            f"({info['topics']} topics, {info['modules']} modules), {info['characters']:,} characters"
        )
    return 0

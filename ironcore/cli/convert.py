"""``ironcore convert``: HF checkpoint folder <-> IronCore checkpoint folder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert between HF and IronCore checkpoints")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + safetensors)")
    direction.add_argument("--to-hf", action="store_true", help="write --checkpoint as an HF checkpoint folder")
    parser.add_argument("--checkpoint", metavar="CKPT_DIR", help="IronCore checkpoint folder (with --to-hf)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.checkpoint import copy_tokenizer, load_model, resolve, save_model
    from ironcore.hf import load_hf_model, save_hf_model

    if args.to_hf:
        if not args.checkpoint:
            raise SystemExit("ironcore convert: error: --to-hf needs --checkpoint CKPT_DIR")
        source = resolve(args.checkpoint)
        out = save_hf_model(load_model(source), args.output)
    else:
        source = args.from_hf
        out = save_model(load_hf_model(source), args.output)
    copy_tokenizer(source, out)  # so the converted folder can generate text on its own
    print(f"wrote {out}")
    return 0

"""``ironcore convert``: HF checkpoint folder <-> IronCore checkpoint folder; a LoRA checkpoint to a PEFT adapter
folder or a merged HF model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ironcore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert between HF and IronCore checkpoints")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + safetensors)")
    direction.add_argument("--to-hf", action="store_true", help="write --checkpoint as an HF checkpoint folder")
    parser.add_argument("--checkpoint", metavar="CKPT_DIR", help="IronCore checkpoint folder (with --to-hf)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter-only", action="store_true",
                      help="a LoRA checkpoint's adapters as a PEFT folder (adapter_config.json + "
                      "adapter_model.safetensors) for peft.PeftModel.from_pretrained(base, folder)")
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA checkpoint with its adapters merged into the base: a plain HF model folder")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.checkpoints.hf import export_token_ids, generation_config, save_hf_model
    from ironcore.checkpoints.load import load_model, locate
    from ironcore.checkpoints.native import (
        GENERATION_CONFIG,
        copy_generation_config,
        copy_model_metadata,
        copy_tokenizer,
        read_base_record,
        write_model_files,
    )
    from ironcore.checkpoints.peft import write_peft_adapter
    from ironcore.files import build_folder, check_writable
    from ironcore.models.lora import merge_adapters, trainable_names
    from ironcore.parallel.sharding import full_state_dict

    check_writable(args.output, "folder")  # before the conversion: a bad path must not cost the work
    if args.to_hf:
        if not args.checkpoint:
            raise ConfigError("--to-hf needs --checkpoint CKPT_DIR")
        _, folder = locate(args.checkpoint)
    else:
        if args.adapter_only or args.merge:
            raise ConfigError("--adapter-only and --merge export a LoRA checkpoint: use them with --to-hf")
        _, folder = locate(args.from_hf, expect="hf")
    model = load_model(folder)
    if args.to_hf and model.config.lora is not None and not (args.adapter_only or args.merge):
        raise ConfigError(f"{args.checkpoint}: a LoRA checkpoint: export its adapters as a PEFT folder "
                          "(--adapter-only) or merged into the base (--merge)")
    if args.adapter_only and model.config.lora is None:
        raise ConfigError(f"{args.checkpoint}: has no LoRA adapters (--adapter-only)")
    if args.merge:
        merge_adapters(model)
    # The special token ids an HF config.json names: what the imported folder said, else the tokenizer's own.
    token_ids = export_token_ids(folder) if args.to_hf else {}

    def write(tmp: Path) -> None:
        copy_tokenizer(folder, tmp)  # so the converted folder can tokenize, render chats and generate on its own
        if args.adapter_only:
            trained = full_state_dict(model, only=trainable_names(model))
            write_peft_adapter(model, trained, tmp, base=read_base_record(folder).get("base") or None)
        elif args.to_hf:
            save_hf_model(model, tmp, token_ids=token_ids)
            copy_generation_config(folder, tmp)
            if not (tmp / GENERATION_CONFIG).is_file() and token_ids:
                (tmp / GENERATION_CONFIG).write_text(json.dumps(generation_config(tmp, token_ids), indent=2) + "\n")
        else:
            write_model_files(tmp, full_state_dict(model), model.config)
            copy_model_metadata(folder, tmp)  # generation_config.json and config.json's token ids, for an export

    out = build_folder(args.output, write)
    print(f"wrote {out}")
    return 0

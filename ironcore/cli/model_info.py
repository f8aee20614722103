"""``ironcore model-info``: parameters and FLOPs per token of any model, without allocating weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ironcore.config import load_config, load_model_config
from ironcore.files import read_yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model-info", help="parameter count and FLOPs per token of a model config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="training config, model YAML or HF checkpoint folder")
    source.add_argument("--model", help="model name (configs/model/NAME.yaml), model YAML or HF folder")
    parser.add_argument("--seq-len", type=int, help="sequence length for attention FLOPs (default: max positions)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.models.stats import model_stats

    if args.model:
        cfg = load_model_config(args.model)
    elif Path(args.config).is_file() and "model" in read_yaml(args.config):
        cfg = load_config(args.config, world_size=1).model
    else:
        cfg = load_model_config(args.config)
    seq_len = args.seq_len or cfg.max_position_embeddings
    stats = model_stats(cfg, seq_len)
    if args.json:
        print(json.dumps({"name": cfg.name, "seq_len": seq_len, **stats.__dict__}, indent=2))
        return 0
    rows = [
        ("model", cfg.name),
        ("parameters", f"{stats.params:,} ({stats.params / 1e9:.3f} B)"),
        ("embedding parameters", f"{stats.embedding_params:,}"),
        ("matmul parameters", f"{stats.matmul_params:,}"),
        ("sequence length", f"{seq_len:,}"),
        ("forward FLOPs/token", f"{stats.forward_flops_per_token:.4g}"),
        ("training FLOPs/token", f"{stats.train_flops_per_token:.4g} (6N + 12*L*H*Q*T)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0

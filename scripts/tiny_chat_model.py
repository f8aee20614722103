"""A stand-in for SmolLM2-135M-Instruct where none can be downloaded: its layout (LLaMA, grouped KV heads, tied
embeddings) and its chat format (ChatML, ``<|im_end|>`` the EOS), tiny and with random weights.

``docs/post-training.md`` runs its walk-through on this folder in the docs test: every command is the one a user
runs on the real model's folder; only the outputs are noise. Its tokenizer is a byte-level BPE of 2,048 tokens
learnt from the example data, plus ChatML's two special tokens.

    python scripts/tiny_chat_model.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tokenizers
import torch

from ironcore.checkpoints.hf import save_hf_model
from ironcore.config import load_model_config
from ironcore.config.base import from_dict, to_dict
from ironcore.config.model import ModelConfig
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.models import TransformerModel

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048  # SmolLM2 has 49,152 tokens; a BPE of the example data keeps the stand-in's output layer small
# SmolLM2-Instruct's template: ChatML, with a default system turn when the conversation has none.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _texts() -> list[str]:
    """Every string of the example data the walk-through reads (GSM8K, HH-RLHF), for the BPE to learn from."""
    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        return [text for item in value for text in strings(item)] if isinstance(value, list) else []

    files = [*(ROOT / "examples/data/gsm8k").glob("*.jsonl"), ROOT / "examples/data/hh_rlhf/hh_rlhf_harmless_300.jsonl"]
    return [text for path in files for line in path.open(encoding="utf-8") for text in strings(json.loads(line))]


def build(out: Path, seed: int = 0) -> Path:
    """Write the HF folder: config.json, model.safetensors, generation_config.json and the tokenizer."""
    backend = Tokenizer.train_bpe(_texts(), VOCAB).backend  # small, so that the smoke runs take seconds
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
    tokenizer = Tokenizer(backend, {"tokenizer_class": "GPT2Tokenizer", **special}, chat_templates={"default": TEMPLATE})
    ids = {f"{name}_id": backend.token_to_id(special[name]) for name in ("bos_token", "eos_token", "pad_token")}
    shape = {"name": "tiny-chat", "vocab_size": tokenizer.vocab_size, "hidden_size": 64, "num_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "ffn_hidden_size": 128,
             "max_position_embeddings": 1024}
    config = from_dict(ModelConfig, {**to_dict(load_model_config("smollm2-135m")), **shape})
    torch.manual_seed(seed)
    save_hf_model(TransformerModel(config), out, token_ids=ids)
    tokenizer.save(out)
    hf_config = json.loads((out / "config.json").read_text())  # named as a hub download names its model
    (out / "config.json").write_text(json.dumps({"_name_or_path": "ironcore/tiny-chat", **hf_config}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the HF folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.seed))


if __name__ == "__main__":
    main()

"""Conversational preference data (TRL's format) and the model's own end token (issue 36).

The reference is TRL itself: its ``DPOTrainer`` data preparation (prompt
extraction, EOS handling, tokenisation) on the same tokenizer folder, loaded by
``transformers``' ``AutoTokenizer``; the tokenizer is the ``chat_tokenizer_dir``
fixture (Qwen3's ChatML template, ``<|im_end|>`` its EOS, ``<|endoftext|>`` its
end of document).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from run_helpers import read_metrics, small_run_config

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.metadata import shard_prefix
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.errors import ConfigError, DataError

SKY = [{"role": "user", "content": "What color is the sky?"}]
EXPLICIT = {"prompt": SKY, "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}]}
# Implicit prompt, two turns: the shared beginning (through the second question) is the prompt.
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Name a prime."}]
IMPLICIT = {"chosen": [*HI, {"role": "assistant", "content": "Seven."}],
            "rejected": [*HI, {"role": "assistant", "content": "Nine."}]}
# TRL's implicit text pair: extract_prompt leaves the space to the responses; TRL then appends the EOS.
IMPLICIT_TEXT = {"chosen": "Human: Is water wet?\n\nAssistant: Yes, it is.",
                 "rejected": "Human: Is water wet?\n\nAssistant: No."}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _pairs(out: Path) -> list[dict[str, list[int]]]:
    streams = {name: IndexedDataset(shard_prefix(out, "train", name))
               for name in ("chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask")}
    return [{name: data.get(i).tolist() for name, data in streams.items()} for i in range(len(streams["chosen"]))]


@pytest.fixture(scope="module")
def trl_prepare(chat_tokenizer_dir):
    """TRL's ``DPOTrainer`` data preparation of one record: ``(prompt_ids, chosen_ids, rejected_ids)``."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DPOTrainer

    hf = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")

    def prepare(record: dict) -> tuple[list[int], list[int], list[int]]:
        row = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=hf), Dataset.from_list([record]), hf, args,
                                          "train")[0]
        return row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]

    prepare.hf = hf
    return prepare


@pytest.mark.parametrize(("record", "fields"), [
    (EXPLICIT, {}), (IMPLICIT, {"chosen": "chosen", "rejected": "rejected"}),
    (IMPLICIT_TEXT, {"chosen": "chosen", "rejected": "rejected"}),
], ids=["explicit", "implicit", "implicit-text"])
def test_preference_records_tokenize_as_trl(tmp_path, data_config, chat_tokenizer_dir, trl_prepare, record,
                                            fields) -> None:
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    config = data_config(task_type="dpo", source={"path": str(_jsonl(tmp_path / "p.jsonl", [record]))},
                         fields=fields, tokenizer={"path": str(chat_tokenizer_dir)})
    preprocess(config, progress=False)
    (ours,) = _pairs(Path(config.output_dir))
    prompt, chosen, rejected = trl_prepare(record)
    assert ours["chosen"] == prompt + chosen and ours["rejected"] == prompt + rejected
    assert ours["chosen_loss_mask"] == [0] * len(prompt) + [1] * len(chosen)
    assert ours["rejected_loss_mask"] == [0] * len(prompt) + [1] * len(rejected)
    # ... and the text is TRL's rendering: prompt and chosen of maybe_extract_prompt + maybe_apply_chat_template.
    texts = maybe_apply_chat_template(maybe_extract_prompt(record), trl_prepare.hf)
    tokenizer = Tokenizer.from_path(chat_tokenizer_dir)
    decoded = tokenizer.decode(ours["chosen"])
    assert decoded.startswith(texts["prompt"] + texts["chosen"])
    if isinstance(record["chosen"], list):  # one end of turn, never <|im_end|>\n<|im_end|>
        assert decoded.endswith("<|im_end|>\n") and decoded.count("<|im_end|>") == decoded.count("<|im_start|>")


def test_a_record_mixing_text_and_messages_names_its_line(tmp_path, data_config, chat_tokenizer_dir) -> None:
    rows = [EXPLICIT, {**EXPLICIT, "chosen": "It is blue."}]
    config = data_config(task_type="dpo", source={"path": str(_jsonl(tmp_path / "p.jsonl", rows))},
                         tokenizer={"path": str(chat_tokenizer_dir)})
    with pytest.raises(DataError, match=r"p\.jsonl:2: a record is either text or messages, not both "
                                        r"\(fields\.prompt is messages, fields\.chosen is text"):
        preprocess(config, progress=False)
    implicit = data_config(task_type="dpo", source={"path": str(_jsonl(tmp_path / "i.jsonl", [IMPLICIT]))},
                           tokenizer={"path": str(chat_tokenizer_dir)}, output_dir=str(tmp_path / "implicit"))
    with pytest.raises(DataError, match=r"i\.jsonl:1: field 'prompt' \(fields\.prompt\) is missing; when chosen "
                                        r"and rejected hold the prompt"):
        preprocess(implicit, progress=False)


def test_conversational_bad_pairs_are_counted_and_skipped(tmp_path, data_config, chat_tokenizer_dir) -> None:
    rows = [EXPLICIT, {**EXPLICIT, "rejected": EXPLICIT["chosen"]},
            {**EXPLICIT, "chosen": [{"role": "assistant", "content": " "}]},
            {"chosen": IMPLICIT["chosen"], "rejected": IMPLICIT["chosen"]}]
    config = data_config(task_type="dpo", source={"path": str(_jsonl(tmp_path / "p.jsonl", rows))},
                         tokenizer={"path": str(chat_tokenizer_dir)}, on_bad_record="skip")
    metadata = preprocess(config, progress=False)
    assert metadata["counts"]["identical_pair"] == 1 and metadata["counts"]["empty"] == 1
    assert metadata["counts"]["bad_records"] == 1  # the implicit record in the explicit layout
    assert metadata["splits"]["train"]["documents"] == 1


def test_chat_examples_end_with_the_models_end_of_turn(tmp_path, data_config, chat_tokenizer_dir, caplog) -> None:
    """ChatML ``messages`` end with ``<|im_end|>`` (trained), not ``<|endoftext|>``; prompt/response records of
    the same tokenizer get ``<|im_end|>`` appended; preprocess says which ids it used."""
    tokenizer = Tokenizer.from_path(chat_tokenizer_dir)
    im_end, endoftext = tokenizer.backend.token_to_id("<|im_end|>"), tokenizer.backend.token_to_id("<|endoftext|>")
    record = {"messages": [*SKY, {"role": "assistant", "content": "It is blue."}]}
    config = data_config(task_type="sft", source={"path": str(_jsonl(tmp_path / "c.jsonl", [record]))},
                         fields={"messages": "messages"}, tokenizer={"path": str(chat_tokenizer_dir)})
    with caplog.at_level(logging.INFO, logger="ironcore.data.preprocessing.preprocess"):
        metadata = preprocess(config, progress=False)
    assert (f"end of example: <|im_end|> (id {im_end}) from tokenizer_config.json eos_token; "
            f"end of document: <|endoftext|> (id {endoftext})") in caplog.text
    assert metadata["tokenizer"] | {"identity": None} == {
        "identity": None, "vocab_size": tokenizer.vocab_size, "eod_id": endoftext, "eod_token": "<|endoftext|>",
        "eos_id": im_end, "eos_token": "<|im_end|>", "dtype": "uint16"}
    out = Path(config.output_dir)
    tokens = IndexedDataset(shard_prefix(out, "train", "tokens")).get(0).tolist()
    mask = IndexedDataset(shard_prefix(out, "train", "loss_mask")).get(0).tolist()
    assert endoftext not in tokens and tokenizer.decode(tokens[-2:]) == "<|im_end|>\n"
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained[-1] == im_end and tokenizer.decode(trained).endswith("It is blue.<|im_end|>")

    text = data_config(task_type="sft", source={"path": str(_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Q: sky?\nA:", "response": " blue"}]))}, tokenizer={"path": str(chat_tokenizer_dir)},
        output_dir=str(tmp_path / "text"))
    preprocess(text, progress=False)
    tokens = IndexedDataset(shard_prefix(text.output_dir, "train", "tokens")).get(0).tolist()
    assert tokens == tokenizer.encode("Q: sky?\nA: blue") + [im_end]


def test_the_end_of_sequence_comes_from_config_generation_config_or_override(tmp_path, chat_tokenizer_dir) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((chat_tokenizer_dir / "tokenizer.json").read_bytes())
    backend = Tokenizer.from_path(chat_tokenizer_dir).backend
    im_end = backend.token_to_id("<|im_end|>")
    assert Tokenizer.from_path(folder).eos_origin == "the end-of-document token"
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 50256]}))
    found = Tokenizer.from_path(folder)
    assert (found.eos_token, found.eos_id, found.eos_origin) == ("<|im_end|>", im_end, "generation_config.json "
                                                                  "eos_token_id")
    assert Tokenizer.from_path(folder, eos_token="<|im_start|>").eos_origin == "tokenizer.eos_token"
    with pytest.raises(ConfigError, match=r"no token '<nope>' \(tokenizer\.eos_token\)"):
        Tokenizer.from_path(folder, eos_token="<nope>")


def test_a_dpo_run_trains_on_conversational_pairs(tmp_path, chat_tokenizer_dir) -> None:
    """Explicit-prompt message pairs through ``ironcore train``'s trainer: step 1 is log 2 (policy = reference),
    and two more steps on the same pairs lower it."""
    from ironcore.data.preprocessing.config import load_data_config
    from ironcore.training.trainer import Trainer

    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
             "chosen": [{"role": "assistant", "content": f"{a + b}."}],
             "rejected": [{"role": "assistant", "content": f"{a + b + 1}, I think."}]}
            for a, b in ((1, 2), (3, 4))]
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({
        "name": "chat-pairs", "task_type": "dpo", "source": {"path": str(_jsonl(tmp_path / "p.jsonl", rows))},
        "tokenizer": {"path": str(chat_tokenizer_dir)}, "max_seq_length": 40, "output_dir": str(tmp_path / "out"),
        "num_workers": 0,
    }))
    metadata = preprocess(load_data_config(data), progress=False)
    assert metadata["counts"].get("truncated", 0) == 0
    vocab = metadata["tokenizer"]["vocab_size"]
    model = {"name": "tiny", "vocab_size": vocab, "hidden_size": 16, "num_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 40, "position_embedding": "rope", "norm_type": "rmsnorm",
             "ffn_hidden_size": 32, "tie_word_embeddings": True}
    Trainer(small_run_config(model, data, tmp_path / "run", 3, trainer__micro_batch_size=2, optim__max_lr=3e-2,
                             optim__warmup_steps=1)).train()
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m}
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[3] < losses[1], losses

"""SFT and DPO: loss masks (prompt/response and chat templates), packing without cross-attention, pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.data.samples.dpo import DPODataset
from ironcore.data.samples.sft import SFTDataset, next_fit_bins, packed_attention_mask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TEMPLATE = "Question: {prompt}\nAnswer:\n"
GSM8K = EXAMPLES / "gsm8k" / "gsm8k_train_300.jsonl"


def gsm8k_config(data_config, **overrides):
    """The GSM8K prompt/response SFT data config of these tests."""
    return data_config(task_type="sft", source={"path": str(GSM8K)}, fields={"prompt": "question", "response": "answer"},
                       prompt_template=TEMPLATE, **overrides)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _examples(out: Path, split: str = "train") -> list[tuple[list[int], list[int]]]:
    tokens, masks = IndexedDataset(out / split), IndexedDataset(out / f"{split}_loss_mask")
    return [(tokens[i].tolist(), masks[i].tolist()) for i in range(len(tokens))]


def test_prompt_response_masks_equal_the_split(tmp_path, data_config, gpt2_tokenizer) -> None:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    config = gsm8k_config(data_config, max_seq_length=1024, num_workers=2)
    metadata = preprocess(config, progress=False)
    assert metadata["counts"].get("prompt_not_prefix", 0) == 0
    examples = _examples(tmp_path / "out")
    assert len(examples) == len(rows) == 300
    for row, (tokens, mask) in zip(rows, examples, strict=True):
        prompt = gpt2_tokenizer.encode(TEMPLATE.replace("{prompt}", row["question"]))
        response = gpt2_tokenizer.encode(row["answer"])
        assert tokens == prompt + response + [gpt2_tokenizer.eod_id]
        assert mask == [0] * len(prompt) + [1] * (len(response) + 1)
    trained = sum(sum(m) for _, m in examples)
    assert metadata["splits"]["train"]["trained_tokens"] == trained


def test_prompt_not_a_prefix_is_warned_and_counted(tmp_path, data_config, gpt2_tokenizer, caplog) -> None:
    # "A: " + "yes" tokenizes as "A", ":", " yes": the prompt's trailing " " token is not a prefix.
    source = _jsonl(tmp_path / "s.jsonl", [{"prompt": "Is it?", "response": "yes"}])
    config = data_config(task_type="sft", source={"path": str(source)}, prompt_template="Q: {prompt} A: ")
    with caplog.at_level(logging.WARNING, logger="ironcore"):
        metadata = preprocess(config, progress=False)
    assert metadata["counts"]["prompt_not_prefix"] == 1
    assert "s.jsonl:1: the prompt's tokens are not a prefix" in caplog.text
    [(tokens, mask)] = _examples(tmp_path / "out")
    assert tokens == gpt2_tokenizer.encode("Q: Is it? A: yes") + [gpt2_tokenizer.eod_id]
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert gpt2_tokenizer.decode(trained) == " yes<|endoftext|>"  # training starts at the merged token


def _assistant_char_spans(text: str) -> list[tuple[int, int]]:
    """Independent reference: after each '<|im_start|>assistant\\n' through its '<|im_end|>'."""
    spans, start = [], 0
    header = "<|im_start|>assistant\n"
    while (begin := text.find(header, start)) != -1:
        end = text.index("<|im_end|>", begin) + len("<|im_end|>")
        spans.append((begin + len(header), end))
        start = end
    return spans


def test_chat_masks_are_the_assistant_turns_with_qwen3(tmp_path, data_config, chat_tokenizer_dir) -> None:
    folder = chat_tokenizer_dir
    conversations = [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6, since 3+3=6."},
        ],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi! 👋"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e"},
            {"role": "assistant", "content": "f"},
        ],
    ]
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    config = data_config(
        task_type="sft",
        source={"path": str(source)},
        fields={"messages": "messages"},
        tokenizer={"path": str(folder)},
        append_eod=False,
        num_workers=2,
    )
    metadata = preprocess(config, progress=False)
    assert metadata["counts"].get("prompt_not_prefix", 0) == 0
    tokenizer = Tokenizer.from_path(folder)
    for conversation, (tokens, mask) in zip(conversations, _examples(tmp_path / "out"), strict=True):
        text = tokenizer.apply_chat_template(conversation)
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        assert tokens == encoding.ids
        spans = _assistant_char_spans(text)
        assert len(spans) == sum(m["role"] == "assistant" for m in conversation)
        expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in encoding.offsets]
        assert mask == expected
        # The trained text is exactly the assistant replies, each closed by <|im_end|>.
        trained = tokenizer.decode([t for t, m in zip(tokens, mask, strict=True) if m])
        assert trained == "".join(text[a:b] for a, b in spans)
        assert trained.count("<|im_end|>") == len(spans)


def test_chat_records_without_assistant_turn_are_bad(tmp_path, data_config, chat_tokenizer_dir) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": "not a list"}]
    config = data_config(
        task_type="sft",
        source={
            "path": str(
                _jsonl(
                    tmp_path / "c.jsonl",
                    rows
                    + [
                        {
                            "messages": [
                                {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"},
                            ]
                        }
                    ],
                )
            )
        },
        fields={"messages": "messages"},
        tokenizer={"path": str(chat_tokenizer_dir)},
        on_bad_record="skip",
    )
    metadata = preprocess(config, progress=False)
    assert metadata["counts"]["bad_records"] == 2 and metadata["splits"]["train"]["documents"] == 1


# ---- packing ------------------------------------------------------------------------------------------


def test_packed_mask_never_crosses_examples() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 9, (6,), generator=generator)
        example_ids = torch.repeat_interleave(torch.arange(6), lengths)[:32]
        example_ids = torch.cat([example_ids, torch.full((32 - len(example_ids),), -1)])
        mask = packed_attention_mask(example_ids.unsqueeze(0))
        assert mask.shape == (1, 1, 32, 32) and mask.dtype == torch.bool
        q, k = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        allowed = (example_ids[q] == example_ids[k]) & (k <= q)
        assert torch.equal(mask[0, 0], allowed)
        assert mask[0, 0].diagonal().all()  # every query sees at least itself: no all-masked rows


def test_next_fit_bins_respect_capacity() -> None:
    lengths = np.array([3, 4, 2, 5, 5, 1, 6])
    starts = next_fit_bins(lengths, 7)
    assert starts.tolist() == [0, 2, 4, 6, 7]  # [3, 4] [2, 5] [5, 1] [6]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert lengths[a:b].sum() <= 7


def test_sft_dataset_padding_and_packing(tmp_path, data_config) -> None:
    config = gsm8k_config(data_config, max_seq_length=512)
    preprocess(config, progress=False)
    examples = _examples(tmp_path / "out")
    padded = SFTDataset(tmp_path / "out" / "train", seq_len=512, pad_id=50256)
    sample = padded[7]
    tokens, mask = examples[7]
    n = len(tokens) - 1
    assert sample["input_ids"][:n].tolist() == tokens[:-1] and sample["labels"][:n].tolist() == tokens[1:]
    assert sample["loss_mask"][:n].tolist() == mask[1:] and not sample["loss_mask"][n:].any()
    assert "attention_mask" not in sample

    packed = SFTDataset(tmp_path / "out" / "train", seq_len=512, pad_id=50256, packing=True, seed=3)
    assert len(packed) < len(padded)
    seen = 0
    for index in range(len(packed)):
        sample = packed[index]
        positions, attention = sample["position_ids"], sample["attention_mask"][0]
        starts = (positions == 0).nonzero().flatten().tolist()
        bounds = [*starts, 512]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            block = attention[a:b]
            assert not block[:, :a].any() and not block[:, b:].any()  # nothing outside its own example
        seen += len(starts)  # positions restart once per example (pads continue the last one)
        assert sample["loss_mask"].sum() > 0
    trained_total = sum(float(packed[i]["loss_mask"].sum()) for i in range(len(packed)))
    assert trained_total == sum(sum(m[1:]) for _, m in examples)  # same targets as unpacked
    assert seen == len(examples)


# ---- DPO ---------------------------------------------------------------------------------------------


def test_dpo_pairs(tmp_path, data_config, gpt2_tokenizer) -> None:
    source = EXAMPLES / "hh_rlhf" / "hh_rlhf_harmless_300.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()][:40]
    config = data_config(
        task_type="dpo", source={"path": str(_jsonl(tmp_path / "d.jsonl", rows))}, max_seq_length=2048
    )
    metadata = preprocess(config, progress=False)
    out = tmp_path / "out"
    assert set(metadata["splits"]["train"]["shards"].values()) == {
        "train_chosen",
        "train_chosen_loss_mask",
        "train_rejected",
        "train_rejected_loss_mask",
    }
    kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
    chosen, chosen_mask = IndexedDataset(out / "train_chosen"), IndexedDataset(out / "train_chosen_loss_mask")
    rejected_mask = IndexedDataset(out / "train_rejected_loss_mask")
    assert len(chosen) == len(kept)
    for i, row in enumerate(kept[:10]):
        prompt = gpt2_tokenizer.encode(row["prompt"])
        tokens, mask = chosen[i].tolist(), chosen_mask[i].tolist()
        assert tokens == gpt2_tokenizer.encode(row["prompt"] + row["chosen"]) + [gpt2_tokenizer.eod_id]
        boundary = mask.index(1)
        assert boundary <= len(prompt) and tokens[:boundary] == prompt[:boundary]
        assert all(mask[boundary:]) and rejected_mask[i].tolist().count(1) > 0
    dataset = DPODataset(out, "train", seq_len=256, pad_id=gpt2_tokenizer.eod_id)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == (2, 256)
        assert batch[f"{side}_loss_mask"].dtype == torch.float32
    assert not torch.equal(batch["chosen_input_ids"], batch["rejected_input_ids"])


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_dpo_long_pairs(tmp_path, data_config, policy) -> None:
    rows = [
        {"prompt": "P:", "chosen": " good" * 50, "rejected": " bad"},
        {"prompt": "P:", "chosen": " a", "rejected": " b"},
    ]
    config = data_config(
        task_type="dpo",
        source={"path": str(_jsonl(tmp_path / "d.jsonl", rows))},
        max_seq_length=16,
        on_long_record=policy,
    )
    metadata = preprocess(config, progress=False)
    if policy == "truncate":
        assert metadata["counts"]["truncated"] == 1 and metadata["splits"]["train"]["documents"] == 2
        assert IndexedDataset(tmp_path / "out" / "train_chosen").sequence_lengths.max() == 17
    else:
        assert metadata["counts"]["dropped_too_long"] == 1 and metadata["splits"]["train"]["documents"] == 1

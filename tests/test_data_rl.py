"""RL data: the synthetic task's records, and ``task_type: rl`` prompts with the fields their rewards need."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ironcore.cli import main
from ironcore.config.base import InvalidValue
from ironcore.data.demo.inspect import inspect_dataset
from ironcore.data.demo.synthetic import write_task
from ironcore.data.preprocessing.indexed import IndexedDataset
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.preprocessing.tokenizer import Tokenizer
from ironcore.data.samples.build import build_dataset
from ironcore.data.samples.rl import PromptDataset
from ironcore.errors import ConfigError, DataError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the synthetic task ------------------------------------------------------------------------------------


def test_the_synthetic_task_is_seeded_correct_and_keeps_held_out_prompts_out_of_training(tmp_path) -> None:
    first = write_task(tmp_path / "a", "addition", 3000, 200, seed=7)
    write_task(tmp_path / "b", "addition", 3000, 200, seed=7)
    write_task(tmp_path / "c", "addition", 3000, 200, seed=8)
    for name in ("train.jsonl", "heldout.jsonl", "task.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    train, heldout = _rows(tmp_path / "a" / "train.jsonl"), _rows(tmp_path / "a" / "heldout.jsonl")
    assert first == {"task": "addition", "options": {"digits": 3}, "seed": 7, "reward": "exact",
                     "records": {"train": 3000, "heldout": 200}}
    assert len({r["prompt"] for r in heldout}) == 200
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    for row in train + heldout:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert int(a) + int(b) == int(row["answer"]) and max(len(a), len(b)) <= 3
    lengths = {len(r["prompt"].split("+")[0]) for r in train}
    assert lengths == {1, 2, 3}  # short and long operands both occur


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "additon"], "'additon' is not a synthetic task (addition) (did you mean 'addition'?)"),
    (["--task", "addition", "digts=2"], "digts=2: addition takes digits (did you mean 'digits'?)"),
    (["--task", "addition", "digits=two"], "digits=two: must be an integer"),
    (["--task", "addition", "--heldout", "200", "digits=1"], "--heldout 200: addition with {'digits': 1} has "
                                                              "fewer distinct prompts"),
    (["--task", "addition", "--train", "0"], "--train must be >= 1, got 0"),
])
def test_synthetic_mistakes_are_one_line(tmp_path, capsys, args, message) -> None:
    assert main(["synthetic", "--output", str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"ironcore synthetic: error: {message}"
    assert not (tmp_path / "out" / "train.jsonl").exists()


# ---- rl prompts --------------------------------------------------------------------------------------------


def test_rl_prompts_keep_their_reward_fields_in_shard_order(tmp_path, data_config, gpt2_tokenizer) -> None:
    write_task(tmp_path / "task", "addition", 300, 10, seed=1)
    config = data_config(task_type="rl", source={"path": str(tmp_path / "task" / "train.jsonl")},
                         reward_fields=["answer"], prompt_template="Q: {prompt}", valid_fraction=0.2)
    metadata = preprocess(config, progress=False)
    out = Path(config.output_dir)
    source = _rows(tmp_path / "task" / "train.jsonl")
    seen = []
    for split in ("train", "valid"):
        assert metadata["splits"][split]["fields"] == f"{split}_fields.jsonl"
        prompts = build_dataset(out, metadata, split, seq_len=config.max_seq_length, seed=0)
        assert isinstance(prompts, PromptDataset) and len(prompts) == metadata["splits"][split]["documents"]
        for i in range(len(prompts)):
            sample = prompts[i]
            text = sample.fields["prompt"]
            assert gpt2_tokenizer.decode(sample.ids.tolist()) == f"Q: {text}"  # no EOD: generation follows
            assert sample.fields == {"prompt": text, "answer": str(eval(text.removesuffix("=")))}
            seen.append(sample.fields)
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, source))  # every record, once


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_prompts_keep_their_end_or_are_dropped_and_counted(tmp_path, data_config, gpt2_tokenizer,
                                                                policy) -> None:
    rows = [{"prompt": "word " * 30 + "what is 2+2?", "answer": "4"}, {"prompt": "2+3=", "answer": "5"}]
    config = data_config(task_type="rl", source={"path": str(_jsonl(tmp_path / "p.jsonl", rows))},
                         reward_fields=["answer"], max_seq_length=8, on_long_record=policy)
    metadata = preprocess(config, progress=False)
    prompts = PromptDataset(config.output_dir, "train")
    if policy == "drop":
        assert metadata["counts"]["dropped_too_long"] == 1 and len(prompts) == 1
        assert prompts[0].fields["answer"] == "5"
    else:
        assert metadata["counts"]["truncated"] == 1 and len(prompts) == 2
        full = gpt2_tokenizer.encode(rows[0]["prompt"])
        assert prompts[0].ids.tolist() == full[-8:]  # the question at the end survives
        assert prompts[0].fields == rows[0]  # the reward sees the original prompt


def test_chat_prompts_end_with_the_generation_prompt(tmp_path, data_config, chat_tokenizer_dir) -> None:
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+3="}]
    rows = [{"messages": messages, "answer": "5"},
            {"messages": [*messages, {"role": "assistant", "content": "5"}], "answer": "5"}]
    config = data_config(task_type="rl", source={"path": str(_jsonl(tmp_path / "chat.jsonl", rows))},
                         fields={"messages": "messages"}, reward_fields=["answer"],
                         tokenizer={"path": str(chat_tokenizer_dir)}, max_seq_length=64)
    with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages' \(fields\.messages\) ends with an "
                                        "assistant turn"):
        preprocess(config, progress=False)
    config.on_bad_record = "skip"
    metadata = preprocess(config, progress=False, force=True)
    assert metadata["counts"]["bad_records"] == 1
    tokenizer = Tokenizer.from_path(chat_tokenizer_dir)
    (sample,) = PromptDataset(config.output_dir, "train")
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert sample.ids.tolist() == expected
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")
    assert sample.fields == {"prompt": messages, "answer": "5"}


def test_a_missing_reward_field_is_a_bad_record(tmp_path, data_config) -> None:
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}]
    config = data_config(task_type="rl", source={"path": str(_jsonl(tmp_path / "p.jsonl", rows))},
                         reward_fields=["answer"])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'answer' \(reward_fields\) is missing"):
        preprocess(config, progress=False)


@pytest.mark.parametrize(("values", "message"), [
    ({"task_type": "sft", "reward_fields": ["answer"]}, "only rl data keeps reward fields"),
    ({"task_type": "rl", "reward_fields": ["completions"]}, "'completions' is reserved or repeated"),
    ({"task_type": "rl", "reward_fields": ["answer", "answer"]}, "'answer' is reserved or repeated"),
])
def test_reward_fields_are_checked(tmp_path, data_config, values, message) -> None:
    with pytest.raises(InvalidValue, match=message) as caught:
        data_config(source={"path": str(tmp_path / "x.jsonl")}, **values)
    assert caught.value.key == "reward_fields"


def test_prompt_shards_and_fields_that_disagree_ask_for_a_rebuild(tmp_path, data_config) -> None:
    write_task(tmp_path / "task", "addition", 50, 5, seed=1)
    config = data_config(task_type="rl", source={"path": str(tmp_path / "task" / "train.jsonl")},
                         reward_fields=["answer"])
    metadata = preprocess(config, progress=False)
    out = Path(config.output_dir)
    with pytest.raises(ConfigError, match="RL prompts are not packed"):
        build_dataset(out, metadata, "train", seq_len=64, seed=0, packing=True)
    fields = out / "train_fields.jsonl"
    fields.write_text("".join(fields.read_text().splitlines(True)[:-1]))
    with pytest.raises(DataError, match=r"train_fields\.jsonl: 49 records for 50 prompts; rebuild the data"):
        PromptDataset(out, "train")
    fields.write_text('{"prompt": "1+1=", "answer"\n')
    with pytest.raises(DataError, match=r"train_fields\.jsonl: cannot read the prompts' fields"):
        PromptDataset(out, "train")


def test_inspection_shows_prompt_lengths_and_their_fields(tmp_path, data_config) -> None:
    write_task(tmp_path / "task", "addition", 50, 5, seed=1)
    config = data_config(task_type="rl", source={"path": str(tmp_path / "task" / "train.jsonl")},
                         reward_fields=["answer"])
    preprocess(config, progress=False)
    report = inspect_dataset(config.output_dir, num_samples=3)
    lengths = IndexedDataset(Path(config.output_dir) / "train_prompt").sequence_lengths
    assert report["splits"]["train"]["prompt_length"]["p100"] == int(np.max(lengths))
    page = (Path(config.output_dir) / "inspect" / "report.html").read_text()
    assert page.count("fields: {") == 3 and "&quot;answer&quot;: &quot;" in page

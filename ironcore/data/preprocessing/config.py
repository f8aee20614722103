"""The data config (``configs/data/*.yaml``): what to tokenize, how, and where to put it.

One file describes one preprocessed data set of any task type
(:mod:`ironcore.data.preprocessing.tasks`: pretrain, sft, dpo); ``ironcore preprocess
--config FILE`` builds it and training reads the result. Relative paths in a
data config are resolved against the current working directory (run
``ironcore`` from the project root), like every other IronCore path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ironcore.config.base import InvalidValue, field, from_dict
from ironcore.data.preprocessing.tasks import TASKS, task_spec
from ironcore.errors import ConfigError
from ironcore.files import read_yaml


@dataclass
class SourceConfig:
    """Where the raw records come from: local files or a Hugging Face hub data set."""

    path: str | None = field(
        None,
        help="local file, folder (all files below it) or glob; .jsonl/.json/.parquet/.csv are records, "
        "any other extension is UTF-8 text",
    )
    hf_name: str | None = field(None, help="hub data set name (needs network), e.g. Skylion007/openwebtext")
    split: str = field("train", help="split of a hub (or parquet/csv) data set")
    subset: str | None = field(None, help="configuration (subset) name of a hub data set")
    document_split: Literal["file", "paragraph", "line"] = field(
        "paragraph",
        help="how a text file is cut into documents: the whole file, blank-line paragraphs or lines",
    )

    def validate(self) -> None:
        if (self.path is None) == (self.hf_name is None):
            raise InvalidValue("", "give exactly one of 'path' or 'hf_name'")

    def describe(self) -> str:
        return self.path if self.path is not None else f"hf:{self.hf_name}[{self.split}]"


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level BPE on the source itself (saved beside the shards)."""

    vocab_size: int = field(8192, help="vocabulary size of the trained BPE, special tokens included")
    min_frequency: int = field(2, help="merges seen fewer times than this are not learned")

    def validate(self) -> None:
        if self.vocab_size < 257:
            raise InvalidValue("vocab_size", "must be at least 257 (256 bytes + EOD)")


@dataclass
class TokenizerConfig:
    """Which tokenizer to use: a file/folder, a hub name, or one trained on the source."""

    path: str | None = field(
        None,
        help="tokenizer.json, or a folder as transformers saves it (tokenizer.json, tokenizer_config.json, "
        "chat_template.jinja), or a checkpoint, run folder or checkpoints/latest (the tokenizer saved with it)",
    )
    hf_name: str | None = field(None, help="hub tokenizer name (needs network), e.g. gpt2")
    train: TrainTokenizerConfig | None = field(None, help="train a byte-level BPE on the source instead")
    eod_token: str | None = field(
        None,
        help="end-of-document token, appended to pretraining documents; default: <|endoftext|>-style special "
        "token, else eos_token",
    )
    eos_token: str | None = field(
        None,
        help="end of sequence, appended to sft/dpo examples (the model's end of turn, e.g. <|im_end|>); default: "
        "tokenizer_config.json's eos_token, else generation_config.json's eos_token_id beside the tokenizer, "
        "else the end-of-document token",
    )

    def validate(self) -> None:
        given = [name for name in ("path", "hf_name", "train") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidValue("", "give exactly one of 'path', 'hf_name' or 'train'")


@dataclass(kw_only=True)
class DataConfig:
    """One data set: source records -> tokenizer -> Megatron shards in ``output_dir``."""

    name: str = field(help="name of the data set (used in reports and metadata)")
    task_type: str = field("pretrain", help=" | ".join(TASKS) + " (see ironcore/data/preprocessing/tasks.py)")
    source: SourceConfig = field(help="the training records")
    fields: dict[str, str] = field(
        {},
        help="record field -> column: " + "; ".join(f"{t.name} {t.describe_layouts()}" for t in TASKS.values()),
    )
    tokenizer: TokenizerConfig = field(help="the tokenizer")
    max_seq_length: int = field(
        1024,
        help="training sequence length; pretrain documents are concatenated and cut into samples of it, "
        "sft/dpo records longer than it are truncated or dropped; rl: the prompt budget (longer prompts keep "
        "their last tokens, or are dropped)",
    )
    append_eod: bool = field(
        True,
        help="end every pretraining document with the end-of-document token and every sft/dpo example with the "
        "end of sequence (tokenizer.eos_token; trained), unless the example already ends with it (chat "
        "data: with its template's end-of-turn token) followed only by whitespace",
    )
    reward_fields: list[str] = field(
        [],
        help="rl: record columns kept beside the shards and passed, by name, to the reward functions with each "
        "prompt (e.g. [answer])",
    )
    prompt_template: str = field(
        "{prompt}",
        help="sft/dpo/rl text prompt fields: the text before the response, '{prompt}' standing for the "
        "prompt field (e.g. 'Question: {prompt}\\nAnswer:\\n'); not used for messages",
    )
    valid_fraction: float = field(0.0, help="share of records held out for validation (deterministic)")
    valid_source: SourceConfig | None = field(
        None, help="a separate validation source instead of valid_fraction"
    )
    output_dir: str = field(help="where the shards, metadata.json and reports are written")
    num_workers: int = field(2, help="tokenizer processes (0 = tokenize in this process)")
    on_bad_record: Literal["error", "skip"] = field(
        "error", help="malformed / non-UTF-8 records or missing fields: stop with an error, or skip and count"
    )
    on_long_record: Literal["truncate", "drop"] = field(
        "truncate",
        help="sft/dpo records longer than max_seq_length: cut at the end (rl prompts: at the start), or drop "
        "(both counted)",
    )

    def validate(self) -> None:
        if self.valid_source is not None and self.valid_fraction:
            raise InvalidValue("", "give either 'valid_fraction' or 'valid_source', not both")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise InvalidValue("valid_fraction", f"must be in [0, 1), got {self.valid_fraction}")
        if self.max_seq_length < 1:
            raise InvalidValue("max_seq_length", f"must be positive, got {self.max_seq_length}")
        if self.num_workers < 0:
            raise InvalidValue("num_workers", f"must be >= 0, got {self.num_workers}")
        if "{prompt}" not in self.prompt_template:
            raise InvalidValue("prompt_template", "must contain '{prompt}'")
        self.fields = task_spec(self.task_type, "task_type").resolve_fields(self.fields)
        if self.reward_fields and self.task_type != "rl":
            raise InvalidValue("reward_fields", f"only rl data keeps reward fields (task_type is {self.task_type})")
        for name in self.reward_fields:
            if name in ("prompt", "prompts", "completions") or self.reward_fields.count(name) > 1:
                raise InvalidValue("reward_fields", f"'{name}' is reserved or repeated")

    @property
    def is_chat(self) -> bool:
        return "messages" in self.fields


def load_data_config(path: str | Path, overrides: Sequence[str] = ()) -> DataConfig:
    """Read and validate a data config file; every problem is a ConfigError naming the file.

    ``overrides`` are ``dotted.key=value`` strings applied on top of the file
    (``num_workers=4``, ``tokenizer.train.vocab_size=4096``).
    """
    path = Path(path)
    data = read_yaml(path, "data config")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    try:
        return from_dict(DataConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None

"""Worker side of preprocessing: a chunk of raw records -> token (and loss-mask) arrays.

One :class:`Encoder` per kind of record (the task types of
:mod:`ironcore.data.preprocessing.tasks` pick theirs). Each returns an :class:`Encoded` batch of
flat numpy arrays (all examples concatenated, plus lengths) so the main process
writes a whole chunk with one ``write`` per shard.

Loss masks are aligned with the tokens: ``mask[i] == 1`` means token ``i`` is
a training target (the trainer uses ``mask[1:]`` for the shifted labels).

* prompt/response (SFT, DPO): the text is ``prompt_template`` with the prompt
  filled in, followed by the response; the tokens after the prompt's tokens
  (and the appended end of sequence) are trained. The prompt is tokenized on its own and
  checked to be a prefix of the full tokenization; when a BPE merge crosses the
  boundary it is not, and the trained part starts at the first differing token
  (counted as ``prompt_not_prefix`` and warned about).
* the end of an SFT/DPO example (``append_eod``) is the model's end of
  sequence, :attr:`Tokenizer.eos_id` (``<|im_end|>`` for ChatML models), not
  the end-of-document token that separates pretraining documents; it is not
  appended when the example already ends with it -- or, for chat data, with
  any special token (the template's end of turn) -- followed only by
  whitespace, so ChatML's ``...<|im_end|>\n`` never becomes
  ``<|im_end|>\n<|im_end|>`` (TRL appends nothing to conversational data).
* conversational DPO (TRL's preference format: ``chosen``/``rejected`` message
  lists, with a ``prompt`` message list or, in the ``{chosen, rejected}``
  layout, the longest common prefix of the two conversations as the prompt,
  as TRL's ``extract_prompt`` finds it): tokenized as TRL's ``DPOTrainer``
  does -- the prompt rendered with the generation prompt, prompt+chosen and
  prompt+rejected rendered whole; both sides train every token after the
  tokens the prompt shares with both (the template's trailing newline too).
  Text records may use the implicit layout as well. A record mixing text and
  messages is a bad record.
* DPO pairs are skipped, counted and warned about when a response is empty
  (``empty``), chosen equals rejected (``identical_pair``, also after
  truncation) or the prompt alone fills ``max_seq_length``
  (``prompt_too_long``); the counts land in ``metadata.json`` and the
  inspect report.
* messages (SFT): rendered with the tokenizer's chat template. For assistant
  turn ``k`` the trained tokens start where ``messages[:k]`` rendered with the
  generation prompt ends, and end where ``messages[:k+1]`` ends — or, for
  templates that render the last assistant turn differently (Qwen3 adds an
  empty think block, so that prefix is not a prefix of the whole), at the next
  turn's prompt. Either way the span stops after the first special token in it
  (the end-of-turn token, e.g. ``<|im_end|>``), so template whitespace after
  it is not trained. This needs no ``{% generation %}`` markers.
* prompts (RL): the prompt alone, ready for generation: ``prompt_template``
  filled in, or ``messages`` rendered with the generation prompt; no EOD.
  A prompt longer than ``max_seq_length`` keeps its *last* tokens (the
  question usually ends it) or is dropped; both counted. The original prompt
  and the ``reward_fields`` of each kept record go to a JSONL beside the
  shards, in shard order, for the reward functions.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ironcore.data.preprocessing.sources import Chunk, Records, read_records
from ironcore.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ironcore.data.preprocessing.config import DataConfig
    from ironcore.data.preprocessing.tokenizer import Tokenizer

# The streams of a preference pair: each response's tokens and loss mask.
PAIR_STREAMS = ("chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask")
MAX_WARNINGS_PER_CHUNK = 3


@dataclass
class Encoded:
    """A chunk's kept examples as flat arrays, and what happened to the others."""

    num_records: int  # records in the chunk, kept or not
    positions: np.ndarray  # ordinal (within the chunk) of each kept example
    arrays: dict[str, np.ndarray]  # stream -> all examples concatenated
    lengths: dict[str, np.ndarray]  # stream -> length of each example
    counts: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] | None = None  # per kept example, what is kept beside the shards (rl fields)


class Encoder:
    """Common plumbing: reading the chunk, pulling fields out of records, bad-record policy."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.fields = config.fields
        self.append_eod = config.append_eod
        self.skip_bad = config.on_bad_record == "skip"
        self.drop_long = config.on_long_record == "drop"
        self.max_tokens = config.max_seq_length + 1  # inputs and shifted labels of max_seq_length positions
        self.prompt_template = config.prompt_template

    def __call__(self, chunk: Chunk) -> Encoded:
        records = read_records(chunk, self.skip_bad)
        counts: Counter = Counter(records=records.num_records, bad_records=records.bad)
        warnings = records.errors[:MAX_WARNINGS_PER_CHUNK]
        encoded = self.encode(records, counts, warnings)
        encoded.num_records = records.num_records
        encoded.counts.update(counts)
        encoded.warnings = warnings
        return encoded

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        raise NotImplementedError

    def strings(self, records: Records, names: Sequence[str], counts: Counter, warnings: list[str]):
        """``(positions, locations, columns)`` of the records whose fields are all strings."""
        keep_positions, keep_locations = [], []
        columns: list[list[str]] = [[] for _ in names]
        for value, location, position in zip(
            records.values, records.locations, records.positions, strict=True
        ):
            row = []
            for name in names:
                column = self.fields[name]
                item = value.get(column)
                if not isinstance(item, str):
                    problem = "is missing" if item is None else f"is a {type(item).__name__}, not text"
                    self.bad(f"{location}: field '{column}' (fields.{name}) {problem}", counts, warnings)
                    break
                row.append(item)
            else:
                keep_positions.append(position)
                keep_locations.append(location)
                for column_values, item in zip(columns, row, strict=True):
                    column_values.append(item)
        return keep_positions, keep_locations, columns

    def bad(self, message: str, counts: Counter, warnings: list[str]) -> None:
        if not self.skip_bad:
            raise DataError(message)
        counts["bad_records"] += 1
        if len(warnings) < MAX_WARNINGS_PER_CHUNK:
            warnings.append(message)

    def fill_prompt(self, prompt: str) -> str:
        return self.prompt_template.replace("{prompt}", prompt)


class PretrainEncoder(Encoder):
    """Documents -> tokens (+ EOD). The hot path: one batched encode, numpy for the rest."""

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        if records.values and isinstance(records.values[0], str):
            texts, positions = records.values, records.positions
        else:
            positions, _, (texts,) = self.strings(records, ["text"], counts, warnings)
        nonempty = [i for i, text in enumerate(texts) if text.strip()]
        counts["empty"] += len(texts) - len(nonempty)
        if len(nonempty) < len(texts):
            texts = [texts[i] for i in nonempty]
            positions = [positions[i] for i in nonempty]
        ids, lengths = self.tokenizer.encode_batch_flat(texts)
        if self.append_eod:
            ids = np.insert(ids, np.cumsum(lengths), self.tokenizer.eod_id)
            lengths = lengths + 1
        return Encoded(0, np.asarray(positions, dtype=np.int64), {"tokens": ids}, {"tokens": lengths})


class _MaskedEncoder(Encoder):
    """Shared by SFT and DPO: prompt/response splitting, the end of sequence, truncation, flattening."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        super().__init__(tokenizer, config)
        # What closes a chat example: its template's end of turn, any special token (or the EOS itself).
        self.chat_closing = tokenizer.special_ids | {tokenizer.eos_id}

    def prompt_split(
        self, prompt_ids: list[int], full_ids: list[int], location: str, counts: Counter, warnings: list[str]
    ) -> tuple[list[int], list[int]]:
        """Tokens and loss mask of one prompt+response (+ EOD), response tokens trained."""
        boundary = _trained_from(
            prompt_ids, full_ids, counts, warnings,
            f"{location}: the prompt's tokens are not a prefix of prompt+response's (a merge across the boundary)",
        )
        mask = [0] * boundary + [1] * (len(full_ids) - boundary)
        return self.with_eod(full_ids, mask)

    def with_eod(
        self, tokens: list[int], mask: list[int], closing: frozenset[int] | set[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """The example with the model's end of sequence appended (trained), unless it already ends with a
        token of ``closing`` (default: the EOS) and whitespace: the model must learn to stop, once."""
        if self.append_eod and not self.ends_with(tokens, closing or {self.tokenizer.eos_id}):
            return [*tokens, self.tokenizer.eos_id], [*mask, 1]
        return tokens, mask

    def ends_with(self, tokens: list[int], closing: frozenset[int] | set[int]) -> bool:
        """Whether the last token that is not whitespace is one of ``closing``."""
        for token in reversed(tokens):
            if token in closing:
                return True
            if self.tokenizer.decode([token]).strip():
                return False
        return False

    def fit(self, tokens: list[int], mask: list[int], counts: Counter) -> tuple[list[int], list[int]] | None:
        """Apply the length limit; None when the example must be dropped (counted)."""
        if len(tokens) > self.max_tokens:
            if self.drop_long:
                counts["dropped_too_long"] += 1
                return None
            counts["truncated"] += 1
            tokens, mask = tokens[: self.max_tokens], mask[: self.max_tokens]
        if not any(mask):
            counts["no_trained_tokens"] += 1
            return None
        return tokens, mask


class SFTEncoder(_MaskedEncoder):
    """prompt/response records -> tokens + loss mask (response and EOD trained)."""

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        positions, locations, (prompts, responses) = self.strings(
            records, ["prompt", "response"], counts, warnings
        )
        kept, tokens, masks = [], [], []
        prompt_texts = [self.fill_prompt(prompt) for prompt in prompts]
        full_texts = [p + r for p, r in zip(prompt_texts, responses, strict=True)]
        encoded = self.tokenizer.encode_batch(prompt_texts + full_texts)
        n = len(prompts)
        for i in range(n):
            if not responses[i].strip():
                counts["empty"] += 1
                continue
            example = self.fit(
                *self.prompt_split(encoded[i], encoded[n + i], locations[i], counts, warnings), counts
            )
            if example is not None:
                kept.append(positions[i])
                tokens.append(example[0])
                masks.append(example[1])
        return _flatten(kept, {"tokens": tokens, "loss_mask": masks})


class ChatEncoder(_MaskedEncoder):
    """``messages`` records -> tokens + loss mask over the assistant turns (see the module doc)."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        super().__init__(tokenizer, config)
        tokenizer.require_chat_template()  # a problem of the tokenizer, not of any one record

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        column = self.fields["messages"]
        kept, tokens, masks = [], [], []
        for value, location, position in zip(
            records.values, records.locations, records.positions, strict=True
        ):
            messages = value.get(column)
            problem = _check_messages(messages)
            if problem:
                self.bad(f"{location}: field '{column}' (fields.messages) {problem}", counts, warnings)
                continue
            try:
                turns = self.mask_turns(messages, location, counts, warnings)
            except ConfigError as err:  # the template refuses this conversation (raise_exception, unknown role)
                self.bad(f"{location}: {err}", counts, warnings)
                continue
            example = self.fit(*turns, counts)
            if example is not None:
                kept.append(position)
                tokens.append(example[0])
                masks.append(example[1])
        return _flatten(kept, {"tokens": tokens, "loss_mask": masks})

    def mask_turns(
        self, messages: list[dict[str, Any]], location: str, counts: Counter, warnings: list[str]
    ) -> tuple[list[int], list[int]]:
        render = self.tokenizer.apply_chat_template
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        texts = [render(messages)]
        for k in turns:
            texts += [render(messages[:k], add_generation_prompt=True), render(messages[: k + 1])]
        full, *prefixes = self.tokenizer.encode_batch(texts)
        mask = [0] * len(full)
        starts = []
        for j in range(len(turns)):
            start = _trained_from(
                prefixes[2 * j], full, counts, warnings,
                f"{location}: the chat prompt before assistant turn {j + 1} does not tokenize to a prefix "
                "of the conversation",
            )
            starts.append(start)
        for j, start in enumerate(starts):
            end_ids = prefixes[2 * j + 1]
            if full[: len(end_ids)] == end_ids:
                end = len(end_ids)
            else:  # the template renders a final assistant turn differently: stop at the next turn
                end = starts[j + 1] if j + 1 < len(starts) else len(full)
            for i in range(start, end):
                mask[i] = 1
                if full[i] in self.tokenizer.special_ids:
                    break
        return self.with_eod(full, mask, self.chat_closing)


@dataclass
class _Pair:
    """One preference record, ready to tokenize: ``texts`` are the prompt, prompt+chosen, prompt+rejected."""

    position: int
    location: str
    chat: bool
    texts: tuple[str, str, str]
    chosen: str | list[dict[str, Any]]  # the response (text or messages), for the pair checks
    rejected: str | list[dict[str, Any]]


class DPOEncoder(_MaskedEncoder):
    """Preference records -> two token streams with their loss masks; text or TRL's conversational records,
    the prompt explicit (``prompt``) or implicit (shared by ``chosen`` and ``rejected``): see the module doc."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        super().__init__(tokenizer, config)
        self.names = [name for name in ("prompt", "chosen", "rejected") if name in self.fields]

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        pairs = []
        for value, location, position in zip(records.values, records.locations, records.positions, strict=True):
            pair = self.read_pair(value, location, position, counts, warnings)
            if pair is not None:
                pairs.append(pair)
        encoded = self.tokenizer.encode_batch([text for pair in pairs for text in pair.texts]) if pairs else []
        kept: list[int] = []
        streams: dict[str, list[list[int]]] = {name: [] for name in PAIR_STREAMS}
        for i, pair in enumerate(pairs):
            prompt_ids, chosen_ids, rejected_ids = encoded[3 * i: 3 * i + 3]
            problem = self.pair_problem(pair.chosen, pair.rejected, len(prompt_ids), counts)
            if problem:
                if len(warnings) < MAX_WARNINGS_PER_CHUNK:
                    warnings.append(f"{pair.location}: {problem}; pair skipped")
                continue
            if pair.chat:  # TRL: both sides train after the tokens the prompt shares with both
                start = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
                if start < len(prompt_ids):
                    counts["prompt_not_prefix"] += 1
                    if len(warnings) < MAX_WARNINGS_PER_CHUNK:
                        warnings.append(f"{pair.location}: the chat prompt does not tokenize to a prefix of the "
                                        f"conversations; training from token {start}")
                sides = [self.with_eod(ids, [0] * start + [1] * (len(ids) - start), self.chat_closing)
                         for ids in (chosen_ids, rejected_ids)]
            else:
                sides = [self.prompt_split(prompt_ids, ids, pair.location, counts, warnings)
                         for ids in (chosen_ids, rejected_ids)]
            fitted = [self.fit(*side, counts) for side in sides]
            if None in fitted:
                continue
            if fitted[0] == fitted[1]:  # truncation cut both responses down to the same tokens
                counts["identical_pair"] += 1
                if len(warnings) < MAX_WARNINGS_PER_CHUNK:
                    warnings.append(f"{pair.location}: chosen and rejected are identical after truncation; skipped")
                continue
            kept.append(pair.position)
            for name, values in zip(PAIR_STREAMS, (*fitted[0], *fitted[1]), strict=True):
                streams[name].append(values)
        return _flatten(kept, streams)

    def read_pair(
        self, value: Any, location: str, position: int, counts: Counter, warnings: list[str]
    ) -> _Pair | None:
        """The record's texts to tokenize, or None for a bad record (raised or counted, per on_bad_record)."""
        items, kinds = {}, {}
        for name in self.names:
            column = self.fields[name]
            item = value.get(column) if isinstance(value, dict) else None
            kind = _kind(item)
            if kind not in ("text", "messages"):
                hint = "; when chosen and rejected hold the prompt, set fields: {chosen: ..., rejected: ...}" \
                    if name == "prompt" and item is None else ""
                self.bad(f"{location}: field '{column}' (fields.{name}) {kind}{hint}", counts, warnings)
                return None
            items[name], kinds[name] = item, kind
        if len(set(kinds.values())) > 1:
            described = ", ".join(f"fields.{name} is {kind}" for name, kind in kinds.items())
            self.bad(f"{location}: a record is either text or messages, not both ({described})", counts, warnings)
            return None
        chat = kinds["chosen"] == "messages"
        if "prompt" in items:
            prompt, chosen, rejected = items["prompt"], items["chosen"], items["rejected"]
            if not chat:
                prompt = self.fill_prompt(prompt)
        else:
            prompt, chosen, rejected = extract_prompt(items["chosen"], items["rejected"])
        if not chat:
            return _Pair(position, location, False, (prompt, prompt + chosen, prompt + rejected), chosen, rejected)
        render = self.tokenizer.apply_chat_template
        self.tokenizer.require_chat_template()  # a problem of the tokenizer, not of this record
        try:
            texts = (render(prompt, add_generation_prompt=True), render(prompt + chosen), render(prompt + rejected))
        except ConfigError as err:  # the template refuses this conversation (raise_exception, unknown role)
            self.bad(f"{location}: {err}", counts, warnings)
            return None
        return _Pair(position, location, True, texts, chosen, rejected)

    def pair_problem(
        self, chosen: str | list[dict[str, Any]], rejected: str | list[dict[str, Any]], prompt_tokens: int,
        counts: Counter,
    ) -> str:
        """Why a pair must not be trained on (counted under its reason), or ''.

        A pair teaches nothing — or the wrong thing — when a response is empty,
        when both responses are the same (zero margin, pure noise in the
        gradient), or when the prompt alone fills the sequence so no response
        token would be scored.
        """
        empty = [side for side, response in (("chosen", chosen), ("rejected", rejected))
                 if not _content(response).strip()]
        if empty:
            counts["empty"] += 1
            return f"empty {empty[0]} response"
        if chosen == rejected:
            counts["identical_pair"] += 1
            return "chosen and rejected are identical"
        if prompt_tokens >= self.max_tokens:
            counts["prompt_too_long"] += 1
            return f"the prompt ({prompt_tokens} tokens) leaves no room for a response in max_seq_length"
        return ""


class RLEncoder(Encoder):
    """prompt or messages records -> prompt tokens, plus the record's reward fields (see the module doc)."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig) -> None:
        super().__init__(tokenizer, config)
        self.reward_fields = config.reward_fields
        self.chat = config.is_chat
        self.max_tokens = config.max_seq_length  # the prompt budget: completions are generated after it
        if self.chat:
            tokenizer.require_chat_template()

    def encode(self, records: Records, counts: Counter, warnings: list[str]) -> Encoded:
        name = "messages" if self.chat else "prompt"
        column = self.fields[name]
        kept, texts, sidecar = [], [], []
        for value, location, position in zip(records.values, records.locations, records.positions, strict=True):
            prompt = value.get(column)
            problem = _check_prompt_messages(prompt) if self.chat else _check_text(prompt)
            missing = [key for key in self.reward_fields if key not in value]
            if problem or missing:
                where = f"field '{column}' (fields.{name}) {problem}" if problem \
                    else f"field '{missing[0]}' (reward_fields) is missing"
                self.bad(f"{location}: {where}", counts, warnings)
                continue
            try:
                text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True) if self.chat \
                    else self.fill_prompt(prompt)
            except ConfigError as err:  # the template refuses this conversation (raise_exception, unknown role)
                self.bad(f"{location}: {err}", counts, warnings)
                continue
            kept.append(position)
            texts.append(text)
            sidecar.append({"prompt": prompt, **{key: value[key] for key in self.reward_fields}})
        prompts, keep = [], []
        for i, ids in enumerate(self.tokenizer.encode_batch(texts) if texts else []):
            if len(ids) > self.max_tokens:
                if self.drop_long:
                    counts["dropped_too_long"] += 1
                    continue
                counts["truncated"] += 1
                ids = ids[-self.max_tokens:]
            prompts.append(ids)
            keep.append(i)
        encoded = _flatten([kept[i] for i in keep], {"prompt": prompts})
        encoded.records = [sidecar[i] for i in keep]
        return encoded


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair (two texts or two message lists): the prompt is
    their longest common prefix, as TRL's ``extract_prompt`` finds it -- quirks included, so the same record
    trains the same tokens: without a difference the last item is left to the responses, and a text prompt
    gives its last space to the responses."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _kind(item: Any) -> str:
    """'text' or 'messages' for a usable preference field, else what is wrong with it."""
    if item is None:
        return "is missing"
    if isinstance(item, str):
        return "text"
    if isinstance(item, list) and item and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item
    ):
        return "messages"
    return f"is a {type(item).__name__}, not text or a non-empty list of {{role, content}} objects"


def _content(response: str | list[dict[str, Any]]) -> str:
    """A response's text: itself, or its messages' contents."""
    return response if isinstance(response, str) else "".join(m["content"] for m in response)


def _check_text(text: Any) -> str:
    """'' when ``text`` is a non-empty string, else what is wrong with it."""
    if text is None:
        return "is missing"
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not text"
    return "" if text.strip() else "is empty"


def _check_prompt_messages(messages: Any) -> str:
    """'' when ``messages`` is a conversation to continue with an assistant turn, else what is wrong."""
    if messages is None:
        return "is missing"
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return "must be a non-empty list of {role, content} objects"
    if messages[-1]["role"] == "assistant":
        return "ends with an assistant turn: a prompt is what comes before the completion"
    return ""


def _check_messages(messages: Any) -> str:
    """'' when ``messages`` is a usable conversation, else what is wrong with it."""
    if messages is None:
        return "is missing"
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return "must be a list of {role, content} objects"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn to train on"
    return ""


def _trained_from(prefix: list[int], full: list[int], counts: Counter, warnings: list[str], problem: str) -> int:
    """Where training starts: after ``prefix`` when ``full`` begins with it, else where they first differ
    (counted as prompt_not_prefix, with a warning saying ``problem``)."""
    if full[: len(prefix)] == prefix:
        return len(prefix)
    start = _common_prefix(prefix, full)
    counts["prompt_not_prefix"] += 1
    if len(warnings) < MAX_WARNINGS_PER_CHUNK:
        warnings.append(f"{problem}; training from token {start}")
    return start


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _flatten(positions: list[int], streams: dict[str, list[list[int]]]) -> Encoded:
    arrays, lengths = {}, {}
    for name, sequences in streams.items():
        lengths[name] = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        dtype = np.uint8 if name.endswith("loss_mask") else np.int32
        arrays[name] = np.fromiter(
            itertools.chain.from_iterable(sequences), dtype=dtype, count=int(lengths[name].sum())
        )
    return Encoded(0, np.asarray(positions, dtype=np.int64), arrays, lengths)

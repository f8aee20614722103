"""One tokenizer wrapper for the whole framework, over Hugging Face ``tokenizers``.

Everything that tokenizes (preprocessing, evaluation, generation) goes through
:class:`Tokenizer`, so a data set and a model agree on what a token id means:
:attr:`Tokenizer.identity` (the SHA-256 of the ``tokenizer.json``
serialization) is written into every preprocessed data set's metadata.

Sources: a ``tokenizer.json`` file; a folder holding ``tokenizer.json`` and,
optionally, ``tokenizer_config.json`` (EOS token and chat template); a hub
name (only with network access); or a byte-level BPE trained here with
:meth:`Tokenizer.train_bpe`. The fast Rust tokenizer does all encoding; the
``transformers`` tokenizer is loaded lazily and only to render chat templates.

Text is always encoded with ``add_special_tokens=False``: IronCore adds the
end-of-document token itself, and chat templates spell out their own special
tokens (which the tokenizer parses as such).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ironcore.errors import ConfigError

# Special tokens that mark the end of a document in common vocabularies, in order of preference
# (a chat model's eos_token, e.g. Qwen's <|im_end|>, ends a turn, not a document).
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
TRAINED_EOD = "<|endoftext|>"


class Tokenizer:
    """A fast tokenizer plus what IronCore needs around it (EOD id, identity, chat template)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        eod_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self._hf = None
        self.eod_token = eod_token or self._default_eod()
        eod_id = backend.token_to_id(self.eod_token)
        if eod_id is None:
            raise ConfigError(f"tokenizer has no token '{self.eod_token}' (tokenizer.eod_token)")
        self.eod_id: int = eod_id

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path, eod_token: str | None = None) -> Tokenizer:
        """Load a ``tokenizer.json`` file or a folder holding one (+ ``tokenizer_config.json``)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"tokenizer path {path} does not exist")
        json_path, config_path = tokenizer_files(path)
        if not json_path.exists():
            raise ConfigError(
                f"{path}: no tokenizer.json (only fast tokenizers are supported; save one with "
                "transformers' tokenizer.save_pretrained)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as err:  # the Rust loader raises a bare Exception
            raise ConfigError(f"{json_path}: cannot load tokenizer: {err}") from None
        config = None
        if config_path is not None and config_path.exists():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ConfigError(f"{config_path}: cannot read tokenizer config: {err}") from None
        return cls(backend, config, eod_token)

    @classmethod
    def from_hub(cls, name: str, eod_token: str | None = None) -> Tokenizer:
        """Load a tokenizer by hub name through ``transformers`` (needs network or a warm cache)."""
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(name)
        except Exception as err:  # network, missing repo, missing dependency: all one-line errors
            raise ConfigError(f"cannot load tokenizer '{name}' from the hub: {err}") from None
        if not getattr(hf, "is_fast", False):
            raise ConfigError(f"tokenizer '{name}' has no fast (tokenizer.json) version")
        config = {"eos_token": hf.eos_token, "chat_template": getattr(hf, "chat_template", None)}
        tokenizer = cls(hf.backend_tokenizer, config, eod_token)
        tokenizer._hf = hf
        return tokenizer

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE (any byte sequence encodes; ``<|endoftext|>`` is EOD)."""
        from tokenizers import decoders, models, pre_tokenizers, processors, trainers

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[TRAINED_EOD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(
            backend, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": TRAINED_EOD}, TRAINED_EOD
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` (+ ``tokenizer_config.json``) so :meth:`from_path` reloads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        if self.config:
            (directory / "tokenizer_config.json").write_text(
                json.dumps(self.config, indent=2), encoding="utf-8"
            )
        return directory

    def __getstate__(self) -> dict[str, Any]:
        # The transformers tokenizer is a cache; worker processes reload it on demand.
        return {**self.__dict__, "_hf": None}

    # ---- facts -----------------------------------------------------------------------------

    @cached_property
    def identity(self) -> str:
        """SHA-256 of the ``tokenizer.json`` serialization: equal ids mean equal tokenizers."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (an upper bound on every id)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (``<|im_end|>``, ``<|endoftext|>``, …)."""
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def _default_eod(self) -> str:
        specials = {tok.content for tok in self.backend.get_added_tokens_decoder().values() if tok.special}
        for candidate in EOD_CANDIDATES:
            if candidate in specials:
                return candidate
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):  # older tokenizer_config.json files store AddedToken dicts
            eos = eos.get("content")
        if eos:
            return eos
        raise ConfigError("cannot tell the tokenizer's end-of-document token; set tokenizer.eod_token")

    # ---- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (the Rust tokenizer batches and, unless disabled, parallelises)."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: all texts' ids concatenated (int32) and each text's length (int64).

        This is the preprocessing hot path: one flat array per batch, no per-text numpy objects.
        """
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` with the tokenizer's chat template (text, not ids)."""
        if not self.chat_template:
            raise ConfigError(
                "the tokenizer has no chat template: use a tokenizer folder whose tokenizer_config.json "
                "has one (or prompt/response fields)"
            )
        if self._hf is None:
            self._hf = self._load_hf()
        return self._hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _load_hf(self):
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise ConfigError(
                "chat templates need the 'transformers' package (pip install transformers)"
            ) from None
        # A copy: transformers configures padding/truncation on the object it is given.
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(self.backend.to_str()))
        hf.chat_template = self.chat_template
        for key in ("eos_token", "bos_token", "pad_token"):
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                setattr(hf, key, value)
        return hf


def tokenizer_files(path: str | Path) -> tuple[Path, Path | None]:
    """``(tokenizer.json, tokenizer_config.json or None)`` for a tokenizer file or folder."""
    path = Path(path)
    if path.is_dir():
        return path / "tokenizer.json", path / "tokenizer_config.json"
    return path, None


"""One tokenizer wrapper for the whole framework, over Hugging Face ``tokenizers``.

Everything that tokenizes (preprocessing, evaluation, generation) goes through
:class:`Tokenizer`, so a data set and a model agree on what a token id means:
:attr:`Tokenizer.identity` (the SHA-256 of the ``tokenizer.json``
serialization) is written into every preprocessed data set's metadata.

Sources: a ``tokenizer.json`` file; a folder as ``transformers`` saves it
(``tokenizer.json``, ``tokenizer_config.json`` with the special tokens, and the
chat template in ``chat_template.jinja`` -- or, in older folders, in
``tokenizer_config.json`` -- plus any named templates in
``additional_chat_templates/NAME.jinja``); a hub name (only with network
access); or a byte-level BPE trained here with :meth:`Tokenizer.train_bpe`.
:meth:`Tokenizer.save` writes the same layout, so a template survives a round
trip byte for byte. The fast Rust tokenizer does all encoding; chat templates
render with jinja2 (:mod:`ironcore.data.preprocessing.chat_template`), ``transformers`` is
not needed.

Text is always encoded with ``add_special_tokens=False``: IronCore adds the
end-of-document token itself, and chat templates spell out their own special
tokens (which the tokenizer parses as such).

Two end tokens: the *end-of-document* token (:attr:`Tokenizer.eod_id`,
``<|endoftext|>``) separates pretraining documents; the *end of sequence*
(:attr:`Tokenizer.eos_id`, a chat model's end of turn such as ``<|im_end|>``) is
what the model emits to stop, so SFT and DPO examples end with it. The EOS is
the config's ``eos_token``, else the ``eos_token_id`` of a
``generation_config.json`` beside the tokenizer (an HF model folder), else the
end-of-document token; :attr:`Tokenizer.eos_origin` says which.
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

from ironcore.checkpoints import pointers  # torch-free: finds a run's checkpoint folder
from ironcore.data.preprocessing import chat_template
from ironcore.errors import CheckpointError, ConfigError, DataError
from ironcore.files import read_json, read_text

# Special tokens that mark the end of a document in common vocabularies, in order of preference
# (a chat model's eos_token, e.g. Qwen's <|im_end|>, ends a turn, not a document).
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
TRAINED_EOD = "<|endoftext|>"
# Where transformers keeps chat templates beside tokenizer.json (its CHAT_TEMPLATE_FILE / _DIR).
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT_TEMPLATE = "default"
GENERATION_CONFIG = "generation_config.json"  # an HF model folder's generation defaults (its end tokens)


class Tokenizer:
    """A fast tokenizer plus what IronCore needs around it (EOD id, identity, chat template)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        eod_token: str | None = None,
        chat_templates: dict[str, str] | None = None,
        eos_token: str | None = None,
        generation_eos_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        # Templates by name ("default" is the one apply_chat_template uses); the config keeps none of them.
        self.chat_templates = {**_config_templates(self.config.pop("chat_template", None)), **(chat_templates or {})}
        self.eod_token = eod_token or self._default_eod()
        eod_id = backend.token_to_id(self.eod_token)
        if eod_id is None:
            raise ConfigError(f"tokenizer has no token '{self.eod_token}' (tokenizer.eod_token)")
        self.eod_id: int = eod_id
        self.eos_token, self.eos_id, self.eos_origin = self._end_of_sequence(eos_token, generation_eos_id)
        self.chat_template_origin: str | None = None  # the file the default template came from (for errors)

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_path(cls, path: str | Path, eod_token: str | None = None, eos_token: str | None = None) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or a folder holding one with its config and chat templates, or the
        one saved with a checkpoint (a run folder, its ``checkpoints/`` folder or ``latest``: see
        :func:`tokenizer_source`). A folder's ``generation_config.json`` supplies the EOS when the config
        names none."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"tokenizer path {path} does not exist")
        path = tokenizer_source(path)
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
            config = read_json(config_path, "tokenizer config", ConfigError)
        files = _template_files(path) if path.is_dir() else {}
        generation_eos = _generation_eos_id(path / GENERATION_CONFIG) if path.is_dir() else None
        tokenizer = cls(backend, config, eod_token, files, eos_token, generation_eos)
        if DEFAULT_TEMPLATE in files:
            tokenizer.chat_template_origin = str(path / CHAT_TEMPLATE_FILE)
        elif tokenizer.chat_template is not None:
            tokenizer.chat_template_origin = str(config_path)
        return tokenizer

    @classmethod
    def from_hub(cls, name: str, eod_token: str | None = None, eos_token: str | None = None) -> Tokenizer:
        """Load a tokenizer by hub name through ``transformers`` (needs network or a warm cache)."""
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(name)
        except Exception as err:  # network, missing repo, missing dependency: all one-line errors
            raise ConfigError(f"cannot load tokenizer '{name}' from the hub: {err}") from None
        if not getattr(hf, "is_fast", False):
            raise ConfigError(f"tokenizer '{name}' has no fast (tokenizer.json) version")
        config = {**hf.special_tokens_map, "chat_template": getattr(hf, "chat_template", None)}
        return cls(hf.backend_tokenizer, config, eod_token, eos_token=eos_token)

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
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat templates as ``transformers`` does.

        The default template goes to ``chat_template.jinja``, named ones to
        ``additional_chat_templates/NAME.jinja``, exactly as they were read.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        if self.config:
            (directory / "tokenizer_config.json").write_text(
                json.dumps(self.config, indent=2), encoding="utf-8"
            )
        for name, template in self.chat_templates.items():
            if name == DEFAULT_TEMPLATE:
                path = directory / CHAT_TEMPLATE_FILE
            else:
                path = directory / CHAT_TEMPLATE_DIR / f"{name}.jinja"
                path.parent.mkdir(exist_ok=True)
            path.write_text(template, encoding="utf-8", newline="")
        return directory

    # ---- facts -----------------------------------------------------------------------------

    @cached_property
    def identity(self) -> str:
        """SHA-256 of the ``tokenizer.json`` serialization: equal ids mean equal tokenizers."""
        return _identity(self.backend)

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
        """The default chat template (what ``apply_chat_template`` renders), or None."""
        return self.chat_templates.get(DEFAULT_TEMPLATE)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template may read (``bos_token``, ``eos_token``, …), as text."""
        named = {}
        for name in chat_template.SPECIAL_TOKENS:
            value = self.config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if value:
                named[name] = str(value)
        return named

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

    def _end_of_sequence(self, override: str | None, generation_eos_id: int | None) -> tuple[str, int, str]:
        """``(token, id, where it came from)`` of the EOS: ``override``, the config's ``eos_token``, the
        ``generation_config.json`` id, else the end-of-document token."""
        if override:
            found = self.backend.token_to_id(override)
            if found is None:
                raise ConfigError(f"tokenizer has no token '{override}' (tokenizer.eos_token)")
            return override, found, "tokenizer.eos_token"
        named = self.special_tokens.get("eos_token")
        found = None if named is None else self.backend.token_to_id(named)
        if found is not None:
            return named, found, "tokenizer_config.json eos_token"
        if generation_eos_id is not None and self.backend.id_to_token(generation_eos_id) is not None:
            return self.backend.id_to_token(generation_eos_id), generation_eos_id, f"{GENERATION_CONFIG} eos_token_id"
        return self.eod_token, self.eod_id, "the end-of-document token"

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

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **variables: Any
    ) -> str:
        """Render ``messages`` with the default chat template (text, not ids), as ``transformers`` would.

        ``variables`` reach the template too (e.g. ``enable_thinking=False``).
        """
        return chat_template.render(self.require_chat_template(), messages, self.special_tokens,
                                    add_generation_prompt, origin=self.chat_template_origin, **variables)

    def require_chat_template(self) -> str:
        """The default chat template, or the one-line error that says where one comes from."""
        if not self.chat_template:
            raise ConfigError(
                "the tokenizer has no chat template: use a tokenizer folder with chat_template.jinja (or a "
                "tokenizer_config.json with chat_template), or prompt/response fields"
            )
        return self.chat_template


def tokenizer_source(path: str | Path) -> Path:
    """Where the tokenizer of ``path`` is: ``path`` itself (``tokenizer.json`` or a folder holding one), else
    the checkpoint folder that a run folder, a run's ``checkpoints/`` folder or a pointer file
    (``checkpoints/latest``) names, resolved as ``init.init_from``, ``eval`` and ``convert`` resolve them."""
    path = Path(path)
    pointer = path.name == pointers.LATEST and path.is_file()
    run = path.is_dir() and not (path / "tokenizer.json").is_file() and any(
        (path / name).is_file() for name in (pointers.LATEST, f"checkpoints/{pointers.LATEST}"))
    if not (pointer or run):  # a tokenizer file or folder, or a checkpoint folder (it holds its tokenizer.json)
        return path
    try:
        return pointers.resolve(path)
    except CheckpointError as err:
        raise ConfigError(f"tokenizer path {path}: {err}") from None


def definition_files(path: str | Path) -> list[Path]:
    """The files that define a tokenizer file or folder, as far as they exist: ``tokenizer.json``,
    ``tokenizer_config.json`` and the chat templates (what a fingerprint reads, what a copy takes); a run
    folder or ``latest`` pointer stands for its checkpoint's (:func:`tokenizer_source`)."""
    path = tokenizer_source(path) if Path(path).exists() else Path(path)
    if not path.is_dir():
        return [path] if path.is_file() else []
    candidates = [path / "tokenizer.json", path / "tokenizer_config.json", path / CHAT_TEMPLATE_FILE,
                  *sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja"))]
    return [p for p in candidates if p.is_file()]


def tokenizer_files(path: str | Path) -> tuple[Path, Path | None]:
    """``(tokenizer.json, tokenizer_config.json or None)`` for a tokenizer file or folder."""
    path = Path(path)
    if path.is_dir():
        return path / "tokenizer.json", path / "tokenizer_config.json"
    return path, None


def _config_templates(value: Any) -> dict[str, str]:
    """Templates kept in ``tokenizer_config.json``: one string, or a list of ``{name, template}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE: value}
    if isinstance(value, dict):  # transformers' own form of several templates
        return dict(value)
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ConfigError("tokenizer_config.json: chat_template must be a string or a list of {name, template}")


def _template_files(folder: Path) -> dict[str, str]:
    """``chat_template.jinja`` (the default) and ``additional_chat_templates/*.jinja``, read byte for byte;
    like ``transformers``, they take priority over templates in ``tokenizer_config.json``."""
    found = {}
    for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        found[path.name.removesuffix(".jinja")] = _read_exactly(path)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        found[DEFAULT_TEMPLATE] = _read_exactly(folder / CHAT_TEMPLATE_FILE)
    return found


def _read_exactly(path: Path) -> str:
    """The file's text with its line endings as they are (``read_text`` would turn CRLF into LF)."""
    return read_text(path, "chat template", ConfigError, keep_line_endings=True)


def _generation_eos_id(path: Path) -> int | None:
    """The first ``eos_token_id`` of a ``generation_config.json`` (HF lists several for Llama-3), if any."""
    if not path.is_file():
        return None
    eos = read_json(path, "generation config", ConfigError).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None and not isinstance(eos, int):
        raise ConfigError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return eos


def _identity(backend: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def folder_identity(folder: str | Path) -> str | None:
    """:attr:`Tokenizer.identity` of the ``tokenizer.json`` saved in a model folder; None when it has none."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a tokenizer file")
    try:
        return _identity(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as err:  # the Rust loader raises a bare Exception
        raise ConfigError(f"{path}: cannot load tokenizer: {err}") from None


def check_data_set_tokenizer(output_dir: str | Path, identity: str) -> None:
    """The ``tokenizer.json`` saved with a data set must be the one that made it (``identity``, from its
    metadata): checkpoints copy it from there, and generation and evaluation later trust it."""
    path = Path(output_dir) / "tokenizer.json"
    found = folder_identity(output_dir)
    if found is None:
        raise DataError(f"{path}: missing: the data set is incomplete (rebuild it with ironcore preprocess --force)")
    if found != identity:
        raise DataError(f"{path}: not the tokenizer that made this data set (identity {found[:12]} vs {identity[:12]} "
                        "in its metadata); rebuild it with ironcore preprocess --force")


def check_same_tokenizer(model_folder: str | Path, identity: str, other: str, override: str) -> None:
    """Refuse, in one line, a model whose saved tokenizer is not ``other`` (of ``identity``), e.g. the
    tokenizer that made a data set's ids.

    Same vocabulary size is not enough: two BPEs of 8,192 tokens give the same
    ids to different text, and a model fed the other one's ids trains and
    evaluates on garbage without any error. A model saved without its
    tokenizer is not checked. ``override`` names the switch that skips the check.
    """
    theirs = folder_identity(model_folder)
    if theirs is not None and theirs != identity:
        raise ConfigError(
            f"{model_folder}: the tokenizer saved with it is not {other} (identity {theirs[:12]} vs {identity[:12]}): "
            f"the token ids would mean other text; use {override} if they really are the same"
        )

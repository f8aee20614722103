"""Generation settings of a model folder: its ``generation_config.json``, under the caller's explicit choices.

HF model folders (and IronCore checkpoints converted from them, or trained
from them) carry a ``generation_config.json``: the end-of-sequence id(s) --
an int or a list, e.g. Llama-3's three end tokens --, the BOS and padding
ids, and the sampling defaults the model was published with. The rules
follow ``transformers``' ``generate``:

* ``do_sample`` false or absent: greedy, whatever temperature the file
  names; true: sampling with its ``temperature`` / ``top_k`` / ``top_p``,
  defaulting to 1.0 / 50 / 1.0 as ``transformers`` does;
* every explicit setting (a command-line flag, an argument) wins over the
  file, one by one;
* generation stops at every id of ``eos_token_id``, at the tokenizer's
  end-of-document token and at its declared EOS;
* an empty prompt starts from ``bos_token_id`` (else the end-of-document
  token, where a new document starts). Padding is masked in IronCore's
  decoding, so ``pad_token_id`` changes no output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironcore.errors import ConfigError
from ironcore.files import read_json

if TYPE_CHECKING:
    from ironcore.data.preprocessing.tokenizer import Tokenizer

GENERATION_CONFIG = "generation_config.json"
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass(frozen=True)
class GenerationConfig:
    """What a ``generation_config.json`` says (empty when a folder has none)."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def read(cls, folder: str | Path) -> GenerationConfig:
        """The folder's ``generation_config.json``; an empty one when there is none, a one-line error when bad."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.exists():
            return cls()
        data = read_json(path, "generation config", ConfigError)
        eos = data.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        if not all(isinstance(i, int) for i in eos_ids):
            raise ConfigError(f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        return cls(
            eos_token_ids=eos_ids,
            bos_token_id=data.get("bos_token_id"),
            pad_token_id=data.get("pad_token_id"),
            do_sample=bool(data.get("do_sample", False)),
            temperature=data.get("temperature"),
            top_k=data.get("top_k"),
            top_p=data.get("top_p"),
            max_new_tokens=data.get("max_new_tokens"),
        )

    def sampling(
        self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
    ) -> dict[str, Any]:
        """``temperature``, ``top_k``, ``top_p`` for :func:`ironcore.inference.generate`: each explicit value,
        else this file's (when it samples), else greedy."""
        if self.do_sample:
            file = {name: getattr(self, name) if getattr(self, name) is not None else default
                    for name, default in HF_SAMPLING_DEFAULTS.items()}
        else:
            file = {"temperature": 0.0, "top_k": None, "top_p": None}
        chosen = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        return {name: chosen[name] if chosen[name] is not None else file[name] for name in chosen}


def stop_ids(tokenizer: Tokenizer, eos_token_ids: tuple[int, ...] = ()) -> list[int]:
    """Every id that ends a completion: the end-of-document token, the tokenizer's declared EOS (chat models)
    and the ids of ``generation_config.json``'s ``eos_token_id`` (Llama-3 has three)."""
    ids = [tokenizer.eod_id]
    eos = tokenizer.special_tokens.get("eos_token")
    eos_id = tokenizer.backend.token_to_id(eos) if eos else None
    for token in (eos_id, *eos_token_ids):
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def completion_texts(tokenizer: Tokenizer, completions: list[list[int]], stops: list[int]) -> list[str]:
    """The text of each generated completion: its ending stop token and special tokens left out."""
    return tokenizer.backend.decode_batch(
        [ids[:-1] if ids and ids[-1] in stops else ids for ids in completions], skip_special_tokens=True
    )

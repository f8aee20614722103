"""``ironcore generate``: continue prompts with a checkpoint's model (KV-cache decoding, ironcore.inference).

One ``--prompt`` is streamed to the terminal token by token; ``--prompts-file``
runs batches of prompts (ragged lengths are fine) and prints each completion;
``--json`` prints one JSON object per prompt instead. The tokenizer is the one
saved with the model (``tokenizer.json`` in the checkpoint or HF folder) unless
``--tokenizer`` names another. The model folder's ``generation_config.json``
(:mod:`ironcore.inference.settings`) supplies the end tokens, the BOS of an
empty prompt and the sampling defaults; every flag given wins over it.
Without one, decoding is greedy and stops at the tokenizer's end-of-text and
EOS tokens (``--ignore-eos``: at none).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ironcore.errors import ConfigError, DataError
from ironcore.files import read_text

if TYPE_CHECKING:
    from ironcore.data.preprocessing.tokenizer import Tokenizer
    from ironcore.models.transformer import TransformerModel

DEFAULT_MAX_NEW_TOKENS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint or an HF model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="IronCore checkpoint or run folder (uses its latest), or an HF checkpoint folder"
    )
    source.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + *.safetensors)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="text to continue (streamed to the terminal)")
    prompts.add_argument(
        "--prompts-file", help='one prompt per line, or .jsonl: a string or {"prompt": ...} per line'
    )
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the one saved with the model)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: generation_config.json's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default: generation_config.json's sampling settings, else greedy")
    parser.add_argument("--top-k", type=int, default=None, help="default: generation_config.json's (when it samples)")
    parser.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's (when it samples)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at any end token")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts of --prompts-file decoded together")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--decode", default="auto", choices=["auto", "eager", "static", "graph", "compile"],
                        help="decode step (docs/inference.md): auto picks CUDA graphs on a GPU, and an inductor-"
                             "compiled step on a CPU for long generations")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="use --tokenizer although it differs from the tokenizer saved with the model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore import inference
    from ironcore.inference.generate import decode_mode
    from ironcore.inference.settings import GenerationConfig, stop_ids

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    texts = [args.prompt] if args.prompt is not None else read_prompts(Path(args.prompts_file))
    folder = source_of(args)[1]
    generation = GenerationConfig.read(folder)
    sampling = generation.sampling(args.temperature, args.top_k, args.top_p)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (
        generation.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    try:
        inference.check_sampling(max_new_tokens, **sampling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if generation.do_sample and args.temperature is None:
        print(f"[sampling as {folder / 'generation_config.json'} says: {sampling}; --temperature 0 is greedy]",
              file=sys.stderr)
    tokenizer = load_tokenizer(args)
    model = load(args)
    prompts = [prompt_ids(tokenizer, text, generation.bos_token_id) for text in texts]
    try:
        decode_mode(args.decode, model, 1, [max_new_tokens])
    except ValueError as err:
        raise ConfigError(f"--decode: {err}") from None
    limit, vocab = model.config.max_position_embeddings, model.config.vocab_size
    for number, ids in enumerate(prompts, start=1):
        if max(ids) >= vocab:
            raise DataError(f"prompt {number}: token id {max(ids)} is outside the model's vocabulary of {vocab}: "
                            "the tokenizer does not belong to this model")
        if len(ids) + max_new_tokens - 1 > limit:
            raise DataError(
                f"prompt {number}: {len(ids)} tokens + {max_new_tokens} new tokens exceed the model's "
                f"{limit} positions"
            )
    options = dict(
        max_new_tokens=max_new_tokens,
        **sampling,
        eos_token_id=None if args.ignore_eos else stop_ids(tokenizer, generation.eos_token_ids),
        seed=args.seed,
        decode=args.decode,
    )
    if args.prompt is not None and not args.json:
        _stream(model, tokenizer, args.prompt, prompts[0], options)
        return 0
    for start in range(0, len(texts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        outputs = inference.generate(model, prompts[batch], **options)
        for text, ids in zip(texts[batch], outputs):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            if args.json:
                stopped = bool(ids) and ids[-1] in (options["eos_token_id"] or ())
                record = {"prompt": text, "completion": completion, "token_ids": ids,
                          "finish_reason": "stop" if stopped else "length"}  # fmt: skip
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                print(f"{text}{completion}\n", flush=True)
    return 0


def _stream(model: TransformerModel, tokenizer: Tokenizer, text: str, ids: list[int], options: dict) -> None:
    """Print ``text``, then its continuation as it is generated; a speed line on stderr."""
    from ironcore.inference import DecodeReport, stream

    print(text, end="", flush=True)
    started, count, report = time.perf_counter(), 0, DecodeReport()
    # A stopped row reads -1 (on a GPU a few such steps may follow the stop token).
    tokens = itertools.takewhile(lambda t: t >= 0, (int(step[0]) for step in stream(model, [ids], report=report,
                                                                                    **options)))
    for piece in _pieces(tokenizer, tokens):
        count += 1
        print(piece, end="", flush=True)
    print(flush=True)
    seconds = time.perf_counter() - started
    compiled = f", {report.compile_seconds:.1f} s of it compiling" if report.compile_seconds else ""
    print(f"[{count} tokens in {seconds:.2f} s{compiled}, {count / max(seconds, 1e-9):.1f} tokens/s, "
          f"decode {report.path}]", file=sys.stderr)


def _pieces(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """The new text after each token (one piece per token, possibly empty).

    Decoding the whole completion each time (not token by token) keeps
    multi-byte characters and merged spaces right; a piece is held back while
    the text ends in an incomplete UTF-8 character.
    """
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown):
            yield ""
            continue
        yield text[len(shown) :]
        shown = text


def read_prompts(path: Path) -> list[str]:
    """Prompts of a text file (one per non-empty line) or a .jsonl file (a string or {"prompt": ...} per line)."""
    lines = read_text(path, "prompts file").splitlines()  # missing, a folder, not UTF-8 (the byte): one line
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON: {err.msg}") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise DataError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def source_of(args: argparse.Namespace) -> tuple[str, Path]:
    """The model source of ``--checkpoint`` (any source) or ``--from-hf`` (an HF folder), and its folder."""
    from ironcore.checkpoints.load import locate

    source = args.checkpoint if args.checkpoint is not None else args.from_hf
    return source, locate(source, expect="hf" if args.from_hf is not None else None)[1]


def load(args: argparse.Namespace) -> TransformerModel:
    """The model of ``--checkpoint`` or ``--from-hf``, in eval mode on the chosen device."""
    import torch

    from ironcore.checkpoints.load import load_language_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_language_model(source_of(args)[0], device)


def load_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """``--tokenizer``, else the tokenizer saved with the model (in its checkpoint or HF folder)."""
    from ironcore.data.preprocessing.tokenizer import Tokenizer, check_same_tokenizer

    folder = source_of(args)[1]
    if args.tokenizer is not None:
        tokenizer = Tokenizer.from_path(args.tokenizer)
        if not args.allow_other_tokenizer:
            check_same_tokenizer(folder, tokenizer.identity, f"--tokenizer {args.tokenizer}",
                                 "--allow-other-tokenizer")
        return tokenizer
    if not (folder / "tokenizer.json").exists():
        raise ConfigError(f"{folder}: no tokenizer.json saved with the model; pass --tokenizer PATH")
    return Tokenizer.from_path(folder)


def prompt_ids(tokenizer: Tokenizer, text: str, bos_token_id: int | None = None) -> list[int]:
    """Token ids of a prompt, with the special tokens the tokenizer adds itself (e.g. Llama's BOS).

    An empty prompt becomes the model's BOS (``generation_config.json``), else the end-of-document token:
    generation from scratch starts where a new document would.
    """
    fallback = bos_token_id if bos_token_id is not None else tokenizer.eod_id
    return tokenizer.backend.encode(text, add_special_tokens=True).ids or [fallback]


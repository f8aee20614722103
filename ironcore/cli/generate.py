"""``ironcore generate``: continue prompts with a checkpoint's model (KV-cache decoding, ironcore.inference).

One ``--prompt`` is streamed to the terminal token by token; ``--prompts-file``
runs batches of prompts (ragged lengths are fine) and prints each completion;
``--json`` prints one JSON object per prompt instead. A prompt is raw text to
continue, unless ``--chat`` makes it a user turn (after ``--system``) or a
.jsonl line gives ``{"messages": [...]}``: those are rendered with the
tokenizer's chat template, ready for the assistant's reply (an instruct model
fed raw text often ends its turn at once, so a raw prompt to a tokenizer with
a template gets a hint on stderr). ``ironcore chat`` (:mod:`ironcore.cli.chat`)
shares the loading, the settings and the streaming below. The tokenizer is the one
saved with the model (``tokenizer.json`` in the checkpoint or HF folder) unless
``--tokenizer`` names another. The model folder's ``generation_config.json``
(:mod:`ironcore.inference.settings`) supplies the end tokens, the BOS of an
empty prompt and the sampling defaults; every flag given wins over it.
Without one, decoding is greedy and stops at the tokenizer's end-of-text and
EOS tokens (``--ignore-eos``: at none).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironcore.errors import ConfigError, DataError
from ironcore.files import read_text

if TYPE_CHECKING:
    from ironcore.data.preprocessing.tokenizer import Tokenizer
    from ironcore.inference.settings import GenerationConfig
    from ironcore.models.transformer import TransformerModel

DEFAULT_MAX_NEW_TOKENS = 64
Prompt = str | list[dict[str, str]]  # raw text, or chat messages the template renders


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint or an HF model folder")
    add_model_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="text to continue (streamed to the terminal)")
    prompts.add_argument(
        "--prompts-file",
        help='one prompt per line, or .jsonl: a string, {"prompt": ...} or {"messages": [...]} per line',
    )
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user turn with the tokenizer's chat template, as an "
                             "instruct model expects")
    parser.add_argument("--system", help="with --chat: a system message before each prompt")
    add_sampling_arguments(parser)
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at any end token")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts of --prompts-file decoded together")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and tokenizer flags ``generate`` and ``chat`` share."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="IronCore checkpoint or run folder (uses its latest), or an HF checkpoint folder"
    )
    source.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the one saved with the model)")
    parser.add_argument("--allow-other-tokenizer", action="store_true",
                        help="use --tokenizer although it differs from the tokenizer saved with the model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags ``generate`` and ``chat`` share (defaults: the model folder's generation_config.json)."""
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: generation_config.json's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default: generation_config.json's sampling settings, else greedy")
    parser.add_argument("--top-k", type=int, default=None, help="default: generation_config.json's (when it samples)")
    parser.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's (when it samples)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--decode", default="auto", choices=["auto", "eager", "static", "graph", "compile"],
                        help="decode step (docs/inference.md): auto picks CUDA graphs on a GPU, and an inductor-"
                             "compiled step on a CPU for long generations")


def run(args: argparse.Namespace) -> int:
    from ironcore import inference
    from ironcore.inference.settings import stop_ids

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (a system message belongs to a chat-template prompt)")
    items = [args.prompt] if args.prompt is not None else read_prompts(Path(args.prompts_file))
    generation, options = decoding_options(args)
    tokenizer = load_tokenizer(args)
    if args.chat or any(not isinstance(item, str) for item in items):
        require_chat_template(tokenizer, '--chat and "messages" prompts need one; without --chat a prompt is '
                                         "continued as raw text")
    elif tokenizer.chat_template:
        print("[the tokenizer has a chat template: --chat renders the prompt as a user turn, as an instruct model "
              "expects]", file=sys.stderr)
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        items = [[*system, {"role": "user", "content": item}] if isinstance(item, str) else item for item in items]
    prompts = [prompt_ids(tokenizer, item, generation.bos_token_id) if isinstance(item, str)
               else chat_ids(tokenizer, item) for item in items]  # fmt: skip
    model = load(args)
    check_decode(args.decode, model, options["max_new_tokens"])
    for number, ids in enumerate(prompts, start=1):
        check_prompt(model, f"prompt {number}", ids, options["max_new_tokens"])
    options["eos_token_id"] = None if args.ignore_eos else stop_ids(tokenizer, generation.eos_token_ids)
    if args.prompt is not None and not args.json:
        if not args.chat:  # a continuation reads on from its prompt; a reply stands alone
            print(args.prompt, end="", flush=True)
        stream_completion(model, tokenizer, prompts[0], options)
        return 0
    for start in range(0, len(items), args.batch_size):
        batch = slice(start, start + args.batch_size)
        outputs = inference.generate(model, prompts[batch], **options)
        for item, ids in zip(items[batch], outputs):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            if args.json:
                stopped = bool(ids) and ids[-1] in (options["eos_token_id"] or ())
                source = {"prompt": item} if isinstance(item, str) else {"messages": item}
                record = {**source, "completion": completion, "token_ids": ids,
                          "finish_reason": "stop" if stopped else "length"}  # fmt: skip
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif isinstance(item, str):
                print(f"{item}{completion}\n", flush=True)
            else:  # the user's turn, then the reply
                print(f"{item[-1]['content']}\n{completion}\n", flush=True)
    return 0


def decoding_options(args: argparse.Namespace) -> tuple[GenerationConfig, dict[str, Any]]:
    """The model folder's generation_config.json and the options of :func:`ironcore.inference.stream` that the
    flags and it give (all but the end tokens, which need the tokenizer), checked before anything loads."""
    from ironcore import inference
    from ironcore.inference.settings import GenerationConfig

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
    return generation, dict(max_new_tokens=max_new_tokens, **sampling, seed=args.seed, decode=args.decode)


def check_decode(decode: str, model: TransformerModel, max_new_tokens: int) -> None:
    """``--decode`` must suit the model's device (a CUDA graph needs a GPU): a one-line error before decoding."""
    from ironcore.inference.generate import decode_mode

    try:
        decode_mode(decode, model, 1, [max_new_tokens])
    except ValueError as err:
        raise ConfigError(f"--decode: {err}") from None


def check_prompt(model: TransformerModel, name: str, ids: list[int], max_new_tokens: int) -> None:
    """A one-line DataError for a prompt the model cannot take: an id outside its vocabulary (another model's
    tokenizer) or more positions than it has."""
    limit, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if max(ids) >= vocab:
        raise DataError(f"{name}: token id {max(ids)} is outside the model's vocabulary of {vocab}: "
                        "the tokenizer does not belong to this model")
    if len(ids) + max_new_tokens - 1 > limit:
        raise DataError(f"{name}: {len(ids)} tokens + {max_new_tokens} new tokens exceed the model's {limit} positions")


def stream_completion(model: TransformerModel, tokenizer: Tokenizer, ids: list[int], options: dict[str, Any]
                      ) -> list[int]:
    """Print the completion of ``ids`` as it is generated (its stop token not shown), then a newline, and a speed
    line on stderr; return the generated ids, a final stop token included."""
    from ironcore.inference import DecodeReport, stream

    stops = set(options["eos_token_id"] or ())
    started, report, generated = time.perf_counter(), DecodeReport(), []

    def tokens() -> Iterator[int]:
        for step in stream(model, [ids], report=report, **options):
            token = int(step[0])
            if token < 0:  # the row has stopped (on a GPU a few such steps may follow the stop token)
                return
            generated.append(token)
            if token in stops:
                return
            yield token

    for piece in _pieces(tokenizer, tokens()):
        print(piece, end="", flush=True)
    print(flush=True)
    seconds = time.perf_counter() - started
    compiled = f", {report.compile_seconds:.1f} s of it compiling" if report.compile_seconds else ""
    print(f"[{len(generated)} tokens in {seconds:.2f} s{compiled}, {len(generated) / max(seconds, 1e-9):.1f} "
          f"tokens/s, decode {report.path}]", file=sys.stderr)
    return generated


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


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts of a text file (one per non-empty line) or a .jsonl file (a string, {"prompt": ...} or
    {"messages": [{"role": ..., "content": ...}, ...]} per line)."""
    lines = read_text(path, "prompts file").splitlines()  # missing, a folder, not UTF-8 (the byte): one line
    prompts: list[Prompt] = []
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
        if isinstance(item, dict) and "messages" in item:
            prompts.append(_messages(item["messages"], f"{path}:{number}"))
            continue
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise DataError(f'{path}:{number}: expected a string or an object with a "prompt" string or a '
                            '"messages" list')
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A "messages" list as a chat template reads it: {"role", "content"} strings, at least one."""
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}} objects')
    return value


def require_chat_template(tokenizer: Tokenizer, why: str) -> None:
    """A one-line ConfigError when the tokenizer has no chat template; ``why`` says what needed it."""
    if not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json's "
                          f"chat_template): {why}")


def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template, ready for the assistant's turn.

    No special tokens are added: the template writes its own (a BOS included, where the model has one).
    """
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


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


"""``ironcore chat``: talk to an instruct model, turn by turn, through its tokenizer's chat template.

User turns come from stdin, one line each (typed at a terminal or piped: two
lines are a two-turn conversation). Each turn renders the whole conversation
so far with the tokenizer's own chat template, ready for the assistant's turn
(as ``transformers``' ``apply_chat_template(..., add_generation_prompt=True)``),
and streams the reply to stdout until an end token (the end-of-document token,
the tokenizer's EOS such as ``<|im_end|>``, generation_config.json's end ids),
which is not shown; the reply joins the conversation as the assistant's
message. ``/reset`` (or ``!reset``) starts the conversation over, ``/exit`` (or
EOF) ends it. The prompts ("you> ") and notes go to stderr, so stdout holds
the replies alone. Loading, the sampling settings and the streaming are
``ironcore generate``'s (:mod:`ironcore.cli.generate`).
"""

from __future__ import annotations

import argparse
import sys

from ironcore.cli.generate import (
    add_model_arguments,
    add_sampling_arguments,
    chat_ids,
    check_decode,
    check_prompt,
    decoding_options,
    load,
    load_tokenizer,
    require_chat_template,
    stream_completion,
)

RESET = ("/reset", "!reset")
EXIT = ("/exit", "!exit", "/quit", "!quit")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat", help="multi-turn chat with an instruct model (its tokenizer's chat template), from stdin"
    )
    add_model_arguments(parser)
    parser.add_argument("--system", help="a system message that starts the conversation (and every /reset)")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ironcore.inference.settings import completion_texts, stop_ids

    generation, options = decoding_options(args)
    tokenizer = load_tokenizer(args)
    require_chat_template(tokenizer, "ironcore chat needs one; ironcore generate continues raw text")
    model = load(args)
    max_new_tokens = options["max_new_tokens"]
    check_decode(args.decode, model, max_new_tokens)
    options["eos_token_id"] = stops = stop_ids(tokenizer, generation.eos_token_ids)
    limit = model.config.max_position_embeddings
    start = [] if args.system is None else [{"role": "system", "content": args.system}]
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("[one line per turn; /reset starts over, /exit or Ctrl-D ends]", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if text.strip() in EXIT:
            break
        if text.strip() in RESET:
            messages = list(start)
            print("[the conversation starts over]", file=sys.stderr)
            continue
        if not text.strip():
            continue
        asked = [*messages, {"role": "user", "content": text}]
        ids = chat_ids(tokenizer, asked)
        # The reply may take what is left of the model's positions, up to --max-new-tokens.
        options["max_new_tokens"] = min(max_new_tokens, limit + 1 - len(ids))
        if options["max_new_tokens"] < 1:
            print(f"[the conversation is {len(ids)} tokens, the model has {limit} positions: /reset starts over]",
                  file=sys.stderr)
            continue
        turn += 1
        check_prompt(model, f"turn {turn}", ids, options["max_new_tokens"])
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        generated = stream_completion(model, tokenizer, ids, options)
        messages = [*asked, {"role": "assistant", "content": completion_texts(tokenizer, [generated], stops)[0]}]
    if interactive:
        print(file=sys.stderr)
    return 0

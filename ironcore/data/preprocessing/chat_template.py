"""Chat templates rendered with jinja2 the way HF ``transformers`` renders them, without ``transformers``.

A chat template is a Jinja program shipped with a tokenizer (``chat_template.jinja``,
or the ``chat_template`` key of ``tokenizer_config.json``). ``transformers``'
``apply_chat_template`` runs it in a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, the loop controls (``{% break %}``,
``{% continue %}``), a ``{% generation %}`` block tag, a ``tojson`` filter
that does not escape HTML, and two globals: ``raise_exception(message)`` and
``strftime_now(format)``. The template sees ``messages``, ``tools`` and
``documents`` (None here), ``add_generation_prompt``, the tokenizer's named
special tokens (``bos_token``, ``eos_token``, …) and any extra variables
(``enable_thinking=False`` for Qwen3). This module builds the same
environment, so the rendered text is byte for byte what ``transformers``
gives (tested on ChatML, Llama-3, Llama-3.2, Qwen3 and Gemma templates) and
chat data preprocesses in the base install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ironcore.errors import ConfigError

# The tokenizer attributes a template may read (transformers' named special tokens).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning comes under; templates read the first (and gpt-oss's read "thinking").
_REASONING = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for masks; rendering keeps the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a data set renders the same template once per conversation)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template line {err.lineno}: {err.message}") from None


def _with_reasoning_aliases(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message whose reasoning, under any of its names, is also under the names templates read."""
    message = dict(message)
    reasoning = next((message[key] for key in _REASONING if message.get(key) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(
    source: str,
    messages: list[Mapping[str, Any]],
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = False,
    origin: str | None = None,
    **variables: Any,
) -> str:
    """The text of ``messages`` under the template ``source``; a template's own error is a one-line ConfigError
    (naming ``origin``, the template's file, when given): a ``raise_exception``, a sandbox refusal (a
    ``range`` over 100,000), or a Python error of its expressions (``1 / 0``, ``'a' + 1``, a missing key)."""
    try:
        return compile_template(source).render(
            messages=[_with_reasoning_aliases(m) for m in messages], tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **{**special_tokens, **variables},
        )
    except jinja2.TemplateError as err:
        problem = err.message or str(err)
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as err:  # OverflowError: range
        problem = f"{type(err).__name__}: {err}"
    problem = " ".join(str(problem).splitlines())  # one line
    raise ConfigError(f"chat template: {problem}" + (f" (in {origin})" if origin else ""))

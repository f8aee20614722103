"""Format rewards: does the completion have the shape the task asks for?"""

from __future__ import annotations

import functools
import re
from typing import Any

from ironcore.config.base import InvalidValue
from ironcore.rewards.base import reward_options, string_option

_compile = functools.lru_cache(maxsize=64)(re.compile)


def _check_pattern(options: dict[str, Any]) -> None:
    string_option(options, "pattern")
    try:
        _compile(options["pattern"], re.DOTALL)
    except re.error as err:
        raise InvalidValue("pattern", f"not a regular expression ({err})") from None


@reward_options("pattern", check=_check_pattern)
def regex_match(prompts: list[str], completions: list[str], pattern: str, **_) -> list[float | None]:
    """1.0 when the whole stripped completion matches ``pattern`` (``.`` also matches newlines), else 0.0.

    ``fullmatch``, not ``search``: a format reward should constrain the whole completion, or a model can
    earn it with one matching line buried in anything at all. Write ``.*`` where free text is allowed.
    """
    compiled = _compile(pattern, re.DOTALL)
    return [1.0 if compiled.fullmatch(completion.strip()) else 0.0 for completion in completions]

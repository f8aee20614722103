"""GSM8K's checker: the completion's last number against the number after ``####`` in the reference.

Numbers are compared exactly as fractions, so ``18``, ``18.0``, ``$18`` and ``18.`` all equal 18 and
``3.50`` equals ``3.5``. Accepted forms: a sign (``-3``, not the ``-`` of ``16-3``), thousands commas in
groups of three (``1,080``), decimals (``3.50``) and fractions (``1/2``: a fraction is one number, so a
completion ending "... 1/2" answers 0.5; the cost is that a date like ``12/25`` reads as a fraction too).
"""

from __future__ import annotations

import re
from fractions import Fraction

from ironcore.rewards.base import reward_options

# Optional sign (a '-' right after a digit is subtraction), integer part with or without thousands commas,
# optional decimals, optional '/denominator' (a denominator of zero is not a fraction).
_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/(?=\d*[1-9])\d+)?")


def parse_number(text: str) -> Fraction:
    """The value of one match of the number pattern (``-1,080``, ``3.50``, ``1/2``)."""
    numerator, _, denominator = text.replace(",", "").partition("/")
    return Fraction(numerator) / Fraction(denominator or 1)


def last_number(text: str) -> Fraction | None:
    """The last number in ``text``, or None when it has none."""
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def reference_answer(answer: str) -> Fraction | None:
    """The first number after the last ``####`` of a GSM8K answer, or None when there is none."""
    _, marker, tail = answer.rpartition("####")
    match = _NUMBER.search(tail) if marker else None
    return parse_number(match.group()) if match else None


@reward_options()  # none: an option given is a mistake
def gsm8k_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the completion's last number equals the reference, 0.0 when not (or it has no number).

    None when the reference has no ``####`` number: then the sample cannot be checked at all.
    """
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        expected = reference_answer(str(reference))
        if expected is None:
            rewards.append(None)
        else:
            rewards.append(1.0 if last_number(completion) == expected else 0.0)
    return rewards

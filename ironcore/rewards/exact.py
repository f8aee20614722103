"""Exact-answer reward for tasks whose answer is a short string on the completion's first line."""

from __future__ import annotations

from ironcore.rewards.base import reward_options


@reward_options()  # none: an option given is a mistake
def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the completion's first line, stripped, equals the stripped answer, else 0.0.

    Only the first line counts so that a model may go on after its answer (e.g. "46\\n12+34=46") without
    losing the reward, while "46 or 47" on one line does not pass ("12+34=" -> "46").
    """
    return [
        1.0 if completion.split("\n", 1)[0].strip() == str(reference).strip() else 0.0
        for completion, reference in zip(completions, answer)
    ]

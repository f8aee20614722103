"""Reward functions for RL (GRPO): built-ins, plus any function of yours named by its dotted path.

A reward function has TRL's signature::

    def my_fn(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
        return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]

It gets one prompt and one completion per sample, plus every per-sample column of the data as a keyword
argument (here ``answer``; ``**_`` swallows the columns it does not use), and returns one reward per
completion: a number, or None where it does not apply (the total then sums the functions that do).
Put it in an importable module and name it in the config as ``module:function``; ``options`` are bound
as keyword arguments::

    rl:
      rewards:
        - function: my_pkg.my_mod:my_fn
          weight: 0.5
        - function: regex          # a built-in: gsm8k, regex, exact, reward_model
          options: {pattern: '<think>.*</think>.*'}

An option the function does not take is refused when the run starts. A function that takes ``**_`` (the
columns it does not use) would accept any option name, so declare its options, and check their values, with
``@reward_options("limit", check=fn)`` (see :func:`~ironcore.rewards.base.reward_options`): the built-ins do.
"""

from ironcore.rewards.base import (
    BUILTIN,
    NamedReward,
    RewardScores,
    RewardSet,
    RewardSpec,
    load_reward,
    reward_options,
)
from ironcore.rewards.exact import exact_answer
from ironcore.rewards.format import regex_match
from ironcore.rewards.gsm8k import gsm8k_answer

__all__ = [
    "BUILTIN",
    "NamedReward",
    "RewardScores",
    "RewardSet",
    "RewardSpec",
    "exact_answer",
    "gsm8k_answer",
    "load_reward",
    "regex_match",
    "reward_options",
]

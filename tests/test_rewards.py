"""Reward functions as plug-ins: the built-in checkers, loading by name or dotted path, weighted scoring."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from ironcore.errors import ConfigError, DataError
from ironcore.rewards import (
    BUILTIN,
    NamedReward,
    RewardSet,
    RewardSpec,
    exact_answer,
    gsm8k_answer,
    load_reward,
    regex_match,
    reward_options,
)
from ironcore.rewards.base import positive_int

SAMPLE = Path(__file__).resolve().parent / "data" / "gsm8k_sample.jsonl"
NOT_CALLABLE = 3


# ---- functions loaded by dotted path ("test_rewards:..."): tests/ is on sys.path under pytest -----------


def ends_with_answer(prompts: list[str], completions: list[str], answer: list[str], suffix: str = "") -> list:
    return [1.0 if c.endswith(a + suffix) else 0.0 for c, a in zip(completions, answer)]


def _positive_limit(options: dict) -> None:
    positive_int(options, "limit")


@reward_options("limit", check=_positive_limit)
def declared(prompts: list[str], completions: list[str], limit: int, **_) -> list:
    """A user function declaring its options: ``**_`` takes the data's columns, not misspelt options."""
    return [1.0 if len(c) <= limit else 0.0 for c in completions]


def _returns(values):
    """A reward function named ``fixed`` that returns ``values`` whatever it is given."""

    def fixed(prompts, completions, **_):
        return values

    return fixed


def _fails_on_boom(prompts, completions, **_):
    if any("boom" in c for c in completions):
        raise ValueError("cannot score boom\nsecond line of the message")
    return [0.5] * len(completions)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---- gsm8k -----------------------------------------------------------------------------------------


def _sample() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def test_gsm8k_sample_reference_text_scores_one_and_a_changed_final_number_scores_zero() -> None:
    records = _sample()
    assert len(records) == 20
    prompts = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    assert gsm8k_answer(prompts, answers, answer=answers) == [1.0] * 20
    changed = []
    for text in answers:
        head, _, number = text.rpartition("####")
        changed.append(f"{head}#### {int(number.replace(',', '')) + 1}")
    assert gsm8k_answer(prompts, changed, answer=answers) == [0.0] * 20


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The answer is $1,080.", "so 1080 in all\n#### 1,080", 1.0),
        ("The answer is $1,080.", "#### 1,081", 0.0),
        ("She makes $18 every day.", "#### 18", 1.0),
        ("It is 18.", "#### 18", 1.0),
        ("It is 18.0", "#### 18", 1.0),
        ("Each costs 3.50", "#### 3.5", 1.0),
        ("Half: 1/2", "#### 0.5", 1.0),
        ("The change is -3", "#### -3", 1.0),
        ("16-3-4=9", "#### 9", 1.0),  # a '-' after a digit is subtraction, not a sign
        ("18 first, then 19", "#### 18", 0.0),  # the last number counts
        ("I do not know.", "#### 5", 0.0),
        ("The answer is 18", "She makes 18 dollars", None),  # no '####': cannot be checked
        ("The answer is 18", "#### unknown", None),
    ],
)
def test_gsm8k_answer_forms(completion: str, reference: str, expected: float | None) -> None:
    assert gsm8k_answer(["q"], [completion], answer=[reference]) == [expected]


# ---- regex and exact -------------------------------------------------------------------------------

THINK = r"<think>.*</think>\s*\d+"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>12+34\nis 46</think>\n46", 1.0),  # '.' crosses lines
        ("  <think>x</think> 46\n", 1.0),  # stripped first
        ("<think>x</think> 46 and more text", 0.0),  # the whole completion must match
        ("preamble <think>x</think> 46", 0.0),
        ("46", 0.0),
    ],
)
def test_regex_match_needs_the_whole_completion(completion: str, expected: float) -> None:
    assert regex_match(["p"], [completion], pattern=THINK) == [expected]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("46", "46", 1.0),
        (" 46 \n12+34=46, more text", "46", 1.0),  # only the first line counts
        ("46 or 47", "46", 0.0),
        ("\n46", "46", 0.0),
        ("45", "46", 0.0),
        ("46", 46, 1.0),  # a number as the answer is compared as text
    ],
)
def test_exact_answer_compares_the_first_line(completion: str, answer: str | int, expected: float) -> None:
    assert exact_answer(["12+34="], [completion], answer=[answer]) == [expected]


# ---- loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_loads_under_its_name(name: str) -> None:
    options = {"reward_model": {"checkpoint": "runs/rm"},  # the checkpoint is checked when first called
               "regex": {"pattern": THINK}}.get(name, {})
    reward = load_reward(RewardSpec(function=name, options=options), "rl.rewards[0]")
    assert reward.name == name and reward.weight == 1.0 and callable(reward.fn)


def test_builtin_options_are_bound_and_the_name_and_weight_kept() -> None:
    spec = RewardSpec("regex", weight=0.25, name="think", options={"pattern": THINK})
    reward = load_reward(spec, "rl.rewards[0]")
    assert (reward.name, reward.weight) == ("think", 0.25)
    assert reward.fn(["p"], ["<think>a</think> 1", "1"], answer=["1", "1"]) == [1.0, 0.0]


def test_a_user_function_loads_by_dotted_path() -> None:
    spec = RewardSpec("test_rewards:ends_with_answer", options={"suffix": "!"})
    reward = load_reward(spec, "rl.rewards[0]")
    assert reward.name == "ends_with_answer"
    scores = RewardSet([reward]).score(["q", "q"], ["it is 4!", "it is 4"], {"answer": ["4", "4"]})
    assert scores.per_function[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "key", "needle"),
    [
        (RewardSpec("no_such_module_xyz:fn"), "function", "cannot import module 'no_such_module_xyz'"),
        (RewardSpec("test_rewards:ends_with_answr"), "function", "did you mean 'ends_with_answer'"),
        (RewardSpec("test_rewards:NOT_CALLABLE"), "function", "'test_rewards:NOT_CALLABLE' is a int"),
        (RewardSpec("gsm8"), "function", "built-in reward (exact, gsm8k, regex, reward_model) (did you mean 'gsm8k'?)"),
        (RewardSpec("test_rewards:"), "function", "nor 'module:function'"),
        (
            RewardSpec("test_rewards:ends_with_answer", options={"sufix": "!"}),
            "options.sufix",
            "takes no argument 'sufix' (did you mean 'suffix'?)",
        ),
        (RewardSpec("regex", options={"completions": []}), "options.completions", "the trainer passes"),
        (RewardSpec("exact", weight=math.inf), "weight", "expected a finite number"),
    ],
)
def test_load_errors_are_one_line_and_name_the_key(spec: RewardSpec, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_reward(spec, "rl.rewards[1]")
    message = _one_line(err)
    assert f"config key 'rl.rewards[1].{key}'" in message and needle in message, message


@pytest.mark.parametrize(
    ("spec", "key", "needle"),
    [
        (RewardSpec("exact", options={"answer_field": "x"}), "options.answer_field", "'exact' takes no options"),
        (RewardSpec("gsm8k", options={"tolerance": 0.1}), "options.tolerance", "'gsm8k' takes no options"),
        (RewardSpec("regex"), "options.pattern", "'regex' needs it"),
        (RewardSpec("regex", options={"patern": "x"}), "options.patern", "no option 'patern' (did you mean 'pattern'?)"),
        (RewardSpec("regex", options={"pattern": "(a"}), "options.pattern", "not a regular expression (missing )"),
        (RewardSpec("regex", options={"pattern": 3}), "options.pattern", "must be a string, got 3 (int)"),
        (RewardSpec("regex", options={"pattern": "a", "flags": 2}), "options.flags", "takes no option 'flags'"),
        (RewardSpec("reward_model", options={"checkpoint": "r", "prompt_template": "Q:"}),
         "options.prompt_template", "has no '{prompt}'"),
        (RewardSpec("reward_model", options={"checkpoint": "r", "batch_size": 0}),
         "options.batch_size", "must be a positive integer, got 0"),
        (RewardSpec("reward_model", options={"checkpoint": "r", "batch_size": 2.5}),
         "options.batch_size", "must be a positive integer, got 2.5"),
        (RewardSpec("reward_model", options={"checkpoint": "r", "batchsize": 8}),
         "options.batchsize", "did you mean 'batch_size'?"),
        (RewardSpec("test_rewards:declared", options={"limit": -1}), "options.limit", "must be a positive integer"),
        (RewardSpec("test_rewards:declared", options={"limit": 2, "answer": "x"}), "options.answer",
         "takes no option 'answer' (its options: limit)"),
    ],
)
def test_builtin_options_are_checked_when_the_reward_loads(spec: RewardSpec, key: str, needle: str) -> None:
    """Each built-in (and any function using ``reward_options``) declares its options: an unknown one, a missing
    one or a bad value is one line at load (start-up), not a swallowed option or a failure at the first rollout."""
    with pytest.raises(ConfigError) as err:
        load_reward(spec, "rl.rewards[1]")
    message = _one_line(err)
    assert message.startswith(f"config key 'rl.rewards[1].{key}': reward function '{spec.function}'"), message
    assert needle in message, message


def test_a_declared_function_gets_its_options_bound() -> None:
    reward = load_reward(RewardSpec("test_rewards:declared", options={"limit": 2}), "rl.rewards[0]")
    assert reward.fn(["p"] * 2, ["abc", "a"], answer=["x", "y"]) == [0.0, 1.0]


def test_a_module_that_fails_to_import_is_named_with_its_errors_first_line(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_rewards_mod.py").write_text("raise RuntimeError('no GPU here\\nmore detail')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_reward(RewardSpec("broken_rewards_mod:fn"), "rl.rewards[0]")
    assert _one_line(err) == (
        "config key 'rl.rewards[0].function': cannot import module 'broken_rewards_mod' "
        "(RuntimeError: no GPU here)"
    )


# ---- scoring -----------------------------------------------------------------------------------------


def test_total_is_the_weighted_nansum_and_nan_where_no_function_applies() -> None:
    rewards = RewardSet([
        NamedReward("a", 2.0, _returns([1.0, None, None, True])),
        NamedReward("b", -1.0, _returns([0.5, 2, None, False])),
    ])
    scores = rewards.score(["p"] * 4, ["c"] * 4, {})
    assert scores.names == ["a", "b"] and scores.errors == {"a": 0, "b": 0}
    assert scores.per_function.dtype == torch.float32 and scores.per_function.shape == (4, 2)
    assert torch.equal(scores.per_function.isnan(), torch.tensor([[False, False], [True, False], [True, True],
                                                                  [False, False]]))
    assert scores.total[:2].tolist() == [1.5, -2.0]
    assert math.isnan(scores.total[2]) and scores.total[3] == 2.0  # bool counts as 0/1


def test_fields_reach_the_functions_as_keyword_arguments() -> None:
    rewards = RewardSet([NamedReward("exact", 1.0, exact_answer), NamedReward("gsm8k", 1.0, gsm8k_answer)])
    scores = rewards.score(["q", "q"], ["7", "8"], {"answer": ["#### 7", "#### 7"]})
    assert scores.per_function.tolist() == [[0.0, 1.0], [0.0, 0.0]]


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ([1.0, 1.0], "returned 2 values, expected 3"),
        ("1.0", "returned a str; expected a list of 3 numbers or None"),
        (torch.ones(3), "returned a Tensor"),
        ([1.0, "yes", 0.0], "returned 'yes' (str) for sample 1"),
        ([1.0, 0.0, math.nan], "returned nan for sample 2"),
        ([math.inf, 0.0, 0.0], "returned inf for sample 0"),
        ([1.0, 1e308, 0.0], "returned 1e+308 for sample 1, beyond the float32 range of rewards"),
        ([-3.5e38, 1.0, 0.0], "returned -3.5e+38 for sample 0, beyond the float32 range"),
        ([1.0, 1.0, 10**400], "for sample 2, beyond the float32 range"),
    ],
)
def test_a_malformed_return_is_a_one_line_error_naming_the_function(values, needle: str) -> None:
    shaky = NamedReward("shaky", 1.0, _returns(values))
    rewards = RewardSet([NamedReward("fine", 1.0, _returns([1] * 3)), shaky])
    with pytest.raises(DataError) as err:
        rewards.score(["p"] * 3, ["c"] * 3, {})
    message = _one_line(err)
    assert message.startswith("reward function shaky ") and needle in message, message


def test_a_weighted_total_beyond_float32_is_one_line_naming_the_functions() -> None:
    rewards = RewardSet([NamedReward("big", 4.0, _returns([1.0, 3e38])), NamedReward("other", 1.0, _returns([0, 0]))])
    with pytest.raises(DataError) as err:
        rewards.score(["p"] * 2, ["c"] * 2, {})
    assert _one_line(err).startswith("reward functions big, other: the weighted total of sample 1 is beyond the "
                                     "float32 range")
    huge = RewardSet([NamedReward("huge", 1.0, _returns([1e308]))])  # under skip too: a bug, not one sample
    with pytest.raises(DataError, match="reward function huge returned 1e"):
        huge.score(["p"], ["c"], {}, on_error="skip")


def test_a_raising_function_is_one_line_under_raise() -> None:
    rewards = RewardSet([NamedReward("boom", 1.0, _fails_on_boom)])
    with pytest.raises(DataError) as err:
        rewards.score(["p"] * 3, ["ok", "boom", "ok"], {})
    assert _one_line(err) == "reward function boom raised ValueError: cannot score boom"


def test_a_missing_field_is_reported_like_any_raise() -> None:
    rewards = RewardSet([NamedReward("gsm8k", 1.0, gsm8k_answer)])
    with pytest.raises(DataError) as err:
        rewards.score(["p"], ["c"], {"solution": ["#### 1"]})
    assert re.fullmatch(r"reward function gsm8k raised TypeError: .*'answer'", _one_line(err))


def test_skip_scores_only_the_failing_samples_none_and_counts_them() -> None:
    other = NamedReward("other", 0.5, _returns([1] * 4))
    rewards = RewardSet([NamedReward("boom", 1.0, _fails_on_boom), other])
    completions = ["ok", "boom", "ok", "boom!"]
    scores = rewards.score(["p"] * 4, completions, {"answer": list("abcd")}, on_error="skip")
    assert scores.errors == {"boom": 2, "other": 0}
    assert scores.per_function[:, 0].isnan().tolist() == [False, True, False, True]
    assert scores.per_function[[0, 2], 0].tolist() == [0.5, 0.5]
    assert scores.total.tolist() == [1.0, 0.5, 1.0, 0.5]  # the other function still counts
    alone = RewardSet([NamedReward("boom", 1.0, _fails_on_boom)])
    assert alone.score(["p"] * 2, ["boom", "ok"], {}, on_error="skip").total.isnan().tolist() == [True, False]


def test_on_error_must_be_raise_or_skip() -> None:
    with pytest.raises(ValueError, match="on_error"):
        RewardSet([NamedReward("a", 1.0, _returns([1.0]))]).score(["p"], ["c"], {}, on_error="ignore")


def test_a_field_named_like_an_option_is_refused() -> None:
    reward = load_reward(RewardSpec("regex", options={"pattern": "x"}), "rl.rewards[0]")
    with pytest.raises(DataError) as err:
        RewardSet([reward]).score(["p"], ["x"], {"pattern": ["y"]})
    assert "reward function regex: the data field 'pattern'" in _one_line(err)


def test_two_functions_need_two_names() -> None:
    with pytest.raises(ConfigError, match="two reward functions are named 'exact'"):
        RewardSet([NamedReward("exact", 1.0, exact_answer), NamedReward("exact", 2.0, exact_answer)])

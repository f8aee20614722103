"""Loading reward functions from config, and scoring a batch with several of them.

A reward function has TRL's signature, ``fn(prompts, completions, **fields) -> list[float | None]``:
``fields`` are the data's per-sample columns (``answer=[...]``), passed to every function, so a function
takes the ones it needs by name and swallows the rest with ``**_``. ``None`` means "does not apply to
this sample"; the total reward then sums the functions that did apply (TRL's ``nansum``).

A function may declare its options with :func:`reward_options`: then an option it does not declare is
refused (a function that swallows the data's columns with ``**_`` would otherwise swallow a misspelt option
too), a declared option without a default is required, and its ``check`` sees the options when the reward
is loaded, so that a bad value stops the run at start-up, not at the first rollout.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ironcore.config.base import InvalidValue, did_you_mean
from ironcore.errors import ConfigError, DataError, UserError

RewardFn = Callable[..., Sequence[float | None]]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are kept as float32

# Built-in reward functions by name; adding one is one line here.
BUILTIN: dict[str, str] = {
    "gsm8k": "ironcore.rewards.gsm8k:gsm8k_answer",
    "regex": "ironcore.rewards.format:regex_match",
    "exact": "ironcore.rewards.exact:exact_answer",
    "reward_model": "ironcore.rewards.model:reward_model",
}


def reward_options(*names: str, check: Callable[[dict[str, Any]], None] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Declare the options a reward function takes (``names``) and a ``check`` of their values.

    ``check(options)`` gets the options as configured (those given; defaults are not filled in) and raises
    :class:`~ironcore.config.base.InvalidValue` naming the option at fault, e.g.
    ``InvalidValue("pattern", "not a regular expression (...)")``; :func:`load_reward` puts the config key
    in front. It runs once, when the reward is loaded.
    """

    def declare(fn: RewardFn) -> RewardFn:
        fn.reward_options = frozenset(names)  # type: ignore[attr-defined]
        fn.check_options = check  # type: ignore[attr-defined]
        return fn

    return declare


def positive_int(options: dict[str, Any], name: str) -> None:
    """For a ``check``: ``options[name]``, when given, must be an int >= 1 (not a bool)."""
    value = options.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(name, f"must be a positive integer, got {value!r}")


def string_option(options: dict[str, Any], name: str) -> None:
    """For a ``check``: ``options[name]``, when given, must be a string."""
    if name in options and not isinstance(options[name], str):
        raise InvalidValue(name, f"must be a string, got {_short(options[name])} ({type(options[name]).__name__})")


@dataclass
class RewardSpec:
    """One entry of the config's reward list: which function, its weight and its options."""

    function: str  # a key of BUILTIN, or "module:function"
    weight: float = 1.0
    name: str | None = None  # default: the built-in name or the function's __name__
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments bound to the function


@dataclass
class NamedReward:
    """A loaded reward function (options already bound) with the name it is logged under."""

    name: str
    weight: float
    fn: RewardFn


@dataclass
class RewardScores:
    """Rewards of one batch: per function (NaN where it returned None) and the weighted total."""

    per_function: torch.Tensor  # float32 [N, F]
    total: torch.Tensor  # float32 [N]; NaN where every function returned None
    names: list[str]
    errors: dict[str, int]  # per function, how many samples raised (on_error="skip")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_reward(spec: RewardSpec, key: str) -> NamedReward:
    """Import the function ``spec`` names and bind its options, so that mistakes surface before training.

    Each mistake is a one-line :class:`ConfigError` naming ``key``, the config key (e.g. ``rl.rewards[1]``).
    """
    if not isinstance(spec.weight, numbers.Real) or not math.isfinite(spec.weight):
        raise ConfigError(f"config key '{key}.weight': expected a finite number, got {spec.weight!r}")
    path = BUILTIN.get(spec.function, spec.function)
    module_name, colon, attr = path.partition(":")
    if not (colon and attr.isidentifier() and all(part.isidentifier() for part in module_name.split("."))):
        hint = did_you_mean(spec.function, list(BUILTIN)) if not colon else ""
        raise ConfigError(
            f"config key '{key}.function': '{spec.function}' is neither a built-in reward "
            f"({', '.join(sorted(BUILTIN))}){hint} nor 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        message = f"cannot import module '{module_name}' ({_first_line(err)})"
        raise ConfigError(f"config key '{key}.function': {message}") from err
    if not hasattr(module, attr):
        public = [name for name, obj in vars(module).items() if callable(obj) and not name.startswith("_")]
        raise ConfigError(
            f"config key '{key}.function': module '{module_name}' has no attribute '{attr}'"
            + did_you_mean(attr, public)
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"config key '{key}.function': '{path}' is a {type(fn).__name__}, not a function")
    _check_options(fn, spec.options, spec.function, key)
    name = spec.name or (spec.function if spec.function in BUILTIN else getattr(fn, "__name__", attr))
    bound = functools.partial(fn, **spec.options) if spec.options else fn
    return NamedReward(name=name, weight=float(spec.weight), fn=bound)


def _check_options(fn: Callable, options: dict[str, Any], path: str, key: str) -> None:
    """Each option must be a keyword argument ``fn`` takes (anything goes if it takes ``**kwargs``), or one it
    declares with :func:`reward_options`, whose ``check`` then sees them."""
    declared: frozenset[str] | None = getattr(fn, "reward_options", None)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some C callables have no signature: nothing to check against
        params = []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params) and declared is None
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if declared is not None:
        takes = sorted(declared)
    for option in options:
        if option in ("prompts", "completions"):
            raise ConfigError(f"config key '{key}.options.{option}': the trainer passes '{option}' itself")
        if declared is not None and not declared:
            raise ConfigError(f"config key '{key}.options.{option}': reward function '{path}' takes no options")
        if (params or declared) and not takes_any and option not in takes:
            kind = "option" if declared is not None else "argument"
            hint = did_you_mean(option, [t for t in takes if t not in ("prompts", "completions")])
            if not hint and declared:
                hint = f" (its options: {', '.join(takes)})"
            raise ConfigError(
                f"config key '{key}.options.{option}': reward function '{path}' takes no {kind} '{option}'{hint}"
            )
    for p in params:  # after the unknown ones: a misspelt option is named as such, not as a missing one
        needed = p.kind is p.KEYWORD_ONLY or (declared is not None and p.name in declared)
        if needed and p.default is p.empty and p.name not in options:
            raise ConfigError(f"config key '{key}.options.{p.name}': reward function '{path}' needs it")
    check = getattr(fn, "check_options", None)
    if check is not None:
        try:
            check(dict(options))
        except InvalidValue as err:
            raise ConfigError(f"config key '{key}.options.{err.key}': reward function '{path}': {err.problem}") from None


class RewardSet:
    """Several reward functions scored together into one weighted total per completion."""

    def __init__(self, rewards: list[NamedReward]) -> None:
        if not rewards:
            raise ConfigError("no reward functions: configure at least one")
        names = [reward.name for reward in rewards]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"two reward functions are named '{name}': give each its own 'name'")
        self.rewards = rewards
        self.names = names
        self.weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)

    def score(
        self, prompts: list[str], completions: list[str], fields: dict[str, list], on_error: str = "raise"
    ) -> RewardScores:
        """Score N completions with every function; ``on_error="skip"`` scores the samples that raise as None.

        Under "skip" a function that raises is called again once per sample, so that one bad sample costs
        only its own reward, and the count of such samples is reported in ``errors``.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for column, values in fields.items():
            if len(values) != n:
                raise ValueError(f"field '{column}' has {len(values)} values for {n} completions")
        per_function = torch.full((n, len(self.rewards)), math.nan, dtype=torch.float32)
        errors = dict.fromkeys(self.names, 0)
        for j, reward in enumerate(self.rewards):
            clash = set(fields) & set(getattr(reward.fn, "keywords", {}))
            if clash:
                raise DataError(
                    f"reward function {reward.name}: the data field '{min(clash)}' has the name of an option"
                )
            try:
                out = reward.fn(prompts, completions, **fields)
            except UserError as err:  # a mistake of configuration (e.g. a reward model that does not load)
                raise type(err)(f"reward function {reward.name}: {err}") from err
            except Exception as err:
                if on_error == "raise":
                    raise DataError(f"reward function {reward.name} raised {_first_line(err)}") from err
                values = _one_by_one(reward, prompts, completions, fields, errors)
            else:
                values = _checked(reward.name, out, n)
            for i, value in enumerate(values):
                if value is not None:
                    per_function[i, j] = float(value)
        total = (per_function * self.weights).nansum(dim=1)
        overflow = total.isinf().nonzero()
        if len(overflow):
            i = int(overflow[0])
            raise DataError(
                f"reward functions {', '.join(self.names)}: the weighted total of sample {i} is beyond the float32 "
                f"range of rewards (|r| <= {FLOAT32_MAX:.4g})"
            )
        total[per_function.isnan().all(dim=1)] = math.nan
        return RewardScores(per_function=per_function, total=total, names=list(self.names), errors=errors)


def _one_by_one(
    reward: NamedReward,
    prompts: list[str],
    completions: list[str],
    fields: dict[str, list],
    errors: dict[str, int],
) -> list[float | None]:
    """Call ``reward`` once per sample: the samples that raise score None and are counted in ``errors``."""
    values: list[float | None] = []
    for i in range(len(completions)):
        try:
            one = {column: [column_values[i]] for column, column_values in fields.items()}
            out = reward.fn([prompts[i]], [completions[i]], **one)
        except Exception:
            values.append(None)
            errors[reward.name] += 1
        else:
            values += _checked(reward.name, out, 1)
    return values


def _checked(name: str, out: Any, n: int) -> list[float | None]:
    """What a function returned, checked: a sequence of ``n`` finite numbers or None.

    bool counts as a number (0/1), so a checker may return ``x == y``; NaN and inf are refused because None
    already says "not scored" and an infinite reward would swamp the group's baseline, and so is a finite
    number that float32 (what rewards are kept in) cannot hold.
    """
    if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
        kind = type(out).__name__
        raise DataError(f"reward function {name} returned a {kind}; expected a list of {n} numbers or None")
    if len(out) != n:
        raise DataError(f"reward function {name} returned {len(out)} values, expected {n} (one per sample)")
    for i, value in enumerate(out):
        if value is None:
            continue
        if not isinstance(value, numbers.Real):
            raise DataError(
                f"reward function {name} returned {_short(value)} ({type(value).__name__}) for sample {i}; "
                "expected a number or None"
            )
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            number = None
        if number is not None and not math.isfinite(number):
            raise DataError(f"reward function {name} returned {value} for sample {i}; None means 'no score'")
        if number is None or abs(number) > FLOAT32_MAX:
            raise DataError(
                f"reward function {name} returned {_short(value)} for sample {i}, beyond the float32 range of "
                f"rewards (|r| <= {FLOAT32_MAX:.4g})"
            )
    return list(out)

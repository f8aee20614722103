"""The pipeline config's checks, each failure one line naming the file and the key (or line): imported by the
Snakefile and workflow/rules/common.smk when Snakemake parses the workflow.

- :func:`read_config_files`: every pipeline config file read through IronCore's YAML loader, which names the line
  of a syntax error and refuses a key given twice (Snakemake's own reading keeps the last of the two silently).
- :func:`check_config`: the config against workflow/schemas/pipeline.schema.yaml, the first problem as one line
  ("configs/pipeline.yaml: unknown key 'rl.polcy' (did you mean 'policy'?)") instead of the whole config.
- :func:`fail`: print such a line and stop Snakemake (exit status 2, as the ``ironcore`` command on bad input);
  :func:`one_line_errors` does it for a function's IronCore errors (a missing training config, a bad task).
- :func:`sweep_experiments`: the experiments a sweep's grid and points stand for, each with a readable name.
"""

from __future__ import annotations

import functools
import itertools
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ironcore.config.base import did_you_mean
from ironcore.errors import UserError
from ironcore.files import read_yaml

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "pipeline.schema.yaml"


def fail(message: str) -> None:
    """Stop Snakemake with ``message`` as its one line of error output."""
    print(f"pipeline: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def one_line_errors(function: Callable) -> Callable:
    """``function``, but an IronCore error (``UserError``) it raises stops Snakemake with its one line."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserError as err:
            fail(str(err))

    return wrapper


def read_config_files(paths: Iterable[str | Path]) -> None:
    """Read each pipeline config file that exists through IronCore's YAML loader (one line on any problem)."""
    for path in paths:
        if Path(path).is_file():
            try:
                read_yaml(path, "pipeline config")
            except UserError as err:
                fail(str(err))


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(part) for part in path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: Any, schema: dict[str, Any]) -> str:
    """One line for a jsonschema ``ValidationError``: the dotted key and what is wrong with it."""
    key, value, rule = _dotted(error.absolute_path), error.instance, error.validator
    if rule == "additionalProperties" and isinstance(value, dict):
        known = error.schema.get("properties", {})
        extra = sorted(str(k) for k in value if k not in known)
        name = extra[0] if extra else "?"
        dotted = f"{key}.{name}" if key else name
        return f"unknown key '{dotted}'" + (did_you_mean(name, known) or f" (known: {', '.join(known)})")
    where = f"'{key}'" if key else "the config"
    if rule == "required":
        return f"{where}: {error.message.split(' is a required', 1)[0]} is required"
    if rule == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where}: expected {expected}, got {_short(value)}"
    if rule == "enum":
        return f"{where}: {_short(value)} is not one of {', '.join(map(str, error.validator_value))}"
    if rule == "propertyNames":
        return f"{where}: name {_short(value)} does not match {error.validator_value.get('pattern', 'the schema')}"
    message = error.message.replace("\n", " ")
    return f"{where}: {message if len(message) <= 200 else message[:197] + '...'}"


def check_config(config: dict[str, Any], files: Iterable[str | Path]) -> None:
    """Check ``config`` against the pipeline schema; the first problem stops Snakemake with one line."""
    import jsonschema

    schema = read_yaml(SCHEMA, "pipeline config schema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        where = ", ".join(map(str, files)) or "pipeline config"
        fail(f"{where}: {describe(jsonschema.exceptions.best_match(errors), schema)}")


def point_name(sweep: str, swept: dict[str, Any]) -> str:
    """``lr-max_lr=0.003-optimizer=muon``: the sweep, then each swept key's last part and its value (floats in
    their shortest form), with any character a file name or a wildcard would trip on replaced by ``_``."""
    short = [key.rsplit(".", 1)[-1] for key in swept]
    parts = [f"{key if short.count(last) > 1 else last}={_text(value)}"
             for (key, value), last in zip(swept.items(), short, strict=True)]  # fmt: skip
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join([sweep, *parts]))


def _text(value: Any) -> str:
    """A value as a point's name shows it: ``true``, ``0.003``, ``adjust_lr_fn_match_rms_adamw`` (a mapping)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "_".join(f"{key}_{_text(item)}" for key, item in value.items())
    if isinstance(value, list):
        return "_".join(map(_text, value))
    return str(value)


def sweep_experiments(sweeps: dict[str, Any], experiments: dict[str, Any], files: Iterable[str | Path]
                      ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each sweep's points as experiments: the base experiment with the point's overrides on top of its own,
    optional (built by ``sweep_NAME``), marked with the sweep and what the point varies (``swept``: its name and
    summary columns). A point is a combination of the ``grid`` or one of ``points``; a base that is not an
    experiment, no points, or two points of one name stop Snakemake with one line."""
    where = ", ".join(map(str, files)) or "pipeline config"
    found: dict[str, dict[str, Any]] = {}
    for sweep, spec in sweeps.items():
        if spec["base"] not in experiments:
            fail(f"{where}: 'sweeps.{sweep}.base': {spec['base']!r} is not an experiment of the pipeline config"
                 f"{did_you_mean(spec['base'], experiments) or ''}")
        points = [(dict(point), dict(point)) for point in spec["points"]]
        if spec["grid"]:
            choices = [_choices(key, values) for key, values in spec["grid"].items()]
            points = [_merged(combination) for combination in itertools.product(*choices)] + points
        if not points:
            fail(f"{where}: 'sweeps.{sweep}': no points (give a grid of values, or points)")
        base = experiments[spec["base"]]
        for swept, overrides in points:
            name = point_name(sweep, swept)
            if name in experiments or name in found:
                fail(f"{where}: 'sweeps.{sweep}': two experiments are named {name!r}")
            found[name] = {**base, "overrides": {**base["overrides"], **overrides}, "optional": True,
                           "target": "sweep", "sweep": sweep, "swept": swept}  # fmt: skip
    return found


def _choices(key: str, values: list[Any] | dict[str, dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(what the point shows, its overrides) for each value of one grid key: ``{optim.max_lr: [1e-3, 3e-3]}`` sets
    the key; a mapping of labels to overrides (``{optimizer: {muon: {optim.optimizer: muon, ...}}}``) sets
    several keys together under one label."""
    if isinstance(values, dict):
        return [({key: label}, dict(overrides)) for label, overrides in values.items()]
    return [({key: value}, {key: value}) for value in values]


def _merged(combination: tuple[tuple[dict, dict], ...]) -> tuple[dict, dict]:
    swept: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for shown, overridden in combination:
        swept |= shown
        overrides |= overridden
    return swept, overrides

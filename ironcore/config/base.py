"""Typed dataclass configs built from plain mappings, with one-line errors.

Every config group is a dataclass whose fields carry their help text in
``metadata["help"]`` (see :func:`field`), so ``ironcore config-reference`` can
print a reference that cannot drift from the code. :func:`from_dict` turns a
YAML mapping into such a dataclass, coercing strings from the command line
("3e-4", "true", "null") into the declared types and naming the exact dotted
key when something is wrong.

Validation is one phase, inside :func:`from_dict`: after coercing a group's
values it calls the group's ``validate()`` method, if it has one, and puts the
group's dotted path in front of the key that :class:`InvalidValue` names. So
``OptimConfig.validate`` says ``max_lr`` and the user reads ``optim.max_lr``. Checks
across groups (batch sizes against the world size, heads against the TP size)
follow in :func:`ironcore.config.loader.validate_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from ironcore.errors import ConfigError

T = TypeVar("T")


class InvalidValue(ConfigError):
    """A value that a config group's ``validate()`` rejects; ``key`` is relative to the group."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"config key '{key}': {problem}" if key else problem)


def validated(obj: T, prefix: str = "") -> T:
    """Run ``obj.validate()`` (when defined), naming keys under ``prefix``; returns ``obj``."""
    check = getattr(obj, "validate", None)
    if check is None:
        return obj
    try:
        check()
    except InvalidValue as err:
        raise InvalidValue(".".join(part for part in (prefix, err.key) if part), err.problem) from None
    return obj


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    metadata = {"help": help}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def template_fields(template: str, key: str) -> list[str]:
    """The fields a ``"Question: {question}"`` template names, in order. Plain field names only: a syntax
    error (``"{question"``), an attribute or index lookup (``{q.__class__}``, ``{q[0]}``), a conversion, a
    format spec or a positional ``{}`` is an :class:`InvalidValue` naming ``key`` (a template of user data
    must not reach Python's internals through ``str.format``). Fill it with :func:`fill_template`."""
    import string

    hint = "a template names fields as {name} only, with {{ and }} for literal braces"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InvalidValue(key, f"invalid template {template!r}: {err} ({hint})") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]") or spec or conversion:
            text = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InvalidValue(key, f"{text} is not a plain field name ({hint})")
        names.append(name)
    return names


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """``template`` (checked by :func:`template_fields`) with each ``{name}`` replaced by ``str(values[name])``."""
    import string

    return "".join(literal + ("" if name is None else str(values[name]))
                   for literal, name, _, _ in string.Formatter().parse(template))  # fmt: skip


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def named_object(spec: str, key: str, kind: str = "name") -> Any:
    """What a ``module:name`` config value names (a plug-in: schedule, optimizer), imported from ``sys.path`` or
    else the working directory (as ``python -m`` would; the ``ironcore`` command's path lacks it); a one-line
    ConfigError naming ``key`` when it is not module:name, the module cannot be imported or lacks the name
    (``kind="Class"``: lacks a class of that name)."""
    import importlib
    import os
    import sys

    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"config key '{key}': '{spec}' is not module:{kind}")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name.split(".")[0] or os.getcwd() in sys.path or "" in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"config key '{key}': cannot import module '{module_name}' ({err})") from None
    found = getattr(module, name, None)
    if found is None or (kind == "Class" and not isinstance(found, type)):
        what = "" if kind == "name" else f"{kind.lower()} "
        raise ConfigError(f"config key '{key}': module '{module_name}' has no {what}'{name}'")
    return found


def _type_name(tp: Any) -> str:
    """Readable type for messages and the reference: 'int or null', 'pre / post'."""
    if isinstance(tp, type):
        return "null" if tp is type(None) else tp.__name__
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return " / ".join(map(str, args))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``.

    Strings are converted (command-line overrides arrive as text); ints are
    accepted for floats; nothing else is silently changed.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        # Try the exact type first so "1" stays a str for `str | int` and 1 stays an int.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: not _matches(value, a)):
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}"
            + did_you_mean(str(value), map(str, choices))
        )
    if isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    """Integers, integral floats and their text (``1e6``, ``1_000``); never a bool."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
    raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}': expected a number, got {value!r}")


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key '{key}': expected a string, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _matches(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}{key}'{did_you_mean(str(key), fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{dotted}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{dotted}{name}'")
    return validated(cls(**kwargs), prefix)


def to_dict(obj: Any) -> Any:
    """Plain, YAML-ready data (dataclasses become dicts, tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, nested groups expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows

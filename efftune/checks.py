"""Field checks shared by the configs and the files that carry them: `build` makes a config
dataclass from a plain dict (a YAML section, a saved adapter's config) checking every key and
type; the others check one kind of field. Each error names the section and field, e.g.
`mixlora.r must be a positive integer, got 0`. Booleans are refused where a number is asked for,
and so are NaN and infinities."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

from .errors import ConfigError


def is_number(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_ints(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {v!r}")


def positive_numbers(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if not is_number(v) or v <= 0:
            raise ConfigError(f"{section}.{name} must be a positive number, got {v!r}")


def non_negative_numbers(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if not is_number(v) or v < 0:
            raise ConfigError(f"{section}.{name} must be a non-negative number, got {v!r}")


def check_pattern(value: Any, key: str) -> None:
    """A module pattern given as a string is a regex (full match): it must compile."""
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{key}: {value!r} is not a valid regex ({exc})") from None


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Coerce YAML scalars to the field's type (int -> float, str -> [str]) or raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{key}: unexpected value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls, values: dict, section: str = ""):
    """Make dataclass `cls` from a dict, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{section}.{key}" if section else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {name!r} ({hint}known: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, name)
        else:
            kwargs[key] = _check_type(value, hint, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        named = not section or str(exc).startswith((f"{section}.", f"{section}:"))  # the key is in the message
        raise ConfigError(f"{'' if named else section + ': '}{exc}") from None

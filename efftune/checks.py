"""Field checks shared by the configs: each error names the section and field, e.g.
`mixlora.r must be a positive integer, got 0`. Booleans are refused where a number is asked for."""
from __future__ import annotations

from .errors import ConfigError


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_ints(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {v!r}")


def positive_numbers(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if not _is_number(v) or v <= 0:
            raise ConfigError(f"{section}.{name} must be a positive number, got {v!r}")


def non_negative_numbers(section: str, config, *names: str) -> None:
    for name in names:
        v = getattr(config, name)
        if not _is_number(v) or v < 0:
            raise ConfigError(f"{section}.{name} must be a non-negative number, got {v!r}")

"""Reading the tables of a configuration: typed getters whose errors name the dotted path of the field."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from meterware.errors import ConfigError

# \Z, not $: "$" also matches before a trailing newline, which would let "free\n" through.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")


class Section:
    """A table of the config being read: typed getters that report the dotted path on error."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", f"must be a table, got {kind_of(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{toml_key(key)}" if self.path else toml_key(key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int in Python; a config that says `shards = true` is a mistake.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(self.name(key), f"must be {_describe(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.name(key), f"must be {_describe(kind)}, got {kind_of(value)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value: int = self.get(key, int, default)
        if value < minimum:
            raise ConfigError(self.name(key), f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        raw = self.get(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # an integer too large for a float
            value = math.inf if raw > 0 else -math.inf
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(self.name(key), f"must be a positive number of seconds, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(self.name(key), f"must be one of {options}, got {value!r}")
        return value

    def section(self, key: str) -> Section:
        self.seen.add(key)
        return Section(self.data.get(key, {}), self.name(key))

    def strings(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        values = self.get(key, list, list(default))
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{self.name(key)}[{index}]", f"must be a non-empty string, got {value!r}")
        return tuple(values)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.name(unknown[0]), "is not a known setting")


def toml_key(key: str) -> str:
    """A key as TOML writes it in a dotted path: bare if it can be, quoted (on one line) otherwise."""
    return key if _BARE_KEY_RE.match(key) else json.dumps(key, ensure_ascii=False)


def _describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    names |= {list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a table" if isinstance(value, Mapping) else type(value).__name__
    )


def shown_url(url: str) -> str:
    """A storage URL as error messages show it: without what comes before an ``@`` (credentials)."""
    return "***@" + url.rpartition("@")[2] if "@" in url else url


def check_name(value: str, field_name: str) -> str:
    if not _NAME_RE.match(value):
        raise ConfigError(
            field_name, f"{value!r} is not a valid name (letters, digits, '_', '-', '.'; at most 64)"
        )
    return value

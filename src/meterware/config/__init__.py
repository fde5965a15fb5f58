"""Configuration: meters, plans, routes and policy, parsed and validated once at start-up.

A configuration comes from a TOML file (``meterware.toml`` or the path in ``METERWARE_CONFIG``), a dict,
or keyword arguments. ``METERWARE_STORAGE`` (or ``METERWARE_REDIS_URL``) overrides the storage URL.
Every mistake raises one :class:`~meterware.errors.ConfigError` naming the field, e.g.
``meterware.toml: plans.pro.meters.tokens.price: must be a number of credits with at most 6 decimals``.
Nothing here does I/O except reading the file.

Import from here; the modules behind it: ``_sections`` (the value of each section), ``_routes`` (path
matching), ``_credits`` (exact amounts), ``_table`` (typed reading with field paths), ``_parse`` (each
section's parser) and ``_load`` (:class:`Config` and where it comes from).
"""

from __future__ import annotations

from meterware.config import _sections
from meterware.config._credits import (
    MAX_CALL_COST,
    MAX_MICROS,
    MAX_UNITS,
    MICROS_PER_CREDIT,
    format_credits,
    parse_credits,
)
from meterware.config._load import DEFAULT_CONFIG_FILE, DEFAULTS, Config, redacted, resolve_config
from meterware.config._parse import parse_alert_rules
from meterware.config._routes import DEFAULT_EXCLUDE, UNMATCHED_ROUTE, Routes
from meterware.config._sections import *  # noqa: F403  # every name of its __all__

__all__ = [
    "DEFAULTS",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_EXCLUDE",
    "MAX_CALL_COST",
    "MAX_MICROS",
    "MAX_UNITS",
    "MICROS_PER_CREDIT",
    "UNMATCHED_ROUTE",
    "Config",
    "Routes",
    "format_credits",
    "parse_alert_rules",
    "parse_credits",
    "redacted",
    "resolve_config",
]
__all__ += _sections.__all__

"""Exceptions raised by meterware."""

from __future__ import annotations


class MeterwareError(Exception):
    """Base class of every error meterware raises."""


class ConfigError(MeterwareError):
    """The configuration is invalid; the message names the field and the problem."""

    def __init__(self, field: str, problem: str, *, source: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}")


class StorageError(MeterwareError):
    """The storage backend failed or could not be reached (wraps the driver's exception)."""


class NotFoundError(MeterwareError):
    """A customer, key or other record does not exist."""


class UsageError(MeterwareError):
    """A handler reported units that cannot be metered (unknown meter, bad value)."""

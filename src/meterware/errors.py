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
    """The storage backend failed or could not be reached (wraps the driver's exception).

    ``refused``: the backend answered and refused this very input (e.g. a key of the wrong type), so
    retrying it unchanged fails again; otherwise the failure may pass (connection, timeout, memory).
    ``customers``: a refused flush that is about these customers' stored values alone (the rest of the
    batch can go without their calls).
    """

    def __init__(self, message: str, *, refused: bool = False, customers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.refused = refused
        self.customers = customers


class UnsafeStorageError(MeterwareError):
    """The backend would lose money (a Redis that evicts keys, or too old): the app and the worker refuse
    to start on it; the message names the setting and how to allow it."""


class NotFoundError(MeterwareError):
    """A customer, key or other record does not exist."""


class UsageError(MeterwareError):
    """A handler reported units that cannot be metered (unknown meter, bad value)."""

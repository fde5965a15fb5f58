"""Old import path of :mod:`meterware.metering.unsettled`."""

from meterware.metering.unsettled import CallChange, Snapshot, Unsettled

__all__ = ["CallChange", "Snapshot", "Unsettled"]

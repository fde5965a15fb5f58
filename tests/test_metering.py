"""The shared request-path core's own rules (the behaviour suite covers it through every adapter)."""

from __future__ import annotations

import logging

import pytest

from meterware._metering import ThrottledWarning


def test_outage_warnings_are_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """Failing calls during an outage log one warning per interval, then say how many were held back."""
    warning = ThrottledWarning(interval=3600)
    with caplog.at_level(logging.WARNING, logger="meterware"):
        for _ in range(1000):
            warning.warn("admission failed (%s)", "Connection refused")
    assert [r.getMessage() for r in caplog.records] == [
        "meterware: backend failed: admission failed (Connection refused)"
    ]
    warning._next = 0.0  # the interval has passed
    with caplog.at_level(logging.WARNING, logger="meterware"):
        warning.warn("admission failed (%s)", "Connection refused")
    assert caplog.records[-1].getMessage() == (
        "meterware: backend failed: admission failed (Connection refused) (999 more like it held back)"
    )

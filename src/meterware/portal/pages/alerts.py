"""Alerts: the customer's own thresholds and where alerts go, and the alerts that fired."""

from __future__ import annotations

from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    raise NotImplementedError

"""Usage over time: each meter by hour and by day, calls by outcome; tables and CSV of the same data."""

from __future__ import annotations

from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    raise NotImplementedError  # built next, on the usage history and the charts


def download(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    raise NotImplementedError

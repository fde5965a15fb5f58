"""Invoices (the running one and every closed period's, line by line, CSV and JSON) and credits (the
balance and the ledger, newest first, a page at a time)."""

from __future__ import annotations

from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse


def invoices(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    raise NotImplementedError


def invoice(ctx: html.PageContext, request: PortalRequest, period: str) -> PortalResponse:
    raise NotImplementedError


def invoice_download(ctx: html.PageContext, request: PortalRequest, period: str, fmt: str) -> PortalResponse:
    raise NotImplementedError


def credits(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    raise NotImplementedError

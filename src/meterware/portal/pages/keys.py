"""API keys: the customer's keys, and creating, rotating and revoking one, each confirmed on a page of
its own. A new key's plaintext is shown once, on the page that created it, and is never stored."""

from __future__ import annotations

import time
from typing import Final

from markupsafe import Markup

from meterware.errors import NotFoundError, UsageError
from meterware.keys import NewKey
from meterware.metering.records import KeyRecord
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse

#: Keys a customer may hold through the portal: working ones, and all of them (revoked ones are kept).
MAX_ACTIVE_KEYS: Final = 25
MAX_KEYS: Final = 500
#: Grace periods offered when rotating a key: (seconds, label).
GRACE_CHOICES: Final = (
    (0, "none: the old key stops now"),
    (3600, "1 hour"),
    (86_400, "24 hours"),
    (604_800, "7 days"),
)


def _status(record: KeyRecord, now_ms: int) -> Markup:
    if record.status == "revoked":
        return Markup('<span class="status-revoked">revoked</span>')
    if record.expires_ms and record.expires_ms <= now_ms:
        return Markup('<span class="status-expired">expired</span>')
    if record.expires_ms:
        return Markup('<span class="status-active">active until {}</span>').format(
            html.when(record.expires_ms / 1000)
        )
    return Markup('<span class="status-active">active</span>')


def _last_used(record: KeyRecord) -> Markup:
    """When the key was last used, as far as the rollup has seen its calls."""
    ms = record.last_used_ms
    return html.data(f"keys.{record.key_id}.last_used", html.when(ms / 1000) if ms else "never", ms)


def _owned(ctx: html.PageContext, key_id: str) -> KeyRecord:
    """The key if it is this customer's (another customer's key is as unknown as a made-up id)."""
    record = ctx.accounts.storage.get_key(key_id)
    if record is None or record.customer != ctx.customer.id:
        raise NotFoundError(f"no key {key_id!r}")
    return record


def _too_many(ctx: html.PageContext, *, replacing: bool = False) -> Markup | None:
    """Why the customer may not get another key here, if so: a session must not grow the backend without
    bound (the seller can still issue keys with the CLI or ``Accounts``). A replacement without a grace
    period (``replacing``) is bounded by the total only: the key it replaces stops at once."""
    now_ms = int(time.time() * 1000)
    records = ctx.accounts.list_keys(ctx.customer.id)
    if len(records) >= MAX_KEYS:
        return html.notice(f"This account has {len(records)} keys: ask us to remove old ones.", kind="error")
    if not replacing and sum(_usable(record, now_ms) for record in records) >= MAX_ACTIVE_KEYS:
        return html.notice(f"You have {MAX_ACTIVE_KEYS} working keys: revoke one first.", kind="error")
    return None


def _usable(record: KeyRecord, now_ms: int) -> bool:
    return record.status == "active" and not (record.expires_ms and record.expires_ms <= now_ms)


def index(ctx: html.PageContext, request: PortalRequest, *, shown: Markup | None = None) -> PortalResponse:
    """The customer's keys, newest first, with ``shown`` (a new key, a notice) above them."""
    now_ms = int(time.time() * 1000)
    records = sorted(
        ctx.accounts.list_keys(ctx.customer.id), key=lambda r: (r.created, r.key_id), reverse=True
    )
    rows = []
    for record in records:
        actions = Markup("")
        if _usable(record, now_ms):
            actions = Markup('<a href="{}">Rotate</a> \u00b7 <a href="{}">Revoke</a>').format(
                ctx.url(f"/keys/{record.key_id}/rotate"), ctx.url(f"/keys/{record.key_id}/revoke")
            )
        rows.append(
            (
                Markup('<code data-key="{}">{}\u2026</code>').format(record.key_id, record.prefix),
                "live" if record.live else "test",
                html.when(record.created),
                _last_used(record),
                _status(record, now_ms),
                actions,
            )
        )
    body = Markup("<h1>API keys</h1>{}{}<h2>New key</h2>{}").format(
        shown or Markup(""),
        html.table(
            "Your keys, newest first",
            ["Key", "Mode", "Created", "Last used", "Status", ""],
            rows,
            name="keys",
            empty="No keys yet.",
        ),
        Markup('<p><a href="{}">Create a key</a></p>').format(ctx.url("/keys/new")),
    )
    return html.page(ctx, title="API keys", current="/keys", body=body)


def _shown_once(new: NewKey, what: str) -> Markup:
    return Markup(
        '<div class="notice ok" role="status"><p>{} Copy it now: it is shown only once.</p>'
        '<p class="secret" data-field="new-key">{}</p></div>'
    ).format(what, new.plaintext)


def create(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """The new-key form; its post creates a live or test key and shows it once."""
    if request.method == "POST":
        refused = _too_many(ctx)
        if refused is not None:
            return index(ctx, request, shown=refused)
        live = request.form.get("mode", "live") != "test"
        new = ctx.accounts.create_key(ctx.customer.id, live=live)
        return index(ctx, request, shown=_shown_once(new, f"Your new {'live' if live else 'test'} key:"))
    mode = html.field_row(
        "Mode",
        Markup(
            '<select id="mode" name="mode"><option value="live">live: charged</option>'
            '<option value="test">test: never charged</option></select>'
        ),
        hint="Test keys are for development: their calls are metered apart and never charged.",
    )
    body = Markup("<h1>Create an API key</h1>{}").format(
        html.form(ctx, "/keys/new", mode, "Create key", name="create-key")
    )
    return html.page(ctx, title="Create an API key", current="/keys", body=body)


def rotate(ctx: html.PageContext, request: PortalRequest, key_id: str) -> PortalResponse:
    """The rotation's confirmation, with the grace period; its post issues the replacement."""
    record = _owned(ctx, key_id)
    now_ms = int(time.time() * 1000)
    if not _usable(record, now_ms):
        return index(
            ctx, request, shown=html.notice(f"Key {record.prefix}\u2026 is not active.", kind="warn")
        )
    if request.method == "POST":
        try:
            grace = int(request.form.get("grace", "0"))
        except ValueError:
            grace = -1
        if grace not in {seconds for seconds, _ in GRACE_CHOICES}:
            return index(
                ctx, request, shown=html.notice("Choose a grace period from the list.", kind="error")
            )
        refused = _too_many(ctx, replacing=grace == 0)
        if refused is not None:
            return index(ctx, request, shown=refused)
        try:
            new = ctx.accounts.rotate_key(key_id, grace_seconds=grace)
        except UsageError as error:  # a key counting its uses is rotated without grace
            return index(ctx, request, shown=html.notice(f"{error}.", kind="error"))
        ends = "stops working now" if grace == 0 else f"keeps working for {dict(GRACE_CHOICES)[grace]}"
        return index(
            ctx,
            request,
            shown=_shown_once(new, f"Key {record.prefix}\u2026 was rotated and {ends}. Its replacement:"),
        )
    # A key counting its uses hands them over and stops at once: no grace to choose.
    choices, default = (GRACE_CHOICES, 86_400) if record.remaining is None else (GRACE_CHOICES[:1], 0)
    options = Markup("").join(
        Markup('<option value="{}"{}>{}</option>').format(
            seconds, Markup(" selected") if seconds == default else "", label
        )
        for seconds, label in choices
    )
    grace_field = html.field_row(
        "Grace period",
        Markup('<select id="grace-period" name="grace">{}</select>').format(options),
        hint="How long the old key keeps working, so you can deploy the new one first.",
    )
    body = Markup("<h1>Rotate key {}\u2026</h1><p>A new key replaces it.</p>{}").format(
        record.prefix, html.form(ctx, f"/keys/{key_id}/rotate", grace_field, "Rotate key", name="rotate-key")
    )
    return html.page(ctx, title="Rotate a key", current="/keys", body=body)


def revoke(ctx: html.PageContext, request: PortalRequest, key_id: str) -> PortalResponse:
    """The revocation's confirmation; its post stops the key at once."""
    record = _owned(ctx, key_id)
    if request.method == "POST":
        if record.status != "revoked":
            ctx.accounts.revoke_key(key_id)
        notice = html.notice(
            f"Key {record.prefix}\u2026 is revoked: calls with it are refused from now on.", kind="ok"
        )
        return index(ctx, request, shown=notice)
    body = Markup(
        "<h1>Revoke key {}\u2026</h1><p>Calls with this key are refused at once. This cannot be undone.</p>{}"
    ).format(
        record.prefix,
        html.form(ctx, f"/keys/{key_id}/revoke", Markup(""), "Revoke key", danger=True, name="revoke-key"),
    )
    return html.page(ctx, title="Revoke a key", current="/keys", body=body)

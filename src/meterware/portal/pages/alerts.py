"""Alerts: the thresholds in force (the customer's own or its plan's) and a form to set them, where the
customer wants its alerts to go, and the alerts that fired, newest first.

The seller's rollup worker fires the alerts and sends them to the seller's own webhook, which carries the
customer's destinations as ``notify``: the seller's code emails the customer or forwards the alert.
Nothing here, nor the worker, sends anything to an address the customer typed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from markupsafe import Markup

from meterware.billing.alerts import Alert, checked_thresholds
from meterware.billing.destinations import MAX_EMAIL_CHARS, MAX_URL_CHARS, check_email, check_webhook_url
from meterware.config import MICROS_PER_CREDIT, AlertRules, format_credits, parse_credits
from meterware.errors import MeterwareError
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse

#: Fired alerts listed, the latest.
FIRED_SHOWN: Final = 50


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of threshold as the page shows it."""

    #: The field of :class:`~meterware.config.AlertRules` and the form's field name.
    name: str
    #: The form field's label (errors name it too).
    label: str
    #: What the thresholds watch, in the table of those in force.
    watches: str
    example: str


KINDS: Final = (
    Kind("quota_percent", "Quota percentages", "Quota used", "80, 100"),
    Kind("credits_below", "Credits below", "Credit balance below", "10, 1"),
    Kind("spend_above", "Spend above", "Spend this period above", "100"),
)


def _values(rules: AlertRules, kind: Kind) -> tuple[int, ...] | None:
    values: tuple[int, ...] | None = getattr(rules, kind.name)
    return values


def _shown(kind: Kind, values: tuple[int, ...]) -> str:
    """Thresholds for people: ``80%, 100%`` or ``10.00, 1,000.00`` credits, or ``none``."""
    if kind.name == "quota_percent":
        return ", ".join(f"{value}%" for value in values) or "none"
    return ", ".join(html.credits(value) for value in values) or "none"


def _exact(kind: Kind, values: tuple[int, ...]) -> str:
    """Thresholds as ``meterware alerts show --json`` writes them, comma-separated."""
    if kind.name == "quota_percent":
        return ",".join(str(value) for value in values)
    return ",".join(format_credits(value) for value in values)


def _editable(kind: Kind, values: tuple[int, ...] | None) -> str:
    """Thresholds as the form takes them back (no thousands separators, credits without trailing zeros)."""
    if values is None:
        return ""
    if not values:
        return "none"
    if kind.name == "quota_percent":
        return ", ".join(str(value) for value in values)
    return ", ".join(f"{(Decimal(value) / MICROS_PER_CREDIT).normalize():f}" for value in values)


def _parts(text: str) -> list[str] | None:
    """A field's thresholds: None when blank (the plan's), [] for "none", else the comma-separated values."""
    if not text.strip():
        return None
    if text.strip().lower() == "none":
        return []
    return [part.strip() for part in text.split(",") if part.strip()]


def _percents(parts: list[str]) -> list[int | str]:
    """Whole numbers as numbers; anything else stays text, for the check to name it."""
    return [int(part) if part.isascii() and part.isdigit() and len(part) < 10 else part for part in parts]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a form post did: its notice, and after an error the text sent back and the fields at fault."""

    notice: Markup = field(default_factory=Markup)
    submitted: Mapping[str, str] = field(default_factory=dict)
    invalid: frozenset[str] = frozenset()

    def control(self, name: str, status_id: str) -> Markup:
        """The attributes marking field ``name`` invalid, pointing at the notice (``status_id``) on why."""
        if name not in self.invalid:
            return Markup("")
        return Markup(' aria-invalid="true" aria-describedby="{}"').format(status_id)


def _save_thresholds(ctx: html.PageContext, request: PortalRequest) -> Outcome:
    """Set the customer's own thresholds from the form: all of them, or none if one field is wrong."""
    submitted = {kind.name: request.form.get(kind.name, "") for kind in KINDS}
    parts = {kind.name: _parts(submitted[kind.name]) for kind in KINDS}
    errors = {}
    for kind in KINDS:
        given = parts[kind.name]
        if given is None:
            continue
        try:
            checked_thresholds(
                kind.name, _percents(given) if kind.name == "quota_percent" else given, kind.label
            )
        except MeterwareError as error:
            errors[kind.name] = str(error)
    if errors:
        notice = html.notice("; ".join(errors.values()) + ". Nothing was saved.", kind="error")
        return Outcome(notice, submitted, frozenset(errors))
    quota, below, above = (parts[kind.name] for kind in KINDS)
    # The form states all of the customer's own thresholds: a blank field falls back to the plan's.
    ctx.accounts.set_alerts(
        ctx.customer.id,
        quota_percent=None if quota is None else [int(part) for part in quota],
        credits_below=below,
        spend_above=above,
        clear=True,
    )
    return Outcome(html.notice("Your thresholds are saved.", kind="ok"))


def _save_destinations(ctx: html.PageContext, request: PortalRequest) -> Outcome:
    submitted = {name: request.form.get(name, "") for name in ("email", "webhook_url")}
    for name, check in (("email", check_email), ("webhook_url", check_webhook_url)):
        try:
            if submitted[name].strip():
                check(submitted[name])
        except MeterwareError as error:
            message = str(error)
            notice = html.notice(f"{message[:1].upper()}{message[1:]}. Nothing was saved.", kind="error")
            return Outcome(notice, submitted, frozenset({name}))
    ctx.accounts.set_alert_destinations(
        ctx.customer.id, email=submitted["email"], webhook_url=submitted["webhook_url"]
    )
    return Outcome(html.notice("Where your alerts go is saved.", kind="ok"))


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    outcomes: dict[str, Outcome] = {}
    if request.method == "POST":
        action = request.form.get("action", "")
        if action == "thresholds":
            outcomes["thresholds"] = _save_thresholds(ctx, request)
        elif action == "reset":
            ctx.accounts.set_alerts(ctx.customer.id, clear=True)
            outcomes["thresholds"] = Outcome(html.notice("Your plan's thresholds apply again.", kind="ok"))
        elif action == "destinations":
            outcomes["destinations"] = _save_destinations(ctx, request)
        else:
            outcomes["thresholds"] = Outcome(
                html.notice("This form is not one of this page's.", kind="error")
            )
    body = Markup("<h1>Alerts</h1>{}{}{}{}").format(
        _disabled_notice(ctx),
        _thresholds(ctx, outcomes.get("thresholds", Outcome())),
        _destinations(ctx, outcomes.get("destinations", Outcome())),
        _fired(ctx),
    )
    return html.page(ctx, title="Alerts", current="/alerts", body=body)


def _disabled_notice(ctx: html.PageContext) -> Markup:
    if ctx.config.alerts.enabled:
        return Markup("")
    return html.notice(
        "Alerts are not switched on for this service yet: your settings are kept, but no alert fires.",
        kind="warn",
    )


def _thresholds(ctx: html.PageContext, outcome: Outcome) -> Markup:
    own = ctx.accounts.own_alert_rules(ctx.customer.id)
    plans = ctx.config.alerts.rules_for(ctx.customer.plan)
    rows = []
    fields = []
    for kind in KINDS:
        mine, theirs = _values(own, kind), _values(plans, kind) or ()
        in_force = theirs if mine is None else mine
        watches = kind.watches
        if kind.name == "credits_below" and not ctx.config.plan(ctx.customer.plan).prepaid:
            watches += " (prepaid plans only: not watched on yours)"
        rows.append(
            (
                watches,
                html.data(f"alerts.{kind.name}", _shown(kind, in_force), _exact(kind, in_force)),
                html.data(f"alerts.{kind.name}.source", "your plan's" if mine is None else "yours"),
            )
        )
        value = outcome.submitted.get(kind.name, _editable(kind, mine))
        fields.append(
            html.field_row(
                kind.label,
                Markup('<input type="text" id="{}" name="{}" value="{}" autocomplete="off"{}>').format(
                    html.slug(kind.label), kind.name, value, outcome.control(kind.name, "thresholds-status")
                ),
                hint=f"Comma-separated, e.g. {kind.example}. Blank: your plan's ({_shown(kind, theirs)}); "
                "none: no alerts of this kind.",
            )
        )
    table = html.table(
        "Thresholds in force: each fires once per billing period",
        ["Alert when", "Thresholds", "Set by"],
        rows,
        name="thresholds",
    )
    reset = Markup("")
    if own != AlertRules():
        reset = html.form(
            ctx,
            "/alerts",
            Markup('<input type="hidden" name="action" value="reset">'),
            "Use the plan's thresholds",
            name="reset-thresholds",
        )
    hint = Markup(
        "<p>Quota percentages count the units used against each quota of your plan; credits below watch "
        "your prepaid balance (prepaid plans); spend above watches the credits spent this period. At most "
        "10 of each.</p>"
    )
    form = html.form(
        ctx,
        "/alerts",
        Markup('<input type="hidden" name="action" value="thresholds">') + Markup("").join(fields),
        "Save thresholds",
        name="thresholds",
    )
    return Markup(
        '<h2>Thresholds</h2><div id="thresholds-status">{}</div>{}{}<h3>Set your own</h3>{}{}'
    ).format(outcome.notice, table, reset, hint, form)


def _destinations(ctx: html.PageContext, outcome: Outcome) -> Markup:
    stored = ctx.accounts.alert_destinations(ctx.customer.id)
    facts = html.definition_list(
        {
            "Email": html.data("alerts.email", stored.email or "none", stored.email or ""),
            "Webhook URL": html.data(
                "alerts.webhook_url", stored.webhook_url or "none", stored.webhook_url or ""
            ),
        }
    )
    email = html.field_row(
        "Email address",
        Markup(
            '<input type="email" id="email-address" name="email" value="{}" maxlength="{}" '
            'autocomplete="email"{}>'
        ).format(
            outcome.submitted.get("email", stored.email or ""),
            MAX_EMAIL_CHARS,
            outcome.control("email", "destinations-status"),
        ),
        hint="One address. Blank: no email.",
    )
    url = html.field_row(
        "Webhook URL",
        Markup('<input type="url" id="webhook-url" name="webhook_url" value="{}" maxlength="{}"{}>').format(
            outcome.submitted.get("webhook_url", stored.webhook_url or ""),
            MAX_URL_CHARS,
            outcome.control("webhook_url", "destinations-status"),
        ),
        hint="An https:// URL of a public host that you own, without a user name or password (put a secret "
        "token in its path or query instead). Blank: no webhook.",
    )
    help_text = Markup(
        "<p>When an alert fires, this service's alert system is told, with these destinations, and emails "
        "you or forwards the alert to your URL as JSON: its id (the same on every retry), type "
        "(quota.threshold, credits.low or spend.threshold), threshold, value and time. The metering "
        "system itself never connects to your URL.</p>"
    )
    form = html.form(
        ctx,
        "/alerts",
        Markup('<input type="hidden" name="action" value="destinations">') + email + url,
        "Save destinations",
        name="destinations",
    )
    return Markup('<h2>Where alerts go</h2><div id="destinations-status">{}</div>{}{}{}').format(
        outcome.notice, help_text, facts, form
    )


def _credits_text(text: str) -> str:
    """An alert's amount (``"10.000000"``) for people; as stored if it is not one."""
    try:
        return html.credits(parse_credits(text, "amount"))
    except MeterwareError:
        return text


def fired_row(alert: Alert) -> tuple[object, ...]:
    """A fired alert as a table row: when, what, threshold, value, its billing period."""
    if alert.type == "quota.threshold":
        what = f"{alert.meter} quota used"
        threshold, value = f"{alert.threshold}%", f"{alert.value}% ({alert.used} of {alert.quota})"
    elif alert.type == "credits.low":
        what, threshold, value = (
            "Credit balance low",
            _credits_text(alert.threshold),
            _credits_text(alert.value),
        )
    else:
        what, threshold, value = (
            "Spend this period",
            _credits_text(alert.threshold),
            _credits_text(alert.value),
        )
    return (
        Markup('<span data-alert="{}">{}</span>').format(alert.id, html.when(alert.created)),
        what,
        html.data("alert.threshold", threshold, alert.threshold),
        html.data("alert.value", value, alert.value),
        html.day(alert.period_start),
    )


def _fired(ctx: html.PageContext) -> Markup:
    fired = reversed(ctx.accounts.alerts(ctx.customer.id, limit=FIRED_SHOWN))
    table = html.table(
        f"Alerts that fired, newest first (the latest {FIRED_SHOWN})",
        ["When", "Alert", "Threshold", "Value", "Billing period from"],
        [fired_row(alert) for alert in fired],
        name="alerts",
        empty="No alert has fired.",
    )
    return Markup("<h2>Alerts that fired</h2>{}").format(table)

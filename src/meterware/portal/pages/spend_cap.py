"""The spend cap: the one in force (the customer's own or their plan's), the period's spend against it, and
a form to lower it, or set one where there was none. Raising it is the seller's
(:meth:`~meterware.billing.accounts.Accounts.set_spend_cap`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from markupsafe import Markup

from meterware.config import MAX_MICROS, MICROS_PER_CREDIT, format_credits
from meterware.errors import UsageError
from meterware.portal import html
from meterware.portal.http import PortalRequest, PortalResponse, redirect

#: A cap as the form takes it: ASCII digits, at most 6 decimals (``[0-9]`` never matches other scripts'
#: digits, which Python's Decimal would take).
CAP_PATTERN: Final = re.compile(r"([0-9]+)(?:\.([0-9]{1,6}))?")
#: Whole credits' digits a cap may have (the largest amount, 9,007,199,254 credits, has 10).
MAX_WHOLE_DIGITS: Final = len(str(MAX_MICROS // MICROS_PER_CREDIT))
#: Whose the cap is, for people.
SOURCES: Final = {"customer": "you", "plan": "your plan", "none": "no cap is set"}
#: Characters of a refused value sent back into the form.
SHOWN_BACK: Final = 40


def parse_cap(text: str) -> int:
    """The cap typed in the form in micro-credits; UsageError (one line, never the value) if it is not one."""
    text = text.strip(" \t")
    if not text:
        raise UsageError("enter a spend cap in credits, e.g. 20 or 20.50")
    if text.startswith("-"):
        raise UsageError("a spend cap cannot be negative")
    matched = CAP_PATTERN.fullmatch(text)
    if matched is None:
        raise UsageError("write the spend cap with the digits 0-9 and at most 6 decimals, e.g. 20 or 20.50")
    whole, fraction = matched[1], matched[2] or ""
    too_large = UsageError(f"a spend cap is at most {html.credits(MAX_MICROS)} credits")
    if len(whole) > MAX_WHOLE_DIGITS:  # refused before a long run of digits is read as a number
        raise too_large
    micros = int(whole) * MICROS_PER_CREDIT + int(fraction.ljust(6, "0"))
    if micros > MAX_MICROS:
        raise too_large
    return micros


@dataclass(frozen=True, slots=True)
class CapFacts:
    """The cap in force and the period's spend against it, as the pages show them."""

    #: Micro-credits per period, None: no cap.
    cap: int | None
    #: Whose the cap is: ``customer`` (their own), ``plan`` or ``none``.
    source: str
    #: Micro-credits spent on live calls this period, as rolled up.
    spent: int

    @classmethod
    def read(cls, ctx: html.PageContext, spent: int | None = None) -> CapFacts:
        """The facts of ``ctx``'s customer (``spent``: the period's spend, when the page read it already)."""
        cap = ctx.accounts.spend_cap(ctx.customer.id)
        source = "none" if cap is None else "customer" if ctx.customer.spend_cap is not None else "plan"
        if spent is None:
            spent = ctx.accounts.usage(ctx.customer.id).spend
        return cls(cap, source, spent)

    def cap_shown(self) -> Markup:
        if self.cap is None:
            return html.data("spend_cap", "none")
        return html.data("spend_cap", f"{html.credits(self.cap)} credits", self.cap)

    def source_shown(self) -> Markup:
        return html.data("spend_cap.source", SOURCES[self.source], self.source)

    def details(self) -> list[Markup]:
        """Whose the cap is, the spend against it and what is left, a line each."""
        source = self.source_shown()
        spent = self.spent_shown()
        if self.cap is None:
            return [source, Markup("{} spent this period").format(spent)]
        return [
            Markup("set by {}").format(source),
            Markup("{} spent this period").format(spent),
            Markup("{} left").format(self.left_shown()),
        ]

    def spent_shown(self) -> Markup:
        return html.data("spend_cap.spent", html.credits(self.spent), self.spent)

    def left_shown(self) -> Markup:
        left = max(0, (self.cap or 0) - self.spent)
        return html.data("spend_cap.left", html.credits(left), left)

    def gauge(self) -> Markup:
        if not self.cap:
            return Markup("")
        return Markup(
            '<meter min="0" max="{}" value="{}" aria-label="Spend of the spend cap">{}%</meter>'
        ).format(self.cap, min(self.spent, self.cap), round(100 * self.spent / self.cap))


def card(ctx: html.PageContext, spent: int) -> Markup:
    """The overview's card: the cap, whose it is, the spend against it, and the way to lower it."""
    facts = CapFacts.read(ctx, spent)
    action = "Set a spend cap" if facts.cap is None else "Lower your spend cap"
    lines = [*facts.details(), Markup('<a href="{}">{}</a>').format(ctx.url("/spend-cap"), action)]
    return Markup(
        '<section class="card"><h3>Spend cap per period</h3><div class="big">{}</div>{}'
        '<div class="sub">{}</div></section>'
    ).format(facts.cap_shown(), facts.gauge(), Markup("<br>").join(lines))


def lower(ctx: html.PageContext, text: str) -> str | None:
    """Lower the customer's cap to ``text`` (or set one where there is none); why not, if refused."""
    try:
        micros = parse_cap(text)
        current = ctx.accounts.spend_cap(ctx.customer.id)
        if current is not None and micros > current:
            return (
                f"You can lower your spend cap, not raise it: it is {html.credits(current)} credits per "
                "billing period. To raise it, contact us."
            )
        # Checks again against the cap in force (the seller may have changed it since it was read).
        ctx.accounts.lower_spend_cap(ctx.customer.id, format_credits(micros))
    except UsageError as error:
        message = str(error)
        return f"{message[:1].upper()}{message[1:]}. Nothing was changed."
    return None


def show(ctx: html.PageContext, request: PortalRequest) -> PortalResponse:
    """The cap in force and the form; a successful post is redirected here (a reload posts nothing)."""
    status, submitted, invalid = Markup(""), "", False
    if request.method == "POST":
        submitted = request.form.get("cap", "")
        problem = lower(ctx, submitted)
        if problem is None:
            return redirect(ctx.url("/spend-cap", done="lowered"))
        status, invalid = html.notice(problem, kind="error"), True
    facts = CapFacts.read(ctx)
    if request.query.get("done") == "lowered" and facts.cap is not None and not invalid:
        status = html.notice(
            f"Your spend cap is now {html.credits(facts.cap)} credits per billing period.", kind="ok"
        )
    seconds = ctx.config.policy.key_cache_ttl
    explained = Markup(
        "<p>Calls with your live keys are refused (429, spend_cap_reached) when this billing period's spend, "
        "with what the calls in flight hold, would pass the cap, until the period ends. Test keys are never "
        "charged, so never capped. A change applies to your calls within {} seconds. The spend shown "
        "trails your calls by a few seconds.</p>"
    ).format(f"{seconds:g}")
    facts_list = html.definition_list(
        {
            "Spend cap in force": facts.cap_shown(),
            "Set by": facts.source_shown(),
            "Spent this period": facts.spent_shown(),
            **({} if facts.cap is None else {"Left": facts.left_shown()}),
        }
    )
    limit = "no cap now" if facts.cap is None else f"at most {html.credits(facts.cap)}"
    control = Markup(
        '<input type="text" id="new-spend-cap" name="cap" value="{}" inputmode="decimal" '
        'autocomplete="off" required{}>'
    ).format(
        submitted[:SHOWN_BACK],
        Markup(' aria-invalid="true" aria-describedby="spend-cap-status"') if invalid else "",
    )
    form = html.form(
        ctx,
        "/spend-cap",
        html.field_row(
            "New spend cap",
            control,
            hint=f"Credits per billing period, e.g. 20 or 20.50 ({limit}). You can lower your cap or set "
            "one; only we can raise it.",
        ),
        "Lower the spend cap" if facts.cap is not None else "Set the spend cap",
        name="spend-cap",
    )
    body = Markup('<h1>Spend cap</h1><div id="spend-cap-status">{}</div>{}{}<h2>{}</h2>{}').format(
        status,
        explained,
        facts_list,
        "Lower your spend cap" if facts.cap is not None else "Set a spend cap",
        form,
    )
    return html.page(ctx, title="Spend cap", current="", body=body)

"""Alerts: thresholds of quota, credits and spend, fired once per billing period, as signed webhooks.

The rollup worker evaluates the customers of each batch it commits (:class:`AlertEvaluator`): the usage of
their billing period against the quotas of their plan, their prepaid balance, and their period spend.
Each (customer, period, rule, threshold) fires at most once: the backend appends the alert to the shard's
alerts stream and sets its marker in one atomic step that does nothing if the marker is there, so two
workers, a restart or a replayed batch never fire twice. A fired alert is logged (``meterware.alerts``)
and, with ``alerts.webhook_url``, POSTed by a background thread (:class:`WebhookSender`, from
:mod:`meterware.billing.webhooks`) with the customer's own destinations as ``notify`` (see
:mod:`meterware.billing.destinations`: the seller's code emails or forwards; meterware never does), signed::

    Meterware-Signature: t=1767225600,v1=<hex HMAC-SHA256 of "1767225600.<body>" with the secret>
    Meterware-Event-Id: alrt_...        (the same for every attempt: receivers dedupe on it)

Verify it on the receiving side with :func:`verify_signature` (the scheme is Stripe's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from meterware.billing.destinations import AlertDestinations, destinations_from_json
from meterware.billing.webhooks import EVENT_ID_HEADER as EVENT_ID_HEADER
from meterware.billing.webhooks import SIGNATURE_HEADER as SIGNATURE_HEADER
from meterware.billing.webhooks import WebhookSender, sign, verify_signature
from meterware.config import AlertRules, Config, Plan, format_credits, parse_credits
from meterware.errors import ConfigError, StorageError, UsageError
from meterware.metering.cache import LRUCache
from meterware.metering.periods import period_bounds
from meterware.metering.records import Customer
from meterware.storage._keyspace import shard_of
from meterware.storage.base import START_OFFSET, RollupCommit, Storage

if TYPE_CHECKING:
    from meterware.rollup.metrics import RollupMetrics

__all__ = [
    "Alert",
    "AlertEvaluator",
    "Crossing",
    "WebhookSender",
    "checked_thresholds",
    "crossings",
    "read_alerts",
    "rules_from_json",
    "rules_to_json",
    "sign",
    "verify_signature",
    "webhook_secret",
]

logger = logging.getLogger("meterware.alerts")

AlertType = Literal["quota.threshold", "credits.low", "spend.threshold"]
#: An alert's marker outlives the end of its period by this much (a late event may still cross a threshold).
MARKER_GRACE_SECONDS: Final = 35 * 86_400
#: Fired alerts an evaluator remembers (so it skips asking the backend again); forgotten all at once past it.
MAX_REMEMBERED: Final = 100_000


def _percent(used: int, quota: int) -> str:
    return str((Decimal(used) * 100 / Decimal(quota)).quantize(Decimal("0.01"), rounding=ROUND_DOWN))


# -- what fires -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold the customer's numbers are past: an alert, if it has not fired this period yet."""

    type: AlertType
    #: Names the rule and threshold, unique within a customer's period (``quota:calls:80``).
    rule: str
    #: The threshold and the value that crossed it: a percentage (quota) or credits (``"10.000000"``).
    threshold: str
    value: str
    #: Quota alerts: the meter, its quota and the units used.
    meter: str | None = None
    quota: int | None = None
    used: int | None = None


def crossings(rules: AlertRules, plan: Plan, usage: Mapping[str, int], balance: int | None) -> list[Crossing]:
    """Every threshold of ``rules`` that ``usage`` (the period window) and ``balance`` are past.

    Quotas are reached at ``used >= percent% of quota`` (hard and soft quotas alike; a quota of 0 has
    no percentage); credits are low *below* a threshold (prepaid plans, ``balance`` in micro-credits,
    None: not evaluated); spend (``usage["spend"]``, micro-credits) is *above* a threshold.
    """
    found: list[Crossing] = []
    for meter, terms in plan.meters.items():
        if not terms.quota:
            continue
        used = usage.get(meter, 0)
        for percent in rules.quota_percent or ():
            if used * 100 >= percent * terms.quota:
                found.append(
                    Crossing(
                        "quota.threshold",
                        f"quota:{meter}:{percent}",
                        str(percent),
                        _percent(used, terms.quota),
                        meter,
                        terms.quota,
                        used,
                    )
                )
    if balance is not None and plan.prepaid:
        for below in rules.credits_below or ():
            if balance < below:
                found.append(
                    Crossing(
                        "credits.low", f"credits:{below}", format_credits(below), format_credits(balance)
                    )
                )
    spend = usage.get("spend", 0)
    for above in rules.spend_above or ():
        if spend > above:
            found.append(
                Crossing("spend.threshold", f"spend:{above}", format_credits(above), format_credits(spend))
            )
    return found


@dataclass(frozen=True, slots=True)
class Alert:
    """A fired alert: what the alerts stream holds, the log says and the webhook body carries."""

    id: str
    type: AlertType
    customer: str
    period_start: int
    threshold: str
    value: str
    #: When it fired, epoch seconds.
    created: int
    meter: str | None = None
    quota: int | None = None
    used: int | None = None
    #: The alerts stream entry (empty until stored).
    entry_id: str = field(default="", compare=False)
    #: Where the customer wants it to go, as the worker read it when the alert fired (not on the stream).
    notify: AlertDestinations | None = field(default=None, compare=False)

    @classmethod
    def of(cls, customer: str, period_start: int, crossing: Crossing, created: int) -> Alert:
        """The alert of ``crossing``; its id is the same whoever computes it (receivers dedupe on it)."""
        digest = hashlib.sha256(f"{customer}\n{period_start}\n{crossing.rule}".encode()).hexdigest()
        return cls(
            f"alrt_{digest[:24]}",
            crossing.type,
            customer,
            period_start,
            crossing.threshold,
            crossing.value,
            created,
            crossing.meter,
            crossing.quota,
            crossing.used,
        )

    def as_dict(self) -> dict[str, Any]:
        """The alert as its stream entry and the CLI hold it (quota alerts add meter, quota and used)."""
        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "customer": self.customer,
            "period_start": self.period_start,
            "threshold": self.threshold,
            "value": self.value,
            "created": self.created,
        }
        if self.meter is not None:
            data |= {"meter": self.meter, "quota": self.quota, "used": self.used}
        return data

    def body(self) -> bytes:
        """The webhook's JSON body: :meth:`as_dict`, and ``notify`` (the customer's destinations) if known."""
        data = self.as_dict()
        if self.notify is not None:
            data["notify"] = self.notify.as_dict()
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    def fields(self) -> dict[str, str]:
        """The alert as the fields of its stream entry."""
        return {key: str(value) for key, value in self.as_dict().items()}

    @classmethod
    def from_entry(cls, entry_id: str, fields: Mapping[bytes, bytes]) -> Alert:
        """Read an alert back from its stream entry."""
        text = {key.decode(): value.decode() for key, value in fields.items()}
        kind = text["type"]
        if kind not in get_args(AlertType):
            raise ValueError(f"alert entry {entry_id} has an unknown type {kind!r}")
        return cls(
            text["id"],
            kind,  # type: ignore[arg-type]  # checked above
            text["customer"],
            int(text["period_start"]),
            text["threshold"],
            text["value"],
            int(text["created"]),
            text.get("meter"),
            int(text["quota"]) if "quota" in text else None,
            int(text["used"]) if "used" in text else None,
            entry_id,
        )

    def describe(self) -> str:
        """One line for logs and the CLI."""
        start = datetime.fromtimestamp(self.period_start, UTC).strftime("%Y-%m-%d")
        if self.type == "quota.threshold":
            what = f"used {self.value}% of its {self.meter} quota ({self.used} of {self.quota}), "
            what += f"past {self.threshold}%"
        elif self.type == "credits.low":
            what = f"has {self.value} credits left, below {self.threshold}"
        else:
            what = f"spent {self.value} credits, above {self.threshold}"
        return f"{self.type} {self.id}: customer {self.customer} {what} (period from {start})"


#: Thresholds of each kind a customer may set (each can fire once a period).
MAX_OWN_THRESHOLDS: Final = 10


def checked_thresholds(kind: str, values: Sequence[object], name: str = "") -> tuple[int, ...]:
    """A customer's ``values`` of one kind (``quota_percent``, ``credits_below``, ``spend_above``) as
    stored: distinct, sorted, amounts in micro-credits.

    :raises UsageError: (ConfigError for an amount) naming ``name`` (default: ``kind``): more than
        :data:`MAX_OWN_THRESHOLDS`, or one that is not a percentage from 1 to 1000 or an amount of credits.
    """
    name = name or kind
    if len(values) > MAX_OWN_THRESHOLDS:
        raise UsageError(f"{name}: at most {MAX_OWN_THRESHOLDS} thresholds, got {len(values)}")
    if kind != "quota_percent":
        return tuple(sorted({parse_credits(value, name) for value in values}))
    percents = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise UsageError(f"{name}: must be whole percentages from 1 to 1000, got {value!r}")
        percents.add(value)
    return tuple(sorted(percents))


def rules_to_json(rules: AlertRules) -> str:
    """A customer's own thresholds as stored in the backend (amounts in micro-credits)."""
    data = {
        name: list(value)
        for name, value in (
            ("quota_percent", rules.quota_percent),
            ("credits_below", rules.credits_below),
            ("spend_above", rules.spend_above),
        )
        if value is not None
    }
    return json.dumps(data, sort_keys=True)


def rules_from_json(text: str | None) -> AlertRules:
    """Read back :func:`rules_to_json`; what is unreadable counts as no override."""
    if not text:
        return AlertRules()
    try:
        data = json.loads(text)

        def numbers(name: str) -> tuple[int, ...] | None:
            value = data.get(name)
            return None if value is None else tuple(int(item) for item in value)

        return AlertRules(numbers("quota_percent"), numbers("credits_below"), numbers("spend_above"))
    except (ValueError, TypeError, AttributeError):
        logger.warning("ignoring unreadable alert thresholds %r", text[:200])
        return AlertRules()


# -- evaluation (in the rollup worker) --------------------------------------------------------------


class AlertEvaluator:
    """Fire the alerts of customers whose usage a rollup commit moved.

    Evaluation is level-triggered: it compares the period's totals with every threshold, so a batch whose
    evaluation failed (backend error) is caught up by the customer's next one, and a threshold crossed
    before alerts were configured fires at the next batch.

    :param sender: delivers fired alerts as webhooks (None: the stream and the log only).
    """

    def __init__(
        self,
        storage: Storage,
        config: Config,
        *,
        sender: WebhookSender | None = None,
        metrics: RollupMetrics | None = None,
    ) -> None:
        self.storage = storage
        self.config = config
        self.sender = sender
        self.metrics = metrics
        # (customer, marker name) known to have fired: a threshold stays crossed for the rest of its
        # period, and asking the backend again at every batch would cost a script call each time.
        self._fired: LRUCache[tuple[str, str], bool] = LRUCache(MAX_REMEMBERED)

    @classmethod
    def from_config(
        cls, storage: Storage, config: Config, *, metrics: RollupMetrics | None = None
    ) -> AlertEvaluator:
        """The evaluator ``[alerts]`` describes; its webhook secret is read from the environment."""
        settings = config.alerts
        sender = None
        secret = webhook_secret(config)
        if settings.webhook_url and secret:
            sender = WebhookSender(
                settings.webhook_url,
                secret,
                attempts=settings.webhook_attempts,
                timeout=settings.webhook_timeout,
                metrics=metrics,
            )
        return cls(storage, config, sender=sender, metrics=metrics)

    def rules_for(self, customer: Customer) -> AlertRules:
        """The customer's thresholds: its own, over its plan's, over everyone's."""
        own = rules_from_json(self.storage.get_alert_rules(customer.id))
        return own.over(self.config.alerts.rules_for(customer.plan))

    def after_commit(self, commit: RollupCommit) -> list[Alert]:
        """Evaluate the customers whose live billing period the commit added to; return what fired."""
        fired: list[Alert] = []
        periods = sorted({(w.customer, w.start) for w in commit.windows if w.live and w.window == "period"})
        for customer, period_start in periods:
            try:
                fired += self.evaluate(customer, period_start)
            except StorageError as error:
                # The commit stands; the customer's next batch evaluates its totals again.
                logger.warning("alerts of customer %s not evaluated: %s", customer, error)
        return fired

    def evaluate(self, customer_id: str, period_start: int, *, now: float | None = None) -> list[Alert]:
        """Fire what the customer's period has crossed and has not fired yet; return what fired."""
        customer = self.storage.get_customer(customer_id)
        if customer is None:
            return []
        rules = self.rules_for(customer)
        if not (rules.quota_percent or rules.credits_below or rules.spend_above):
            return []
        now = time.time() if now is None else now
        self.config.stored.refresh(self.config, self.storage.stored_plans)
        plan = self.config.plan_for(customer, now)
        _, period_end = period_bounds(customer.anchor, plan.period, period_start)
        usage = self.storage.read_usage(customer_id, True, "period", period_start)
        balance = None
        # The balance is now's, so it speaks for the current period only.
        if rules.credits_below and plan.prepaid and period_start <= now < period_end:
            balance = self.storage.get_balance(customer_id).balance
        fired = []
        notify: AlertDestinations | None = None
        for crossing in crossings(rules, plan, usage, balance):
            name = f"{period_start}:{crossing.rule}"
            if (customer_id, name) in self._fired:
                continue
            if notify is None:  # read before firing: once fired, a failed read would lose the webhook
                notify = destinations_from_json(self.storage.get_alert_destinations(customer_id))
            alert = Alert.of(customer_id, period_start, crossing, int(now))
            expires_at = max(period_end, int(now)) + MARKER_GRACE_SECONDS
            entry_id = self.storage.fire_alert(customer_id, name, expires_at, alert.fields())
            self._fired.put((customer_id, name), True)
            if entry_id is None:
                continue  # fired before (by us, a restarted us, or another worker)
            alert = replace(alert, entry_id=entry_id, notify=notify)
            fired.append(alert)
            logger.warning("alert %s", alert.describe())
            if self.metrics is not None:
                self.metrics.alerts.labels(alert.type).inc()
            if self.sender is not None:
                self.sender.submit(alert)
        return fired

    def close(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout`` seconds) for the webhooks still being delivered."""
        if self.sender is not None:
            self.sender.close(timeout)


def webhook_secret(config: Config) -> str | None:
    """The webhook's HMAC secret, from the environment (None without a webhook).

    :raises ConfigError: naming ``alerts.secret_env`` when the variable is unset or empty.
    """
    settings = config.alerts
    if not (settings.enabled and settings.webhook_url):
        return None
    secret = os.environ.get(settings.secret_env, "")
    if not secret:
        raise ConfigError(
            "alerts.secret_env",
            f"the environment variable {settings.secret_env} (the webhook's secret) is not set",
        )
    return secret


def read_alerts(storage: Storage, *, customer: str | None = None, limit: int = 100) -> list[Alert]:
    """The latest ``limit`` alerts of every shard's alerts stream (of one customer: its shard's only),
    oldest first."""
    found: list[Alert] = []
    shards = range(storage.shards) if customer is None else [shard_of(customer, storage.shards)]
    for shard in shards:
        after = START_OFFSET
        while True:
            entries = storage.read_alerts(shard, after, 1000)
            for entry in entries:
                try:
                    alert = Alert.from_entry(entry.entry_id, entry.fields)
                except (KeyError, ValueError, UnicodeDecodeError) as error:
                    logger.warning("unreadable alert entry %s: %s", entry.entry_id, error)
                    continue
                if customer is None or alert.customer == customer:
                    found.append(alert)
            if len(entries) < 1000:
                break
            after = entries[-1].entry_id
    found.sort(key=lambda alert: (alert.created, alert.entry_id))
    return found[-limit:] if limit > 0 else []

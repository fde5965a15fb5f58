"""A customer's own alert thresholds, and the alerts fired."""

from __future__ import annotations

from collections.abc import Sequence

from meterware.billing.accounts._base import AccountsBase
from meterware.billing.alerts import Alert, read_alerts, rules_from_json, rules_to_json
from meterware.config import AlertRules, parse_credits
from meterware.errors import UsageError


class AlertThresholds(AccountsBase):
    """Set and read the thresholds in force for a customer; list the alerts fired."""

    def set_alerts(
        self,
        customer_id: str,
        *,
        quota_percent: Sequence[int] | None = None,
        credits_below: Sequence[str | int] | None = None,
        spend_above: Sequence[str | int] | None = None,
        clear: bool = False,
    ) -> AlertRules:
        """Set the customer's own alert thresholds; return the ones now in force.

        Each list given replaces the plan's (an empty list: none of that kind); the others stay as they
        were. ``clear`` drops the customer's own thresholds first. Amounts are credits (``"2.50"``).
        """
        self.customer(customer_id)
        own = AlertRules() if clear else rules_from_json(self.storage.get_alert_rules(customer_id))
        if quota_percent is not None:
            for value in quota_percent:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                    raise UsageError(f"quota_percent must be whole percentages from 1 to 1000, got {value!r}")
            own = AlertRules(tuple(sorted(set(quota_percent))), own.credits_below, own.spend_above)
        if credits_below is not None:
            micros = sorted({parse_credits(value, "credits_below") for value in credits_below})
            own = AlertRules(own.quota_percent, tuple(micros), own.spend_above)
        if spend_above is not None:
            micros = sorted({parse_credits(value, "spend_above") for value in spend_above})
            own = AlertRules(own.quota_percent, own.credits_below, tuple(micros))
        empty = own == AlertRules()
        self.storage.set_alert_rules(customer_id, None if empty else rules_to_json(own))
        return self.alert_rules(customer_id)

    def alert_rules(self, customer_id: str) -> AlertRules:
        """The customer's thresholds in force: its own, over its plan's, over the configuration's."""
        customer = self.customer(customer_id)
        own = rules_from_json(self.storage.get_alert_rules(customer_id))
        return own.over(self.config.alerts.rules_for(customer.plan))

    def alerts(self, customer_id: str | None = None, *, limit: int = 100) -> list[Alert]:
        """The latest fired alerts (of one customer), oldest first, from the alerts streams."""
        return read_alerts(self.storage, customer=customer_id, limit=limit)

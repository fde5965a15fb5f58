"""A customer's own alert thresholds and destinations, and the alerts fired."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from meterware.billing.accounts._base import AccountsBase
from meterware.billing.alerts import Alert, checked_thresholds, read_alerts, rules_from_json, rules_to_json
from meterware.billing.destinations import (
    AlertDestinations,
    check_email,
    check_webhook_url,
    destinations_from_json,
    destinations_to_json,
)
from meterware.config import AlertRules


def _checked(value: str | None, check: Callable[[str], str]) -> str | None:
    """None for None, "" for blank text, else ``check``'s answer."""
    if value is None:
        return None
    return check(value) if value.strip() else ""


class AlertThresholds(AccountsBase):
    """Set and read the thresholds in force for a customer and where its alerts go; list the alerts fired."""

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
        were. ``clear`` drops the customer's own thresholds first. Amounts are credits (``"2.50"``). At most
        10 of each kind (:data:`~meterware.billing.alerts.MAX_OWN_THRESHOLDS`); nothing is stored unless
        every list is valid.
        """
        self.customer(customer_id)
        given = {
            kind: checked_thresholds(kind, values)
            for kind, values in (
                ("quota_percent", quota_percent),
                ("credits_below", credits_below),
                ("spend_above", spend_above),
            )
            if values is not None
        }
        own = AlertRules() if clear else rules_from_json(self.storage.get_alert_rules(customer_id))
        own = replace(own, **given)
        empty = own == AlertRules()
        self.storage.set_alert_rules(customer_id, None if empty else rules_to_json(own))
        return self.alert_rules(customer_id)

    def alert_rules(self, customer_id: str) -> AlertRules:
        """The customer's thresholds in force: its own, over its plan's, over the configuration's."""
        customer = self.customer(customer_id)
        own = rules_from_json(self.storage.get_alert_rules(customer_id))
        return own.over(self.config.alerts.rules_for(customer.plan))

    def own_alert_rules(self, customer_id: str) -> AlertRules:
        """The customer's own thresholds alone (a list that is None: its plan's is in force)."""
        self.customer(customer_id)
        return rules_from_json(self.storage.get_alert_rules(customer_id))

    def set_alert_destinations(
        self, customer_id: str, *, email: str | None = None, webhook_url: str | None = None
    ) -> AlertDestinations:
        """Set where the customer's alerts go; return the destinations now stored.

        None leaves a destination as it is, ``""`` removes it. The email address must be one plausible
        address, the URL an ``https://`` URL of a public host without credentials
        (:mod:`meterware.billing.destinations`); both are checked before anything is stored. meterware
        sends to neither: the alerts webhook carries them (``notify``) for the seller's code to act on.
        """
        self.customer(customer_id)
        checked_email = _checked(email, check_email)
        checked_url = _checked(webhook_url, check_webhook_url)
        current = destinations_from_json(self.storage.get_alert_destinations(customer_id))
        updated = AlertDestinations(
            current.email if checked_email is None else checked_email or None,
            current.webhook_url if checked_url is None else checked_url or None,
        )
        self.storage.set_alert_destinations(customer_id, destinations_to_json(updated))
        return updated

    def alert_destinations(self, customer_id: str) -> AlertDestinations:
        """Where the customer wants its alerts to go (what the alerts webhook carries as ``notify``)."""
        self.customer(customer_id)
        return destinations_from_json(self.storage.get_alert_destinations(customer_id))

    def alerts(self, customer_id: str | None = None, *, limit: int = 100) -> list[Alert]:
        """The latest fired alerts (of one customer), oldest first, from the alerts streams."""
        return read_alerts(self.storage, customer=customer_id, limit=limit)

"""Stored plans: plans kept in the backend as versions, so a new plan needs no restart
(:mod:`meterware.config._stored`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from meterware.billing.accounts._base import AccountsBase
from meterware.config import Plan
from meterware.config._overrides import MAX_ACTOR_LENGTH
from meterware.config._stored import PlanVersion, dump_plan_versions, load_plan_versions, parse_stored_plan
from meterware.errors import ConfigError, NotFoundError, StorageError, UsageError

#: Writes retried when another change of the same plan lands in between.
SET_ATTEMPTS: Final = 10


class StoredPlanning(AccountsBase):
    """Store plans in the backend, list them, and read a plan's history."""

    def set_plan(self, name: str, table: Mapping[str, Any], *, actor: str = "api") -> PlanVersion:
        """Store a new version of the plan ``name``: ``table`` is what ``[plans.NAME]`` of the config file
        holds (``{"prepaid": True, "meters": {"calls": {"price": "0.01"}}}``), checked by the same parser.

        A name the config file defines is refused. Every process sees the change within
        ``policy.key_cache_ttl`` seconds (a customer moved to the plan: once its key's cached record,
        also kept that long, is read again)."""
        try:
            parse_stored_plan(name, table, self.config)
        except ConfigError as error:
            raise UsageError(f"plan {error.field}: {error.problem}") from None
        actor = " ".join(str(actor).split())[:MAX_ACTOR_LENGTH] or "api"
        version = PlanVersion(int(time.time()), actor, dict(table))
        for _ in range(SET_ATTEMPTS):
            record = self.storage.stored_plans().get(name, "")
            try:
                versions = load_plan_versions(record)
            except ValueError:
                versions = ()  # a record that no longer parses: the new version replaces it
            if self.storage.swap_stored_plan(name, record, dump_plan_versions((*versions, version))):
                self.refresh_plans(force=True)
                return version
        raise StorageError(f"could not store plan {name!r}: other changes kept landing")

    def stored_plans(self) -> dict[str, Plan]:
        """The stored plans that parse, by name (those of the config file are in ``config.plans``)."""
        self.refresh_plans(force=True)
        return dict(self.config.stored.plans)

    def plan_history(self, name: str) -> list[PlanVersion]:
        """Every kept version of the stored plan ``name``, oldest first (the last one is in force)."""
        record = self.storage.stored_plans().get(name)
        if record is None:
            raise NotFoundError(f"no stored plan {name!r}")
        try:
            return list(load_plan_versions(record))
        except ValueError as error:
            raise UsageError(f"stored plan {name!r} {error}") from None

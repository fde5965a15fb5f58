"""A fault test's deployment: its configuration, its customer, and the processes it starts."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meterware import Accounts, Config
from meterware.keys import NewKey
from meterware.metering.records import Customer, KeyRecord
from meterware.storage import open_storage
from tests.faults.books import Books, Stream, books
from tests.faults.harness import (
    CUSTOMER,
    INITIAL_CREDITS,
    SHARDS,
    TIMEOUT,
    App,
    FaultRedis,
    Worker,
    base_env,
    rollup_once,
)
from tests.faults.proxy import RedisProxy
from tests.helpers import merged, new_customer, to_toml


def base_config(url: str, spool_dir: Path) -> dict[str, Any]:
    """The configuration the fault tests start from (tests replace single settings)."""
    return {
        "storage": {"url": url, "shards": SHARDS},
        "meters": {
            "calls": {"aggregation": "count"},
            "tokens": {"aggregation": "sum", "source": "handler"},
            "rows": {"aggregation": "sum", "source": "handler"},  # counted, never priced
        },
        "plans": {
            "payg": {
                "prepaid": True,
                "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
            },
        },
        "routes": {"exclude": ["/health", "/metrics"]},
        "policy": {
            "on_backend_error": "open",
            "timeout": TIMEOUT,
            "reservation_timeout": 2.0,
            "key_cache_ttl": 10.0,
        },
        "pipeline": {
            "flush_interval": 0.05,
            "flush_timeout": 1.0,
            "batch_size": 200,
            "spool_dir": str(spool_dir),
        },
        "rollup": {"lease_seconds": 1.0},
    }


def open_accounts(config_path: Path, url: str | None = None) -> Accounts:
    """Accounts on the configured backend, or on ``url`` (Redis itself, when the app goes through a proxy)."""
    config = Config.from_file(config_path)
    return Accounts(open_storage(url or config.storage, shards=config.shards, timeout=10), config)


def provision(accounts: Accounts, customer: str = CUSTOMER) -> NewKey:
    """A customer on the ``payg`` plan with credits, and a live key."""
    return new_customer(accounts, customer, str(INITIAL_CREDITS))


def restore(accounts: Accounts, customer: Customer, key: NewKey) -> None:
    """Provision the same customer and key again on an empty backend (as a restore from backup would)."""
    accounts.storage.create_customer(customer)
    accounts.grant_credits(customer.id, str(INITIAL_CREDITS))
    record = KeyRecord(key.key_id, customer.id, key.prefix, key.live, "active", int(time.time()))
    accounts.storage.add_key(record, key.hash)


class Scenario:
    """A fault test's deployment: a Redis it may kill, a configuration (the base one with ``changes``) whose
    spool is ``spool``, the customer ``acme`` with credits and a live ``key``, and the ``env`` of the app and
    worker processes.

    With a ``proxy``, the app and worker reach Redis through it while the test itself (accounts, the books,
    the one-off rollup) goes to Redis directly.
    """

    def __init__(
        self,
        tmp_path: Path,
        server: FaultRedis,
        proxy: RedisProxy | None,
        changes: Mapping[str, Any],
        make_app: Callable[..., App],
        make_worker: Callable[..., Worker],
    ) -> None:
        self.server = server
        self.proxy = proxy
        self.spool = tmp_path / "spool"
        self.config = tmp_path / "meterware.toml"
        url = proxy.url() if proxy else server.url
        self.config.write_text(to_toml(merged(base_config(url, self.spool), changes)))
        self.env = base_env(self.config)
        #: The environment of a process of the test's own, which reaches Redis directly.
        self.direct = {**self.env, "METERWARE_STORAGE": server.url} if proxy else self.env
        self.rollup_log = tmp_path / "rollup.log"
        self.accounts = self.open_accounts()
        self.new_key = provision(self.accounts)
        self.key = self.new_key.plaintext
        self._make_app = make_app
        self._make_worker = make_worker

    def open_accounts(self) -> Accounts:
        """Accounts on Redis itself, on a new connection (Redis may have been restarted)."""
        return open_accounts(self.config, self.server.url)

    def app(self, kind: str = "uvicorn", **options: Any) -> App:
        """Start the metered app under ``uvicorn`` or ``gunicorn`` (``options``: see :class:`App`)."""
        return self._make_app(kind, self.env, **options).start()

    def worker(self, *options: str) -> Worker:
        """Start a continuous rollup worker (``options``: its command-line options)."""
        return self._make_worker(self.env, *options)

    def rollup_once(self) -> str:
        return rollup_once(self.direct, self.rollup_log)

    def stream(self, *, valid_only: bool = False) -> Stream:
        return Stream.read(self.server.client(), valid_only=valid_only)

    def books(self, customer: str = CUSTOMER) -> Books:
        accounts = self.open_accounts()
        try:
            return books(accounts, customer)
        finally:
            accounts.close()

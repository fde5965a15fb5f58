"""Refused calls by reason on the portal's overview and usage pages: calls refused by the real middleware
(and events of reasons no admission gives), flushed and rolled up by the real worker, on memory and Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

import meterware.portal
from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.rollup import RollupWorker
from meterware.storage._keyspace import shard_of
from meterware.wsgi import WSGIMeteringMiddleware
from tests.portal.test_portal_auth import SECRET, follow_link, link_path
from tests.rollup.helpers import batch, event


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)


@pytest.fixture
def config(storage_url: str, tmp_path: Any) -> Config:
    """A plan of two calls a period (hard quota): the third call is refused."""
    return Config.from_dict(
        {
            "storage": {"url": storage_url, "shards": 4},
            "plans": {"capped": {"meters": {"calls": {"quota": 2, "quota_mode": "hard"}}}},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
            "portal": {"base_url": "http://testserver/portal", "secure_cookies": False},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    for customer in ("acme", "globex"):
        accounts.create_customer(customer, plan="capped")
    yield accounts
    accounts.close()


def refuse_calls(config: Config, accounts: Accounts) -> None:
    """acme: 2 calls served and 2 refused over its quota by the middleware, then a call refused as
    rate limited and one for a reason no admission gives, written to the stream; all rolled up."""

    def api(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    metered = WSGIMeteringMiddleware(api, config=config, registry=CollectorRegistry())
    client = Client(metered)
    auth = {"Authorization": f"Bearer {accounts.create_key('acme').plaintext}"}
    statuses = []
    for _ in range(4):
        with client.get("/v1/things", headers=auth) as response:
            response.get_data()  # read to its end: a body left unread is an aborted call, not charged
            statuses.append(response.status_code)
    assert statuses == [200, 200, 429, 429]
    period = accounts.usage("acme").period_start
    now_ms = int(time.time() * 1000)
    written = [
        event("acme", ts=now_ms, outcome="rejected", reason="rate_limited", period_start=period),
        event("acme", ts=now_ms, outcome="rejected", reason="<script>", period_start=period),
    ]
    assert accounts.storage.flush(batch(shard_of("acme", accounts.storage.shards), written))
    metered.drain()  # memory:// is rolled up here, in the app's process (its worker holds the shards)
    RollupWorker(accounts.storage, config, owner="refusals-test").drain()


def signed_in(config: Config, customer: str) -> Client:
    client = Client(meterware.portal.wsgi_app(config))
    response = follow_link(client, link_path(meterware.portal.sign_in_link(customer, config=config)))
    assert response.status_code == 303, response.text
    return client


def data_fields(page: str) -> dict[str, str]:
    """Every ``data-field`` of a page with its ``data-value``."""
    return dict(re.findall(r'data-field="([^"]+)" data-value="([^"]*)"', page))


class _Tables(HTMLParser):
    """The cells of each ``data-table``, row by row (headers included)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("data-table") or "", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def test_the_overview_lists_refused_calls_under_rejected_by_reason(
    config: Config, accounts: Accounts
) -> None:
    """The outcome table has a row per reason that occurred, under rejected, each marked with its count."""
    refuse_calls(config, accounts)
    page = signed_in(config, "acme").get("/").text
    fields = data_fields(page)
    assert fields["calls.success"] == "2"
    assert fields["calls.rejected"] == "4"
    refusals = {name: value for name, value in fields.items() if name.startswith("refusals.")}
    assert refusals == {"refusals.rate_limited": "1", "refusals.quota_exceeded": "2", "refusals.other": "1"}
    rows = tables(page)["calls"]
    labels = [row[0] for row in rows]
    rejected = labels.index("rejected")
    assert labels[rejected + 1 :] == [
        "rejected: rate limited",
        "rejected: quota exceeded",
        "rejected: other",
    ]
    assert [row[1] for row in rows[rejected:]] == ["4", "1", "2", "1"]
    assert "<script>" not in page


def test_the_overview_of_a_customer_never_refused_has_no_reason_rows(
    config: Config, accounts: Accounts
) -> None:
    refuse_calls(config, accounts)
    page = signed_in(config, "globex").get("/").text
    fields = data_fields(page)
    assert fields["calls.rejected"] == "0"
    assert not [name for name in fields if name.startswith("refusals.")]


def test_the_usage_page_tables_refused_calls_by_reason_per_hour_and_day(
    config: Config, accounts: Accounts
) -> None:
    """After each outcome chart, a table of the refused calls with a column per reason that occurred; the
    outcome charts and their tables stay as they were."""
    refuse_calls(config, accounts)
    page = signed_in(config, "acme").get("/usage").text
    found = tables(page)
    for window in ("hour", "day"):
        rows = found[f"{window}-refusals"]
        assert rows[0] == ["Start (UTC)", "rate limited", "quota exceeded", "other"]
        # One row (two if the clock crossed into the next hour or day in between).
        assert 1 <= len(rows[1:]) <= 2
        assert [sum(int(row[column]) for row in rows[1:]) for column in (1, 2, 3)] == [1, 2, 1]
        assert found[f"{window}-outcomes"][0] == [
            "Start (UTC)",
            "success",
            "client error",
            "server error",
            "aborted",
            "rejected",
        ]
        assert page.index(f'data-table="{window}-outcomes"') < page.index(f'data-table="{window}-refusals"')
    assert 'data-chart="hour-outcomes"' in page
    assert "<script>" not in page


def test_the_usage_page_of_a_customer_never_refused_says_so(config: Config, accounts: Accounts) -> None:
    page = signed_in(config, "globex").get("/usage").text
    found = tables(page)
    for window in ("hour", "day"):
        assert found[f"{window}-refusals"] == [["Start (UTC)"], ["No call was refused in this range."]]

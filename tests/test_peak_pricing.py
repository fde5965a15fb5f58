"""Max and last meters priced on invoices: the peak (``max``) or the closing value (``last``) of a
billing period, read from the rollup's period window, priced per unit beyond what is included, or by a
package or tiers. The request path never charges them (their value is known only when the period ends),
so only invoiced plans may price them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import meterware
from meterware import Accounts, Config, MeteringMiddleware
from meterware.errors import ConfigError
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from tests.helpers import lifespan


def settings(storage: str) -> dict[str, Any]:
    return {
        "storage": {"url": storage, "shards": 2},
        "meters": {
            "calls": {},
            "seats": {"aggregation": "max", "source": "handler"},
            "storage_gb": {"aggregation": "last", "source": "handler"},
        },
        "plans": {
            # 5.00 a seat at the period's peak past 2 included; 0.10 a GB held at its end past 10; seats
            # above 20 at 1.00 (graduated tiers on a peak).
            "team": {
                "meters": {
                    "seats": {"included": 2, "price": "5.00"},
                    "storage_gb": {"included": 10, "price": "0.10"},
                },
            },
            "volume": {
                "meters": {
                    "seats": {"tier_mode": "graduated", "tiers": [{"up_to": 5, "price": "2"}, {"price": "1"}]}
                },
            },
        },
        "pipeline": {"flush_interval": 0.01},
        "policy": {"timeout": 5.0},
    }


async def report(request: Request) -> PlainTextResponse:
    for meter in ("seats", "storage_gb"):
        if meter in request.query_params:
            meterware.usage.add(meter, int(request.query_params[meter]))
    return PlainTextResponse("ok")


class Api:
    def __init__(self, storage: str) -> None:
        self.config = Config.from_dict(settings(storage))
        self.storage = open_storage(self.config.storage, shards=self.config.shards)
        self.accounts = Accounts(self.storage, self.config)
        self.app = MeteringMiddleware(Starlette(routes=[Route("/v1/report", report)]), config=self.config)
        self.worker = RollupWorker(self.storage, self.config)

    def calls(self, key: str, queries: list[str]) -> None:
        """Calls through the middleware, one after the other (``last`` is the last one's), rolled up."""

        async def serve() -> None:
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api")
            headers = {"Authorization": f"Bearer {key}"}
            async with lifespan(self.app), client:
                for query in queries:
                    assert (await client.get(f"/v1/report?{query}", headers=headers)).status_code == 200
                    await asyncio.sleep(0.002)  # distinct timestamps: ``last`` is the newest

        asyncio.run(serve())
        self.worker.drain()


@pytest.fixture
def api(backend_url: str) -> Iterator[Api]:
    """The API on memory://, a real redis-server, a real 3-node Redis Cluster."""
    served = Api(backend_url)
    yield served
    served.storage.close()


def lines(invoice: meterware.Invoice) -> list[tuple[str | None, int | None, str]]:
    return [(line["meter"], line["quantity"], line["amount"]) for line in invoice.as_dict()["lines"]]


def test_the_peak_and_the_closing_value_are_priced_on_the_invoice(api: Api) -> None:
    """Seats reported 3, 7, 5: the peak is 7, (7 - 2) x 5.00 = 25.00. Storage 12, 30, 25: 25 GB at the
    end, (25 - 10) x 0.10 = 1.50. No credits were charged on the way."""
    customer = f"team-{uuid.uuid4().hex[:6]}"
    api.accounts.create_customer(customer, plan="team")
    key = api.accounts.create_key(customer).plaintext
    api.calls(key, ["seats=3&storage_gb=12", "seats=7&storage_gb=30", "seats=5&storage_gb=25"])
    invoice = api.accounts.invoice(customer)
    assert lines(invoice) == [("seats", 7, "25.00"), ("storage_gb", 25, "1.50")]
    assert str(invoice.total) == "26.50"
    assert api.accounts.usage(customer).spend == 0


def test_a_peak_priced_by_graduated_tiers(api: Api) -> None:
    """A peak of 8 seats on 1-5 at 2.00 then 1.00: 10.00 + 3.00 = 13.00."""
    customer = f"volume-{uuid.uuid4().hex[:6]}"
    api.accounts.create_customer(customer, plan="volume")
    key = api.accounts.create_key(customer).plaintext
    api.calls(key, ["seats=8", "seats=1"])
    assert lines(api.accounts.invoice(customer)) == [("seats", 8, "13.00")]


@pytest.mark.parametrize(
    ("terms", "field", "problem"),
    [
        pytest.param(
            {"prepaid": True, "meters": {"seats": {"price": "1"}}},
            "plans.bad.meters.seats.price",
            "priced on invoices",
            id="prepaid",
        ),
        pytest.param(
            {"meters": {"seats": {"quota": 10}}},
            "plans.bad.meters.seats.quota",
            "cannot carry a quota",
            id="quota",
        ),
    ],
)
def test_a_peak_cannot_be_charged_from_credits_or_hold_a_quota(
    terms: dict[str, Any], field: str, problem: str
) -> None:
    data = settings("memory://")
    data["plans"] = {"bad": terms}
    with pytest.raises(ConfigError, match=problem) as raised:
        Config.from_dict(data)
    assert raised.value.field == field

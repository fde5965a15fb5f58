from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from meterware import Accounts, Config, MeteringMiddleware
from meterware.events import UsageEvent, decode_batch
from meterware.rollup import RollupWorker
from meterware.storage import open_storage
from tests.behaviour.apps import CALLS, FRAMEWORKS


def api_config(storage: str, spool_dir: Path, **sections: Any) -> dict[str, Any]:
    """The configuration every behaviour test starts from (sections replace whole tables)."""
    return {
        "storage": {"url": storage, "shards": 4},
        "meters": {
            "calls": {"aggregation": "count", "source": "call"},
            "weighted": {"aggregation": "sum", "source": "call"},
            "tokens": {"aggregation": "sum", "source": "handler"},
            "header_tokens": {"aggregation": "sum", "source": "header:X-Usage-Tokens"},
        },
        "plans": {
            "free": {"meters": {"calls": {"quota": 5}}},
            "payg": {
                "prepaid": True,
                "meters": {"calls": {"price": "0.01"}, "tokens": {"price": "0.0001"}},
            },
            "percall": {"prepaid": True, "meters": {"calls": {"price": "0.01"}}},
            "pro": {"meters": {"calls": {"included": 3, "price": "0.5"}}},
            "tight": {"rate_limits": ["3/minute"]},
            "open": {},
        },
        "routes": {"exclude": ["/health"], "weights": {"/v1/heavy": 5}},
        "pipeline": {"flush_interval": 0.01, "spool_dir": str(spool_dir)},
        **sections,
    }


class Api:
    """One framework app behind the middleware, with the accounts and rollup around it."""

    def __init__(self, framework: str, config: Config) -> None:
        self.config = config
        self.app = FRAMEWORKS[framework]()
        self.app.add_middleware(MeteringMiddleware, config=config)
        self.storage = open_storage(config.storage, shards=config.shards)
        self.accounts = Accounts(self.storage, config)
        self.raise_server_exceptions = False
        self.client = self._client()
        CALLS.clear()

    def _client(self) -> TestClient:
        return TestClient(self.app, raise_server_exceptions=self.raise_server_exceptions).__enter__()

    def customer(self, plan: str, *, credits: str | None = None, live: bool = True) -> str:
        """Create a customer on ``plan`` and return a fresh key's plaintext."""
        customer_id = f"{plan}-{uuid.uuid4().hex[:8]}"
        self.accounts.create_customer(customer_id, plan=plan)
        if credits:
            self.accounts.grant_credits(customer_id, credits)
        return self.accounts.create_key(customer_id, live=live).plaintext

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.client.request(method, path, headers=headers, **kwargs)

    def settle(self) -> None:
        """Shut the app down (lifespan drains the buffer), roll up, and start it again."""
        self.client.__exit__(None, None, None)
        RollupWorker(self.storage, self.config).drain()
        self.client = self._client()

    def customer_of(self, key: str) -> str:
        from meterware.keys import hash_key

        info = self.storage.resolve_key(hash_key(key))
        assert info is not None
        return info.customer.id

    def usage(self, key: str, *, live: bool = True) -> Any:
        return self.accounts.usage(self.customer_of(key), live=live)

    def balance(self, key: str) -> Any:
        return self.accounts.balance(self.customer_of(key))

    def events(self) -> list[UsageEvent]:
        found: list[UsageEvent] = []
        for shard in range(self.config.shards):
            for entry in self.storage.read_stream(shard, "0-0", 10_000):
                found += decode_batch(entry.fields[b"b"])
        return found

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.storage.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture(params=sorted(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_api(framework: str, backend: str, tmp_path: Path) -> Iterator[Any]:
    apis: list[Api] = []

    def make(**sections: Any) -> Api:
        api = Api(framework, Config.from_dict(api_config(backend, tmp_path / "spool", **sections)))
        apis.append(api)
        return api

    yield make
    for api in apis:
        api.close()


@pytest.fixture
def api(make_api: Any) -> Api:
    return make_api()  # type: ignore[no-any-return]

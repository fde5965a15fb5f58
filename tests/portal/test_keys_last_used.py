"""When each key was last used, end to end: calls (served and refused) through the real middleware, flushed
and rolled up by the real worker, shown by ``meterware keys list`` and the portal's keys page (memory and
Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

import meterware.portal
from meterware.billing.accounts import Accounts
from meterware.cli import main
from meterware.cli._common import utc_time
from meterware.config import Config
from meterware.events import decode_batch
from meterware.keys import NewKey
from meterware.portal import html
from meterware.rollup import RollupWorker
from meterware.storage._keyspace import shard_of
from meterware.wsgi import WSGIMeteringMiddleware
from tests.portal.test_portal_auth import SECRET, follow_link, link_path
from tests.portal.test_refusals import data_fields, tables

QUOTA = 4


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)


@pytest.fixture
def config_file(storage_url: str, tmp_path: Path) -> Path:
    """A plan of four calls a period (hard quota), as a file the CLI reads too."""
    path = tmp_path / "meterware.toml"
    path.write_text(
        f"""
[storage]
url = "{storage_url}"
shards = 4

[plans.capped.meters.calls]
quota = {QUOTA}
quota_mode = "hard"

[pipeline]
spool_dir = "{tmp_path / "spool"}"

[portal]
base_url = "http://testserver/portal"
secure_cookies = false
"""
    )
    return path


@pytest.fixture
def config(config_file: Path) -> Config:
    return Config.load(str(config_file))


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    accounts.create_customer("acme", plan="capped")
    yield accounts
    accounts.close()


def call_with(config: Config, accounts: Accounts, keys: Iterable[NewKey]) -> list[int]:
    """Call the API once with each key in turn, through the metering middleware; roll everything up."""

    def api(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    metered = WSGIMeteringMiddleware(api, config=config, registry=CollectorRegistry())
    client = Client(metered)
    statuses = []
    for key in keys:
        with client.get("/v1/things", headers={"Authorization": f"Bearer {key.plaintext}"}) as response:
            response.get_data()  # read to its end: a body left unread is an aborted call
            statuses.append(response.status_code)
        time.sleep(0.002)  # calls a few milliseconds apart: each key's newest call is its own
    metered.drain()  # memory:// is rolled up here, in the app's process
    RollupWorker(accounts.storage, config, owner="last-used-test").drain()
    return statuses


def newest_events(accounts: Accounts) -> dict[str, tuple[int, str]]:
    """Each key's newest event in the stream: its timestamp and its outcome."""
    newest: dict[str, tuple[int, str]] = {}
    shard = shard_of("acme", accounts.storage.shards)
    for entry in accounts.storage.read_stream(shard, "0-0", 1000):
        for event in decode_batch(entry.fields[b"b"]):
            if event.timestamp_ms >= newest.get(event.key_id, (0, ""))[0]:
                newest[event.key_id] = (event.timestamp_ms, event.outcome)
    return newest


def cli(config_file: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main([*args, "--config", str(config_file)]) == 0
    return capsys.readouterr().out


def test_each_keys_last_use_is_its_newest_call_in_the_cli_and_the_portal(
    config: Config, config_file: Path, accounts: Accounts, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two keys used in turn, the last call refused over the quota: each key's last use is its newest
    event's time (the refused one too); a key never used reads as never, in the CLI and on the page."""
    first, second, idle = (accounts.create_key("acme") for _ in range(3))
    statuses = call_with(config, accounts, [first, second, first, second, first])
    assert statuses == [200] * QUOTA + [429]
    newest = newest_events(accounts)
    assert set(newest) == {first.key_id, second.key_id}
    assert newest[first.key_id][1] == "rejected"
    expected = {
        first.key_id: newest[first.key_id][0],
        second.key_id: newest[second.key_id][0],
        idle.key_id: 0,
    }
    assert expected[first.key_id] > expected[second.key_id] > 0
    assert {record.key_id: record.last_used_ms for record in accounts.list_keys("acme")} == expected

    rows = json.loads(cli(config_file, capsys, "keys", "list", "acme", "--json"))
    assert {row["key_id"]: row["last_used_ms"] for row in rows} == expected
    lines = {line.split()[0]: line for line in cli(config_file, capsys, "keys", "list", "acme").splitlines()}
    for key_id, ms in expected.items():
        assert lines[key_id].endswith(f"last used {utc_time(ms // 1000)}" if ms else "never used")

    client = Client(meterware.portal.wsgi_app(config))
    assert (
        follow_link(client, link_path(meterware.portal.sign_in_link("acme", config=config))).status_code
        == 303
    )
    page = client.get("/keys").text
    fields = data_fields(page)
    assert {key_id: int(fields[f"keys.{key_id}.last_used"]) for key_id in expected} == expected
    table = tables(page)["keys"]
    column = table[0].index("Last used")
    assert sorted(row[column] for row in table[1:]) == sorted(
        html.when(ms / 1000) if ms else "never" for ms in expected.values()
    )

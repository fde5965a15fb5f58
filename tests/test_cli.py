"""The meterware command line, run in-process against a real Redis (and once as a subprocess)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest

from meterware.cli import main
from meterware.config import Config
from meterware.events import UsageEvent, event_row, new_event_id
from meterware.metering.batcher import Batcher
from meterware.metering.batching import Pending
from meterware.metering.flushers import flush_sync
from meterware.metering.periods import period_bounds
from meterware.storage import open_storage
from meterware.storage._keyspace import shard_of
from meterware.storage.base import Settlement
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "meterware.toml"
ANCHOR = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli(Protocol):
    def __call__(self, *args: str, storage: str | None = None) -> Result: ...


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No meterware environment variables, and no ./meterware.toml to pick up."""
    for name in ("METERWARE_CONFIG", "METERWARE_STORAGE", "METERWARE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli(redis_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `meterware <args> --storage <real redis> --config examples/meterware.toml` in-process."""

    def run(*args: str, storage: str | None = None) -> Result:
        capsys.readouterr()
        code = main([*args, "--storage", storage or redis_url, "--config", str(EXAMPLE)])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: Result, message: str) -> None:
    """Exit status 1, nothing on stdout, and exactly 'meterware: error: <message>' on stderr."""
    assert result.code == 1
    assert result.out == ""
    assert result.err == f"meterware: error: {message}\n"


def create_customer(cli: Cli, customer: str = "acme", plan: str = "payg") -> None:
    assert cli("customers", "create", customer, "--plan", plan, "--anchor", str(ANCHOR)).code == 0


# -- customers -----------------------------------------------------------------------------------------


@pytest.mark.redis
def test_customers_create_and_show(cli: Cli) -> None:
    """customers create makes a customer on a plan with an anchor; customers show prints it back."""
    created = cli("customers", "create", "acme", "--plan", "payg", "--anchor", str(ANCHOR))
    assert (created.code, created.out, created.err) == (0, "created customer acme on plan payg\n", "")
    shown = cli("customers", "show", "acme")
    assert shown.out == "acme: plan payg, active, periods anchored at 2026-01-01 00:00:00Z\n"
    assert cli("customers", "show", "acme", "--json").json() == {
        "id": "acme",
        "plan": "payg",
        "status": "active",
        "anchor": ANCHOR,
    }


@pytest.mark.redis
def test_customers_create_defaults(cli: Cli) -> None:
    """Without --plan a customer gets default_plan; without --anchor its periods start now."""
    before = int(time.time())
    data = cli("customers", "create", "acme", "--json").json()
    assert data["plan"] == "free"
    assert before <= data["anchor"] <= int(time.time())


@pytest.mark.redis
def test_customers_list(cli: Cli) -> None:
    """customers list prints one id a line, or says there are none."""
    assert cli("customers", "list").out == "(no customers)\n"
    assert cli("customers", "list", "--json").json() == []
    for customer in ("acme", "globex", "initech"):
        create_customer(cli, customer)
    assert sorted(cli("customers", "list").out.split()) == ["acme", "globex", "initech"]
    assert sorted(cli("customers", "list", "--json").json()) == ["acme", "globex", "initech"]


@pytest.mark.redis
def test_customers_set(cli: Cli) -> None:
    """customers set changes plan and status and shows the result."""
    create_customer(cli)
    result = cli("customers", "set", "acme", "--plan", "pro", "--status", "suspended")
    assert result.out == (
        "acme: plan pro, suspended, periods anchored at 2026-01-01 00:00:00Z\n"
        "  spend cap: 500.000000 credits per period (the plan's)\n"
    )
    assert cli("customers", "set", "acme", "--status", "active", "--json").json()["status"] == "active"


@pytest.mark.redis
@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("customers", "show", "ghost"), "no customer 'ghost'", id="show-unknown"),
        pytest.param(("customers", "set", "ghost", "--plan", "pro"), "no customer 'ghost'", id="set-unknown"),
        pytest.param(
            ("customers", "create", "bad id!"),
            "customer id 'bad id!' must be 1-128 letters, digits, '_', '.', '@' or '-'",
            id="create-bad-id",
        ),
        pytest.param(
            ("customers", "create", "acme\n"),
            "customer id 'acme\\n' must be 1-128 letters, digits, '_', '.', '@' or '-'",
            id="create-trailing-newline",
        ),
        pytest.param(
            ("customers", "create", "acme2", "--plan", "gold"),
            "plan: 'gold' is not defined (known: free, payg, pro, tokens)",
            id="create-unknown-plan",
        ),
        pytest.param(
            ("customers", "set", "acme", "--plan", "gold"),
            "plan: 'gold' is not defined (known: free, payg, pro, tokens)",
            id="set-unknown-plan",
        ),
        pytest.param(("customers", "create", "acme"), "customer 'acme' already exists", id="create-twice"),
        pytest.param(
            ("customers", "create", "far", "--anchor", "99999999999999"),
            "anchor must be epoch seconds between 0 and 253402300799, got 99999999999999",
            id="anchor-out-of-range",
        ),
        pytest.param(("keys", "create", "ghost"), "no customer 'ghost'", id="key-for-unknown-customer"),
        pytest.param(("keys", "list", "ghost"), "no customer 'ghost'", id="keys-of-unknown-customer"),
        pytest.param(("keys", "revoke", "key_nope"), "no key 'key_nope'", id="revoke-unknown-key"),
        pytest.param(("keys", "rotate", "key_nope"), "no key 'key_nope'", id="rotate-unknown-key"),
        pytest.param(("credits", "grant", "ghost", "5"), "no customer 'ghost'", id="grant-unknown-customer"),
        pytest.param(
            ("credits", "grant", "acme", "lots"),
            "amount: must be a number of credits, got 'lots'",
            id="grant-words",
        ),
        pytest.param(
            ("credits", "grant", "acme", "0.0000001"),
            "amount: must be a number of credits with at most 6 decimals, got '0.0000001'",
            id="grant-7-decimals",
        ),
        pytest.param(("credits", "grant", "acme", "0"), "amount must be positive", id="grant-zero"),
        pytest.param(
            ("credits", "grant", "acme", "-5"), "amount: must not be negative, got '-5'", id="grant-neg"
        ),
        pytest.param(("credits", "show", "ghost"), "no customer 'ghost'", id="credits-unknown-customer"),
        pytest.param(("usage", "ghost"), "no customer 'ghost'", id="usage-unknown-customer"),
        pytest.param(
            ("usage", "ghost", "--window", "day"), "no customer 'ghost'", id="history-unknown-customer"
        ),
        pytest.param(
            ("usage", "acme", "--window", "hour", "--from", "soon"),
            "--from must be epoch seconds or a date like 2026-11-01, got 'soon'",
            id="history-bad-from",
        ),
        pytest.param(
            ("usage", "acme", "--window", "hour", "--from", "2026-01-02", "--to", "2026-01-01"),
            "start (2026-01-02T00:00:00Z) must be before end (2026-01-01T00:00:00Z)",
            id="history-reversed",
        ),
        pytest.param(
            ("usage", "acme", "--window", "minute", "--from", "2026-01-01", "--to", "2026-01-03"),
            "2880 minute windows asked for, at most 1000: shorten the range or use a longer window",
            id="history-too-long",
        ),
        pytest.param(
            ("usage", "acme", "--to", "2026-01-03"),
            "--from, --to and --csv need --window (minute, hour or day)",
            id="history-range-without-window",
        ),
        pytest.param(
            ("usage", "acme", "--window", "day", "--period", "previous"),
            "--period and --window exclude each other (--from and --to choose the range)",
            id="history-with-period",
        ),
        pytest.param(
            ("usage", "acme", "--window", "day", "--csv", "--json"),
            "choose one of --json and --csv",
            id="history-json-and-csv",
        ),
        pytest.param(
            ("usage", "acme", "--period", "soon"),
            "--period must be current, previous or a date like 2026-11-01, got 'soon'",
            id="usage-bad-period",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(cli: Cli, args: tuple[str, ...], message: str) -> None:
    """Mistakes exit with status 1 and one clear line on stderr, never a traceback."""
    create_customer(cli)
    assert_one_line_error(cli(*args), message)


@pytest.mark.redis
def test_backend_down_is_one_line_error(cli: Cli) -> None:
    """An unreachable backend is reported in one line with exit status 1."""
    port = free_port()
    result = cli("customers", "list", storage=f"redis://127.0.0.1:{port}/0")
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith(f"meterware: error: Redis at redis://127.0.0.1:{port}/0: ")
    assert result.err.count("\n") == 1


# -- keys ----------------------------------------------------------------------------------------------


@pytest.mark.redis
def test_keys_create_prints_the_plaintext_once(cli: Cli) -> None:
    """keys create prints the new key, its id and a warning that it is shown only now."""
    create_customer(cli)
    result = cli("keys", "create", "acme")
    plaintext, blank, note = result.out.splitlines()
    assert plaintext.startswith("mw_live_")
    assert len(plaintext) == 40
    assert blank == ""
    assert note.startswith("key id key_")
    assert note.endswith("this key is shown once - store it now.")


@pytest.mark.redis
@pytest.mark.parametrize(
    ("flags", "live", "mode"),
    [pytest.param((), True, "live", id="live"), pytest.param(("--test",), False, "test", id="test")],
)
def test_keys_create_json(cli: Cli, flags: tuple[str, ...], live: bool, mode: str) -> None:
    """keys create --json gives the key, its id, its visible prefix and its mode."""
    create_customer(cli)
    data = cli("keys", "create", "acme", *flags, "--json").json()
    assert set(data) == {"key", "key_id", "prefix", "live"}
    assert data["key"].startswith(f"mw_{mode}_")
    assert data["prefix"] == data["key"][:12]
    assert data["key_id"].startswith("key_")
    assert data["live"] is live


@pytest.mark.redis
def test_keys_list_never_shows_the_plaintext(cli: Cli) -> None:
    """keys list shows ids, prefixes, modes and statuses, and never the key itself."""
    create_customer(cli)
    assert cli("keys", "list", "acme").out == "(no keys)\n"
    live = cli("keys", "create", "acme", "--json").json()
    test = cli("keys", "create", "acme", "--test", "--json").json()
    text = cli("keys", "list", "acme")
    as_json = cli("keys", "list", "acme", "--json")
    for output in (text.out, as_json.out):
        assert live["key"] not in output
        assert test["key"] not in output
    assert sorted(text.out.splitlines()) == sorted(
        [
            f"{live['key_id']}  {live['prefix']}...  live  active  never used",
            f"{test['key_id']}  {test['prefix']}...  test  active  never used",
        ]
    )
    rows = {row["key_id"]: row for row in as_json.json()}
    assert set(rows) == {live["key_id"], test["key_id"]}
    assert set(rows[live["key_id"]]) == {
        "key_id",
        "customer",
        "name",
        "prefix",
        "live",
        "status",
        "created",
        "expires_ms",
        "last_used_ms",
        "metadata",
        "remaining",
        "scopes",
        "rate_limits",
    }
    assert (rows[live["key_id"]]["live"], rows[test["key_id"]]["live"]) == (True, False)
    assert rows[live["key_id"]]["expires_ms"] == 0
    assert rows[live["key_id"]]["last_used_ms"] == 0


@pytest.mark.redis
def test_keys_create_with_a_name_metadata_and_an_expiry(cli: Cli) -> None:
    """keys create --name --meta --expires-in keeps them; keys list and keys show print them."""
    create_customer(cli)
    before = time.time()
    created = cli(
        "keys",
        "create",
        "acme",
        "--name",
        "Staging",
        "--meta",
        "team=data",
        "--meta",
        "ticket=OPS-1",
        "--expires-in",
        "30d",
        "--json",
    ).json()
    after = time.time()
    shown = cli("keys", "show", created["key_id"], "--json").json()
    assert (shown["name"], shown["metadata"], shown["customer"]) == (
        "Staging",
        {"team": "data", "ticket": "OPS-1"},
        "acme",
    )
    assert int((before + 30 * 86_400) * 1000) <= shown["expires_ms"] <= int((after + 30 * 86_400) * 1000)
    text = cli("keys", "show", created["key_id"]).out
    assert "'Staging'" in text
    assert ", expires 20" in text
    assert "  team = data\n" in text
    assert created["key"] not in text
    assert "'Staging'" in cli("keys", "list", "acme").out
    scoped = cli("keys", "create", "acme", "--scope", "read", "--scope", "files:write", "--json").json()
    assert cli("keys", "show", scoped["key_id"], "--json").json()["scopes"] == ["read", "files:write"]
    assert "  scopes: read files:write\n" in cli("keys", "show", scoped["key_id"]).out
    counted = cli("keys", "create", "acme", "--remaining", "50", "--json").json()
    assert cli("keys", "show", counted["key_id"], "--json").json()["remaining"] == 50
    assert ", 50 uses left  never used" in cli("keys", "show", counted["key_id"]).out
    at = cli("keys", "create", "acme", "--expires-at", str(int(after) + 60), "--json").json()
    assert cli("keys", "show", at["key_id"], "--json").json()["expires_ms"] == (int(after) + 60) * 1000


@pytest.mark.redis
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(("--meta", "team"), "--meta must be NAME=VALUE, got 'team'", id="meta-without-value"),
        pytest.param(("--expires-in", "soon"), "--expires-in must be seconds or a number", id="bad-duration"),
        pytest.param(
            ("--expires-in", "1d", "--expires-at", "9999999999"),
            "give --expires-in or --expires-at, not both",
            id="two-expiries",
        ),
        pytest.param(("--name", "x" * 101), "a key's name must be printable text", id="long-name"),
    ],
)
def test_keys_create_refuses_bad_terms(cli: Cli, flags: tuple[str, ...], message: str) -> None:
    """Bad names, metadata and expiries are one-line errors, and no key is created."""
    create_customer(cli)
    result = cli("keys", "create", "acme", *flags)
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith(f"meterware: error: {message}")
    assert cli("keys", "list", "acme", "--json").json() == []


@pytest.mark.redis
def test_keys_create_with_a_prefix_and_keys_import(cli: Cli) -> None:
    """keys create --prefix makes <prefix>_...; keys import keeps another system's key by its hash."""
    create_customer(cli)
    custom = cli("keys", "create", "acme", "--prefix", "acme_live", "--json").json()
    assert custom["key"].startswith("acme_live_")
    assert custom["prefix"] == custom["key"][:14]
    key_hash = hashlib.sha256(b"sk_live_0123456789abcdef").hexdigest()
    imported = cli(
        "keys", "import", "acme", "--hash", key_hash, "--start", "sk_live_0123", "--remaining", "9",
        "--json",
    ).json()  # fmt: skip
    assert (imported["prefix"], imported["remaining"], imported["customer"]) == ("sk_live_0123", 9, "acme")
    assert cli("keys", "show", imported["key_id"], "--json").json() == imported
    assert_one_line_error(
        cli("keys", "import", "acme", "--hash", key_hash), "a key with this hash exists already"
    )
    assert_one_line_error(
        cli("keys", "create", "acme", "--prefix", "Acme"),
        "a key prefix is 1-20 characters of a-z, 0-9 and _, got 'Acme'",
    )
    assert len(cli("keys", "list", "acme", "--json").json()) == 2


@pytest.mark.redis
def test_keys_revoke(cli: Cli) -> None:
    """keys revoke marks the key revoked; a revoked key cannot be rotated."""
    create_customer(cli)
    key_id = cli("keys", "create", "acme", "--json").json()["key_id"]
    assert cli("keys", "revoke", key_id).out == f"revoked {key_id}\n"
    assert cli("keys", "list", "acme", "--json").json()[0]["status"] == "revoked"
    assert_one_line_error(cli("keys", "rotate", key_id), f"key {key_id} is revoked and cannot be rotated")


@pytest.mark.redis
def test_keys_rotate_with_grace(cli: Cli) -> None:
    """keys rotate issues a replacement and sets the old key to expire after the grace period."""
    create_customer(cli)
    old = cli("keys", "create", "acme", "--json").json()
    before_ms = int(time.time() * 1000)
    rotated = cli("keys", "rotate", old["key_id"], "--grace", "3600")
    after_ms = int(time.time() * 1000)
    plaintext = rotated.out.splitlines()[0]
    assert plaintext.startswith("mw_live_")
    assert plaintext != old["key"]
    assert f"replaces {old['key_id']}, which stops working in 3600s" in rotated.out
    rows = {row["key_id"]: row for row in cli("keys", "list", "acme", "--json").json()}
    assert len(rows) == 2
    assert before_ms + 3_600_000 <= rows[old["key_id"]]["expires_ms"] <= after_ms + 3_600_000
    assert rows[old["key_id"]]["status"] == "active"
    assert "expires 20" in cli("keys", "list", "acme").out


@pytest.mark.redis
def test_keys_rotate_json(cli: Cli) -> None:
    """keys rotate --json names the new key and the key it replaces."""
    create_customer(cli)
    old = cli("keys", "create", "acme", "--test", "--json").json()
    data = cli("keys", "rotate", old["key_id"], "--json").json()
    assert set(data) == {"key", "key_id", "prefix", "replaces"}
    assert data["replaces"] == old["key_id"]
    assert data["key"].startswith("mw_test_")  # a replacement keeps the mode


# -- credits -------------------------------------------------------------------------------------------


@pytest.mark.redis
def test_credits_grant_and_show(cli: Cli) -> None:
    """credits grant adds exact decimal credits; credits show prints balance, reserved and available."""
    create_customer(cli)
    assert cli("credits", "grant", "acme", "25.00").out == "acme: balance 25.000000 credits\n"
    assert cli("credits", "grant", "acme", "0.000001", "--json").json() == {
        "customer": "acme",
        "balance_micros": 25_000_001,
        "reserved_micros": 0,
    }
    assert cli("credits", "show", "acme").out == (
        "acme: balance 25.000001, reserved 0.000000, available 25.000001 credits\n"
    )
    assert cli("credits", "show", "acme", "--json").json() == {
        "customer": "acme",
        "balance": "25.000001",
        "reserved": "0.000000",
        "available": "25.000001",
        "balance_micros": 25_000_001,
        "reserved_micros": 0,
    }


# -- usage ---------------------------------------------------------------------------------------------


def record_calls(
    redis_url: str,
    customer: str,
    outcomes: list[tuple[str, bool]],
    at: float | None = None,
    reasons: list[str] | None = None,
) -> None:
    """Flush real events (outcome, live) for ``customer`` of the payg plan into Redis, like the middleware;
    made ``at`` that time (default: now); each refused for its reason in ``reasons``, if given."""
    config = Config.from_file(EXAMPLE)
    storage = open_storage(redis_url, shards=config.shards)
    at = time.time() if at is None else at
    start, _ = period_bounds(ANCHOR, "month", at)
    pipeline = Batcher(config.pipeline)
    for number, (outcome, live) in enumerate(outcomes):
        billable = outcome == "success"
        price = 2000 if live else 0
        event = UsageEvent(
            id=new_event_id(),
            timestamp_ms=int(at * 1000),
            customer=customer,
            key_id="key_0123456789abcdef",
            plan="payg",
            route=f"/v1/items/{number}",
            method="GET",
            status=200 if billable else 500,
            outcome=outcome,  # type: ignore[arg-type]
            duration_us=100,
            ttfb_us=50,
            units={"calls": 1},
            billable=billable,
            live=live,
            period_start=start,
            reason=reasons[number] if reasons else "",
        )
        settlement = Settlement(customer, live, start, "", billable, live, (("calls", 1, price, 0),))
        pipeline.put(Pending(shard_of(customer, config.shards), event_row(event), settlement))
    flush_sync(pipeline, storage)
    assert pipeline.stats.flushed_events == len(outcomes)
    storage.close()


@pytest.mark.redis
def test_usage_reports_the_rolled_up_period(cli: Cli, redis_url: str) -> None:
    """usage shows the current period's calls per outcome, meters and spend, after the rollup."""
    create_customer(cli)
    cli("credits", "grant", "acme", "1")
    calls = [("success", True), ("success", True), ("server_error", True), ("success", False)]
    record_calls(redis_url, "acme", calls)
    assert cli("rollup", "--once").code == 0

    start, end = period_bounds(ANCHOR, "month", time.time())
    report = cli("usage", "acme", "--json").json()
    assert report == {
        "customer": "acme",
        "live": True,
        "period_start": start,
        "period_end": end,
        "meters": {"calls": 2, "tokens": 0},
        "calls": {"success": 2, "client_error": 0, "server_error": 1, "aborted": 0, "rejected": 0},
        "refusals": {},
        "spend_micros": 4000,
        "pending_events": 0,
        "pending_events_complete": True,
    }
    text = cli("usage", "acme").out.splitlines()
    assert text[0].startswith("acme (live) ")
    assert "  calls: success 2, client_error 0, server_error 1, aborted 0, rejected 0" in text
    assert not any("rejected by reason" in line for line in text)
    assert text[-1] == "  spend: 0.004000 credits"
    assert cli("credits", "show", "acme", "--json").json()["balance"] == "0.996000"


@pytest.mark.redis
def test_usage_shows_rejected_calls_by_reason(cli: Cli, redis_url: str) -> None:
    """usage (text and JSON) and usage --window show the rejected calls per reason that occurred."""
    create_customer(cli)
    reasons = ["", "rate_limited", "quota_exceeded", "rate_limited"]
    record_calls(redis_url, "acme", [("success", True)] + [("rejected", True)] * 3, FEB_10 + 36_900, reasons)
    assert cli("rollup", "--once").code == 0

    dated = ("--period", "2026-02-10")
    report = cli("usage", "acme", *dated, "--json").json()
    assert report["calls"]["rejected"] == 3
    assert report["refusals"] == {"rate_limited": 2, "quota_exceeded": 1}
    text = cli("usage", "acme", *dated).out.splitlines()
    assert "  rejected by reason: rate_limited 2, quota_exceeded 1" in text

    args = ("usage", "acme", "--window", "hour", "--from", "2026-02-10T10:00", "--to", "2026-02-10T12:00")
    points = cli(*args, "--json").json()["points"]
    assert [p["refusals"] for p in points] == [{"rate_limited": 2, "quota_exceeded": 1}, {}]
    lines = cli(*args).out.splitlines()
    header = lines[1].split()
    assert header[-3:] == ["rejected:rate_limited", "rejected:quota_exceeded", "spend"]
    assert lines[2].split()[-3:] == ["2", "1", "0.002000"]
    assert lines[3].split()[-3:] == ["0", "0", "0.000000"]


@pytest.mark.redis
def test_usage_test_keys_are_reported_apart(cli: Cli, redis_url: str) -> None:
    """usage --test shows only the calls of test keys, which are never charged."""
    create_customer(cli)
    record_calls(redis_url, "acme", [("success", True), ("success", False), ("success", False)])
    assert cli("rollup", "--once").code == 0
    report = cli("usage", "acme", "--test", "--json").json()
    assert report["live"] is False
    assert report["calls"]["success"] == 2
    assert report["meters"]["calls"] == 2
    assert report["spend_micros"] == 0
    assert cli("usage", "acme", "--test").out.startswith("acme (test) ")


@pytest.mark.redis
def test_usage_previous_and_dated_periods(cli: Cli, redis_url: str) -> None:
    """--period previous is the period before the current one; a date selects the period containing it."""
    create_customer(cli)
    record_calls(redis_url, "acme", [("success", True)])
    assert cli("rollup", "--once").code == 0
    current = cli("usage", "acme", "--json").json()
    previous = cli("usage", "acme", "--period", "previous", "--json").json()
    assert previous["period_end"] == current["period_start"]
    assert previous["calls"]["success"] == 0
    assert previous["spend_micros"] == 0
    dated = cli("usage", "acme", "--period", "2026-01-15", "--json").json()
    assert (dated["period_start"], dated["period_end"]) == period_bounds(
        ANCHOR, "month", ANCHOR + 14 * 86_400
    )


FEB_10 = 1_770_681_600  # 2026-02-10T00:00:00Z


def record_history(redis_url: str) -> None:
    """Live calls at 10:15 (two successes, a server error) and 12:30 (a success) on 2026-02-10, a test
    key's call at 12:30, and a success on 2026-02-11; rolled up."""
    record_calls(redis_url, "acme", [("success", True)] * 2 + [("server_error", True)], FEB_10 + 36_900)
    record_calls(redis_url, "acme", [("success", True), ("success", False)], FEB_10 + 45_000)
    record_calls(redis_url, "acme", [("success", True)], FEB_10 + 86_400 + 60)


@pytest.mark.redis
def test_usage_window_json_is_the_history(cli: Cli, redis_url: str) -> None:
    """usage --window hour --json prints Accounts.usage_history's as_dict: every hour of the range, calls
    in the hour they were made, zeros elsewhere; --test reads the test keys' history."""
    create_customer(cli)
    cli("credits", "grant", "acme", "1")
    record_history(redis_url)
    assert cli("rollup", "--once").code == 0
    args = ("usage", "acme", "--window", "hour", "--from", "2026-02-10T10:00", "--to", "2026-02-10T13:00")
    data = cli(*args, "--json").json()
    assert {key: data[key] for key in ("customer", "live", "window", "start", "end")} == {
        "customer": "acme",
        "live": True,
        "window": "hour",
        "start": FEB_10 + 36_000,
        "end": FEB_10 + 46_800,
    }
    zero = dict.fromkeys(["success", "client_error", "server_error", "aborted", "rejected"], 0)
    assert data["points"] == [
        {
            "start": FEB_10 + 36_000,
            "meters": {"calls": 2, "tokens": 0},
            "calls": zero | {"success": 2, "server_error": 1},
            "refusals": {},
            "spend_micros": 4000,
        },
        {
            "start": FEB_10 + 39_600,
            "meters": {"calls": 0, "tokens": 0},
            "calls": zero,
            "refusals": {},
            "spend_micros": 0,
        },
        {
            "start": FEB_10 + 43_200,
            "meters": {"calls": 1, "tokens": 0},
            "calls": zero | {"success": 1},
            "refusals": {},
            "spend_micros": 2000,
        },
    ]
    sandbox = cli(*args, "--test", "--json").json()
    assert sandbox["live"] is False
    assert [p["calls"]["success"] for p in sandbox["points"]] == [0, 0, 1]
    epochs = ("--from", str(FEB_10 + 36_000), "--to", str(FEB_10 + 46_800))
    by_epoch = cli("usage", "acme", "--window", "hour", *epochs, "--json")
    assert by_epoch.json() == data
    default = cli("usage", "acme", "--window", "hour", "--json").json()
    assert len(default["points"]) == 48
    assert default["end"] - 3600 <= time.time() < default["end"]


@pytest.mark.redis
def test_usage_window_csv(cli: Cli, redis_url: str) -> None:
    """usage --window day --csv prints a header, then one row per day: its start (ISO and epoch), each
    meter, the calls per outcome and the spend in credits."""
    create_customer(cli)
    record_history(redis_url)
    assert cli("rollup", "--once").code == 0
    result = cli("usage", "acme", "--window", "day", "--from", "2026-02-09", "--to", "2026-02-12", "--csv")
    assert result.code == 0
    assert result.out.splitlines() == [
        "start_iso,start,calls,tokens,n:success,n:client_error,n:server_error,n:aborted,n:rejected,spend",
        f"2026-02-09T00:00:00Z,{FEB_10 - 86_400},0,0,0,0,0,0,0,0.000000",
        f"2026-02-10T00:00:00Z,{FEB_10},3,0,3,0,1,0,0,0.006000",
        f"2026-02-11T00:00:00Z,{FEB_10 + 86_400},1,0,1,0,0,0,0,0.002000",
    ]


@pytest.mark.redis
def test_usage_window_table(cli: Cli, redis_url: str) -> None:
    """usage --window prints a table: a title with the range, a header, one row per window; and, as usage
    does, how many events wait for the rollup."""
    create_customer(cli)
    record_history(redis_url)
    assert cli("rollup", "--once").code == 0
    lines = cli(
        "usage", "acme", "--window", "hour", "--from", "2026-02-10T10:00", "--to", "2026-02-10T12:59"
    ).out
    assert lines.splitlines() == [
        "acme (live) by hour, 2026-02-10 10:00:00Z .. 2026-02-10 13:00:00Z",
        "start (UTC)       calls  tokens  success  client_error  server_error  aborted  rejected     spend",
        "2026-02-10 10:00      2       0        2             0             1        0         0  0.004000",
        "2026-02-10 11:00      0       0        0             0             0        0         0  0.000000",
        "2026-02-10 12:00      1       0        1             0             0        0         0  0.002000",
    ]
    days = cli("usage", "acme", "--window", "day", "--from", "2026-02-10", "--to", "2026-02-11").out
    assert days.splitlines()[1:] == [
        "start (UTC)  calls  tokens  success  client_error  server_error  aborted  rejected     spend",
        "2026-02-10       3       0        3             0             1        0         0  0.006000",
    ]
    record_calls(redis_url, "acme", [("success", True)], FEB_10 + 60)
    assert cli("usage", "acme", "--window", "day").out.splitlines()[-1] == (
        "  1 events on acme's shard wait for the rollup (meterware rollup): the figures above are behind"
    )


# -- plans and config ----------------------------------------------------------------------------------


def test_plans_list(capsys: pytest.CaptureFixture[str]) -> None:
    """plans list shows each plan's period, billing, rate limits and per-meter terms (no backend needed)."""
    assert main(["plans", "list", "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "free: per month, invoiced, 5/1s, 100/60s",
        "  calls: hard quota 1000, 0 included, 0.000000 per unit",
        "payg: per month, prepaid, 50/1s",
        "  calls: no quota, 0 included, 0.002000 per unit",
        "pro: per month, invoiced, 200/1s, 10000/60s, /v1/chat* 10/1s, 20 in flight, spend cap 500.000000",
        "  calls: soft quota 1000000, 100000 included, 0.000500 per unit",
        "tokens: per month, prepaid, 600/60s, 100000 tokens/60s",
        "  tokens: no quota, 0 included, 0.000020 per unit",
    ]
    assert main(["plans", "list", "--config", str(EXAMPLE), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert list(plans) == ["free", "payg", "pro", "tokens"]
    assert plans["pro"] == {
        "period": "month",
        "prepaid": False,
        "rate_limits": ["200/1s", "10000/60s"],
        "meters": {
            "calls": {
                "quota": 1_000_000,
                "quota_mode": "soft",
                "included": 100_000,
                "price": "0.000500",
                "pricing": "0.0005 per unit",
            }
        },
        "currency": "USD",
        "base_fee": "0",
        "minimum": "0",
        "route_limits": {"/v1/chat*": ["10/1s"]},
        "concurrency": 20,
        "spend_cap": "500.000000",
    }


def test_config_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """config check on a valid file exits 0 and summarises it."""
    assert main(["config", "check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: ok (2 meters, 4 plans, storage redis://)\n"
    assert err == ""
    assert main(["config", "check", str(EXAMPLE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "ok": True,
        "meters": ["calls", "tokens"],
        "plans": ["free", "payg", "pro", "tokens"],
    }


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param(
            '[plans.tokens.meters.tokens]\nprice = "0.0000001"\n',
            "plans.tokens.meters.tokens: names no meter defined under [meters] (known: calls)",
            id="unknown-meter",
        ),
        pytest.param(
            '[meters.tokens]\nsource = "handler"\n[plans.p.meters.tokens]\nprice = "0.0000001"\n',
            "plans.p.meters.tokens.price: must be a number of credits with at most 6 decimals, "
            "got '0.0000001'",
            id="price-7-decimals",
        ),
        pytest.param(
            "[storage]\nshards = true\n", "storage.shards: must be an integer, got a boolean", id="bool"
        ),
        pytest.param(
            "[policy]\ntimeout = 0\n", "policy.timeout: must be a positive number of seconds, got 0.0", id="t"
        ),
        pytest.param("[rollup]\nworkers = 2\n", "rollup.workers: is not a known setting", id="unknown-key"),
        pytest.param(
            "storage = \n", "file: is not valid TOML (Invalid value (at line 1, column 11))", id="toml"
        ),
    ],
)
def test_config_check_bad_file(
    text: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config check on a bad file exits 1 with 'meterware: error: <file>: <field>: <problem>' on one line."""
    path = tmp_path / "meterware.toml"
    path.write_text(text, encoding="utf-8")
    assert main(["config", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"meterware: error: {path}: {error}\n"


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """config check on a missing file says so in one line."""
    assert main(["config", "check", "nope.toml"]) == 1
    assert capsys.readouterr().err == "meterware: error: nope.toml: file: does not exist\n"


def test_config_check_uses_config_option_and_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a file argument, config check reads --config, else ./meterware.toml, else the defaults."""
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out == "configuration: ok (1 meters, 1 plans, storage memory://)\n"
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith(f"{EXAMPLE}: ok (2 meters, 4 plans")
    (tmp_path / "meterware.toml").write_text("[storage]\nshards = 0\n", encoding="utf-8")
    assert main(["config", "check"]) == 1
    assert capsys.readouterr().err == (
        "meterware: error: meterware.toml: storage.shards: must be at least 1, got 0\n"
    )


# -- options -------------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(
    "position",
    [pytest.param("before", id="before-command"), pytest.param("after", id="after-command")],
)
def test_common_options_work_before_and_after_the_command(
    position: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--storage, --config and --json are honoured wherever they appear on the command line."""
    options = ["--storage", redis_url, "--config", str(EXAMPLE), "--json"]
    command = ["customers", "create", "acme", "--plan", "pro"]
    assert main([*options, *command] if position == "before" else [*command, *options]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == "pro"
    assert main(["customers", "list", "--storage", redis_url, "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == "acme\n"


def test_memory_storage_note(capsys: pytest.CaptureFixture[str]) -> None:
    """On memory:// the CLI warns that the data lives only in this process."""
    assert main(["customers", "list", "--storage", "memory://cli-note"]) == 0
    out, err = capsys.readouterr()
    assert out == "(no customers)\n"
    assert err.startswith("meterware: note: memory:// keeps data only inside one process")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits 0."""
    from meterware import __version__

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"meterware {__version__}\n"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command exits 2 with argparse's usage message."""
    with pytest.raises(SystemExit) as caught:
        main(["bill-everyone"])
    assert caught.value.code == 2
    assert "invalid choice: 'bill-everyone'" in capsys.readouterr().err


# -- portal links ----------------------------------------------------------------------------------------


def test_portal_link_opens_the_customers_portal_once(
    cli: Cli, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`meterware portal link` prints a link the portal (another process, the same Redis) honours once."""
    from urllib.parse import urlsplit

    from werkzeug.test import Client

    import meterware.portal
    from tests.portal.test_portal_auth import follow_link

    monkeypatch.setenv("METERWARE_PORTAL_SECRET", "a-portal-secret-of-at-least-32-characters")
    create_customer(cli)
    base = "https://api.example.com/portal"
    result = cli("portal", "link", "acme", "--ttl", "2m", "--base-url", base, "--json")
    assert result.code == 0, result.err
    data = result.json()
    assert data["customer"] == "acme"
    assert data["url"].startswith(f"{base}/login?token=")
    assert abs(data["expires"] - (time.time() + 120)) < 5
    config = Config.load(EXAMPLE, storage=redis_url, portal={"secure_cookies": False})
    client = Client(meterware.portal.wsgi_app(config))
    link = urlsplit(data["url"])
    assert follow_link(client, f"/login?{link.query}").status_code == 303
    assert client.get("/").status_code == 200
    assert client.get(f"/login?{link.query}").status_code == 403
    assert client.post("/login", data={"token": link.query.removeprefix("token=")}).status_code == 403

    text = cli("portal", "link", "acme", "--base-url", base)
    assert text.code == 0
    assert text.out.startswith(f"{base}/login?token=")
    assert "works once, until" in text.out
    assert_one_line_error(
        cli("portal", "link", "acme", "--ttl", "soon", "--base-url", base),
        "--ttl must be seconds or a number with s, m, h or d (15m), got 'soon'",
    )
    assert_one_line_error(cli("portal", "link", "nobody", "--base-url", base), "no customer 'nobody'")
    assert_one_line_error(
        cli("portal", "link", "acme"),
        "no base URL for the link: set portal.base_url or pass base_url (--base-url)",
    )
    monkeypatch.delenv("METERWARE_PORTAL_SECRET")
    assert cli("portal", "link", "acme", "--base-url", base).err.startswith(
        "meterware: error: portal.secret_env: $METERWARE_PORTAL_SECRET is not set"
    )


# -- the demo, as a real process -----------------------------------------------------------------------


def checked_demo_output(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines a `meterware demo` printed, once its exit, its usage table and the free plan's quota of 5
    calls are checked."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    header = lines.index("Usage this period, from the rollup")
    assert lines[header + 1].split() == [
        *("customer", "plan", "calls", "tokens", "ok", "4xx", "5xx", "refused", "charged", "balance")
    ]
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 5]}
    assert set(rows) == {"hobbyist", "startup", "bigco"}
    assert rows["hobbyist"][1:3] == ["free", "5"]  # the free plan's hard quota of 5 calls
    return lines


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m meterware demo` exits 0 and prints the usage table from the rollup."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "meterware", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = checked_demo_output(result)
    # The free tier crossing 80% and 100% of its quota fires two alerts (once each), the payg customer's
    # balance one; the local receiver got them as webhooks and verified every signature.
    fired = lines[lines.index(next(line for line in lines if line.startswith("Alerts fired"))) + 2 :]
    assert sorted(line.split()[:3] for line in fired[:3]) == [
        ["credits.low", "startup", "0.100000"],
        ["quota.threshold", "hobbyist", "100%"],
        ["quota.threshold", "hobbyist", "80%"],
    ]
    assert "webhook: 3 alerts POSTed to http://127.0.0.1:" in fired[3]
    assert "3 signatures verified" in fired[3]
    invoice = lines[lines.index(next(line for line in lines if line.startswith("Invoice preview"))) + 1 :]
    assert invoice[0].split()[2:5] == ["bigco,", "plan", "pro,"]
    assert invoice[1].split()[:8] == ["calls", "16", "units,", "10", "included,", "6", "billed,", "0.005"]
    assert invoice[-1].split() == ["total", "0.03"]  # 6 calls over the included 10, at 0.005


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_demo_serve_keeps_the_api_and_the_portal_running_with_a_link_per_customer(
    tmp_path: Path, stop: str
) -> None:
    """`meterware demo --serve` prints each customer's key and portal link; both work until SIGTERM or
    Ctrl-C (SIGINT), which stop it cleanly."""
    import re
    import signal

    import httpx

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "meterware", "demo", "--serve", "--port", str(free_port())]
    errors = tmp_path / "stderr.txt"
    with (
        errors.open("w") as stderr,
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        ) as process,
    ):
        try:
            assert process.stdout is not None
            lines: list[str] = []
            deadline = time.monotonic() + 90
            while not (lines and lines[-1].startswith("  Try: curl")) and time.monotonic() < deadline:
                line = process.stdout.readline()
                assert line, f"the demo ended early: {errors.read_text()}"
                lines.append(line.rstrip("\n"))
            text = "\n".join(lines)
            keys = dict(re.findall(r"^  (\w+): API key (\S+)$", text, re.MULTILINE))
            links = re.findall(r"portal \(the link works once, for an hour\): (\S+)", text)
            assert set(keys) == {"hobbyist", "startup", "bigco"}
            assert len(links) == 3
            base = re.search(r"at (http://127\.0\.0\.1:\d+) ", text)[1]  # type: ignore[index]
            token = re.search(r"admin token: (\S+)\)", text)[1]  # type: ignore[index]
            with httpx.Client(base_url=base, timeout=10) as client:
                hello = client.get("/v1/hello", headers={"Authorization": f"Bearer {keys['bigco']}"})
                assert hello.status_code == 200
                link_token = links[2].partition("token=")[2]
                assert client.get(links[2].removeprefix(base)).status_code == 200  # its page: Continue
                assert client.post("/portal/login", data={"token": link_token}).status_code == 303
                overview = client.get("/portal/")
                assert overview.status_code == 200
                assert 'data-field="customer">bigco<' in overview.text
                assert client.get(links[2].removeprefix(base)).status_code == 403  # a link works once
                admin = client.get("/admin/", headers={"Authorization": f"Bearer {token}"})
                assert admin.status_code == 200
                assert "hobbyist" in admin.text
        finally:
            process.send_signal(getattr(signal, stop))
            assert process.wait(30) == 0, errors.read_text()


# -- what the worker and usage say while behind -----------------------------------------------------------


@pytest.mark.redis
def test_rollup_once_says_which_shards_a_crashed_worker_still_holds(
    cli: Cli, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """--once cannot take shards whose lease another (crashed) worker holds: it names each, with the
    holder and until when, and exits 3; once the lease is gone it rolls them up and exits 0."""
    create_customer(cli)
    record_calls(redis_url, "acme", [("success", True)])
    config = Config.from_file(EXAMPLE)
    storage = open_storage(redis_url, shards=config.shards)
    shard = shard_of("acme", config.shards)
    before = time.time()
    assert storage.claim_shard(shard, "crashed:1234:abcd", 60_000) is not None
    caplog.set_level("INFO", logger="meterware.rollup")
    assert cli("rollup", "--once").code == 3
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    prefix = f"shard {shard} not rolled up: worker crashed:1234:abcd holds its lease until "
    assert line.startswith(prefix), line
    until = datetime.strptime(line[len(prefix) :].split()[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + 58 <= until.timestamp() <= time.time() + 60
    assert cli("usage", "acme", "--json").json()["calls"]["success"] == 0
    storage.release_shard(shard, "crashed:1234:abcd")
    caplog.clear()
    assert cli("rollup", "--once").code == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert cli("usage", "acme", "--json").json()["calls"]["success"] == 1
    storage.close()


@pytest.mark.redis
def test_usage_says_how_many_events_wait_for_the_rollup(cli: Cli, redis_url: str) -> None:
    """Events flushed but not rolled up yet are counted and shown, so zeros are not taken for the truth."""
    create_customer(cli)
    record_calls(redis_url, "acme", [("success", True), ("success", True), ("server_error", True)])
    report = cli("usage", "acme", "--json").json()
    assert report["calls"]["success"] == 0
    assert report["pending_events"] == 3
    text = cli("usage", "acme").out.splitlines()
    assert text[-1] == (
        "  3 events on acme's shard wait for the rollup (meterware rollup): the figures above are behind"
    )
    assert cli("rollup", "--once").code == 0
    report = cli("usage", "acme", "--json").json()
    assert (report["calls"]["success"], report["pending_events"]) == (2, 0)
    assert "wait for the rollup" not in cli("usage", "acme").out


# -- limits (issue 18) ---------------------------------------------------------------------------------


@pytest.mark.redis
def test_keys_create_with_rate_limits_and_customers_set_spend_cap(cli: Cli) -> None:
    """keys create --rate-limit keeps the key's limits (list and show print them); customers set
    --spend-cap sets the customer's cap (show prints it), 'none' gives the plan's back (none here)."""
    create_customer(cli)
    created = cli(
        "keys", "create", "acme", "--rate-limit", "5/second", "--rate-limit", "100/minute", "--json"
    )
    key_id = created.json()["key_id"]
    assert cli("keys", "show", key_id, "--json").json()["rate_limits"] == ["5/1s", "100/60s"]
    assert ", limited to 5/1s and 100/60s" in cli("keys", "list", "acme").out
    bad = cli("keys", "create", "acme", "--rate-limit", "often")
    assert bad.code != 0
    assert "expected a rate" in bad.err
    shown = cli("customers", "set", "acme", "--spend-cap", "50.00")
    assert "spend cap: 50.000000 credits per period (the customer's own)" in shown.out
    assert cli("customers", "show", "acme", "--json").json()["spend_cap"] == "50.000000"
    cleared = cli("customers", "set", "acme", "--spend-cap", "none", "--json").json()
    assert "spend_cap" not in cleared

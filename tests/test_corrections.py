"""Corrections (void, amend) applied exactly once, and backfill imports: idempotent, all lines or none."""

# ruff: noqa: F811  (the fixtures come from tests.test_ledger)

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from meterware import Accounts, MeteringMiddleware
from meterware.billing.accounts._usage import UsageReport
from meterware.billing.corrections import CorrectionResult
from meterware.errors import NotFoundError, UsageError
from meterware.events import new_event_id
from tests.test_ledger import (  # noqa: F401  # fixtures
    CREDIT,
    accounts,
    api,
    assert_balanced,
    event_ids,
    roll_up,
    storage_url,
    traffic,
)


def served(accounts: Accounts, calls: int = 6) -> tuple[str, list[str]]:
    """A prepaid customer with 5 credits who made ``calls`` calls; its billable event ids."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5")
    key = accounts.create_key("acme").plaintext
    traffic(accounts.config, [key], calls, seed=1)
    roll_up(accounts)
    return key, event_ids(accounts, "acme")


def test_a_void_refunds_and_subtracts_once(accounts: Accounts) -> None:
    """Voiding an event refunds its credits in the ledger and takes it out of the rollup; twice is a no-op."""
    _, ids = served(accounts)
    before = accounts.usage("acme")
    balance = accounts.balance("acme").balance
    first = accounts.void_event(ids[0], reason="disputed", actor="alice")
    again = accounts.void_event(ids[0], reason="disputed", actor="alice")
    roll_up(accounts)
    assert first.applied
    assert first.credit > 0
    assert not again.applied
    assert "already voided" in again.message
    refunds = [e for e in accounts.ledger("acme") if e.kind == "refund"]
    assert [(e.amount, e.actor, e.reason, e.ref) for e in refunds] == [
        (first.credit, "alice", "disputed", f"void:{ids[0]}")
    ]
    assert accounts.balance("acme").balance == balance + first.credit
    after = accounts.usage("acme")
    assert after.meters["calls"] == before.meters["calls"] - 1
    assert after.calls["success"] == before.calls["success"] - 1
    assert after.spend == before.spend - first.credit
    assert_balanced(accounts, "acme")


def test_an_amendment_moves_units_and_credits_by_the_difference(accounts: Accounts) -> None:
    """Amending a sum meter replaces its units in the rollup and refunds the price of the difference."""
    _, ids = served(accounts)
    before = accounts.usage("acme")
    result = accounts.amend_event(ids[0], units={"tokens": 0}, reason="bad meter", customer_id="acme")
    repeated = accounts.amend_event(ids[0], units={"tokens": 0}, reason="bad meter")
    roll_up(accounts)
    after = accounts.usage("acme")
    removed = before.meters["tokens"] - after.meters["tokens"]
    assert result.applied
    assert not repeated.applied
    assert result.credit == removed * 100  # 0.0001 credits per token
    assert after.meters["calls"] == before.meters["calls"]
    assert after.spend == before.spend - result.credit
    voided = accounts.void_event(ids[0], reason="then voided")
    roll_up(accounts)
    assert voided.credit == 10_000  # what is left of the call: its 0.01 credits
    assert accounts.usage("acme").meters["calls"] == before.meters["calls"] - 1
    with pytest.raises(UsageError, match="voided event cannot be amended"):
        accounts.amend_event(ids[0], units={"tokens": 5}, reason="too late")
    assert_balanced(accounts, "acme")


def test_corrections_refuse_what_cannot_be_taken_back(accounts: Accounts) -> None:
    """Amending a count meter, or an unknown id, fails with a clear message and writes nothing."""
    _, ids = served(accounts)
    ledger = accounts.ledger("acme")
    with pytest.raises(UsageError, match="'calls' is not a sum meter"):
        accounts.amend_event(ids[0], units={"calls": 0}, reason="no")
    with pytest.raises(NotFoundError, match=r"trimmed after rollup\.retention_seconds"):
        accounts.void_event(str(uuid.UUID(bytes=new_event_id())), reason="unknown")
    with pytest.raises(UsageError, match="not a UUIDv7"):
        accounts.void_event(str(uuid.uuid4()), reason="no time")
    assert accounts.ledger("acme") == ledger


# -- backfill ---------------------------------------------------------------------------------------------


def backfill(tmp_path: Path, lines: list[dict[str, object]], name: str = "events.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_an_import_twice_counts_once(accounts: Accounts, tmp_path: Path) -> None:
    """Backfilled events reach the rollup once however often the file is imported; they charge no credits."""
    accounts.create_customer("acme", plan="invoiced", anchor=0)
    ids = [str(uuid.UUID(bytes=new_event_id())) for _ in range(3)]
    path = backfill(
        tmp_path, [{"id": i, "customer": "acme", "units": {"calls": 1, "tokens": 40}} for i in ids]
    )
    first = accounts.import_events(str(path))
    second = accounts.import_events(str(path))
    roll_up(accounts)
    assert (first.imported, first.skipped, second.imported, second.skipped) == (3, 0, 0, 3)
    usage = accounts.usage("acme")
    assert (usage.meters["calls"], usage.meters["tokens"], usage.spend) == (3, 120, 0)
    assert accounts.ledger("acme") == []
    # An imported event can be voided like any other.
    assert accounts.void_event(ids[1], reason="duplicate").applied
    roll_up(accounts)
    assert accounts.usage("acme").meters["tokens"] == 80


def test_a_csv_import(accounts: Accounts, tmp_path: Path) -> None:
    """A CSV backfill has one column per meter; the time comes from a timestamp column."""
    accounts.create_customer("acme", plan="invoiced", anchor=0)
    path = tmp_path / "events.csv"
    path.write_text(
        "id,customer,timestamp,calls,tokens\n"
        f"{uuid.uuid4()},acme,2026-01-05T10:00:00Z,1,7\n"
        f"{uuid.uuid4()},acme,1767607200000,1,\n"
    )
    assert accounts.import_events(str(path)).imported == 2
    roll_up(accounts)
    usage = accounts.usage("acme", at=1767607200)
    assert (usage.meters["calls"], usage.meters["tokens"]) == (2, 7)


EVENT = str(uuid.UUID(bytes=new_event_id()))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param("{nope", "events.jsonl:2: not a JSON object", id="not-json"),
        pytest.param(
            '{"id": "x", "customer": "acme", "units": {"calls": 1}}', ":2: id: must be a UUID", id="id"
        ),
        pytest.param(
            f'{{"id": "{EVENT}", "customer": "who", "units": {{"calls": 1}}}}', ":2: customer", id="who"
        ),
        pytest.param(f'{{"id": "{EVENT}", "customer": "acme", "units": {{}}}}', ":2: units", id="no-units"),
        pytest.param(
            f'{{"id": "{EVENT}", "customer": "acme", "units": {{"x": 1}}}}', "units.x: unknown", id="meter"
        ),
        pytest.param(
            f'{{"id": "{EVENT}", "customer": "acme", "units": {{"tokens": -1}}}}',
            "units.tokens",
            id="negative",
        ),
        pytest.param(
            f'{{"id": "{EVENT}", "customer": "acme", "units": {{"calls": 1}}, "timestamp": "soon"}}',
            ":2: timestamp",
            id="timestamp",
        ),
        pytest.param(
            f'{{"id": "{EVENT}", "customer": "acme", "units": {{"calls": 1}}, "extra": 1}}',
            ":2: extra",
            id="extra",
        ),
        pytest.param(
            f'{{"id": "{uuid.uuid4()}", "customer": "acme", "units": {{"calls": 1}}}}',
            ":2: timestamp",
            id="no-time",
        ),
    ],
)
def test_a_bad_line_rejects_the_whole_file(
    accounts: Accounts, tmp_path: Path, line: str, message: str
) -> None:
    """One bad line fails the import with file:line and the field; nothing of the file is written."""
    accounts.create_customer("acme", plan="invoiced", anchor=0)
    good = json.dumps({"id": str(uuid.UUID(bytes=new_event_id())), "customer": "acme", "units": {"calls": 1}})
    path = tmp_path / "events.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(UsageError, match=message):
        accounts.import_events(str(path))
    assert all(accounts.storage.stream_length(shard) == 0 for shard in range(accounts.storage.shards))


def test_a_repeated_id_in_a_file_names_both_lines(accounts: Accounts, tmp_path: Path) -> None:
    """An id that appears twice in one file is refused, naming the first line."""
    accounts.create_customer("acme", plan="invoiced", anchor=0)
    line: dict[str, object] = {"id": EVENT, "customer": "acme", "units": {"calls": 1}}
    other = str(uuid.UUID(bytes=new_event_id()))
    with pytest.raises(UsageError, match=r"events\.jsonl:3: id: .* repeats line 1"):
        accounts.import_events(str(backfill(tmp_path, [line, {**line, "id": other}, line])))


@pytest.mark.redis
def test_cli_voids_amends_and_imports(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`meterware events import/void/amend` apply once and say so the second time."""
    from meterware.cli import main
    from tests.test_cli import EXAMPLE

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        code = main([*args, "--storage", redis_url, "--config", str(EXAMPLE)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    run("customers", "create", "acme", "--plan", "pro")
    event = str(uuid.UUID(bytes=new_event_id()))
    path = backfill(tmp_path, [{"id": event, "customer": "acme", "units": {"calls": 1, "tokens": 9}}])
    assert run("events", "import", str(path)) == (
        0,
        f"{path}: 1 events imported, 0 imported before (skipped)\n",
    )
    assert run("events", "import", str(path))[1].endswith("0 events imported, 1 imported before (skipped)\n")
    assert run("events", "amend", event, "--units", "tokens=4", "--reason", "x") == (
        0,
        f"event {event} amended\n",
    )
    assert run("events", "void", event, "--reason", "x") == (0, f"event {event} voided\n")
    assert run("events", "void", event, "--reason", "x") == (0, f"event {event} is already voided\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    assert run("events", "import", str(bad)) == (1, f"meterware: error: {bad}:1: id: must be a UUID, got 1\n")


def test_correction_result_as_dict_names_credit_in_micros_last() -> None:
    """A correction's result as data: its fields in order, the credit as ``credit_micros``."""
    result = CorrectionResult("e1", "acme", "void", True, "voided", -3)
    assert list(result.as_dict().items()) == [
        ("event_id", "e1"),
        ("customer", "acme"),
        ("action", "void"),
        ("applied", True),
        ("message", "voided"),
        ("credit_micros", -3),
    ]


def test_usage_report_as_dict_names_spend_in_micros_last() -> None:
    """A usage report as data: its fields in order, the spend as ``spend_micros``."""
    report = UsageReport("acme", True, 10, 20, {"calls": 2}, {"success": 2}, {"rate_limited": 1}, 4000)
    assert list(report.as_dict().items()) == [
        ("customer", "acme"),
        ("live", True),
        ("period_start", 10),
        ("period_end", 20),
        ("meters", {"calls": 2}),
        ("calls", {"success": 2}),
        ("refusals", {"rate_limited": 1}),
        ("spend_micros", 4000),
    ]


def calls_in_turn(accounts: Accounts, key: str, tokens: list[int]) -> list[int]:
    """One call at a time through the ASGI middleware, each reporting its tokens; their statuses."""
    middleware = MeteringMiddleware(api, config=accounts.config)

    async def serve() -> list[int]:
        statuses = []
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for units in tokens:
                response = await client.get(
                    "/ok", params={"tokens": units}, headers={"Authorization": f"Bearer {key}"}
                )
                statuses.append(response.status_code)
                await middleware.drain()
        await middleware.storage.aclose()
        await middleware.flusher.storage.aclose()
        return statuses

    return asyncio.run(serve())


def test_an_amendments_extra_charge_counts_against_the_spend_cap(accounts: Accounts) -> None:
    """Cap 0.05. A call of 0 tokens costs 0.01; amended to 400 tokens (0.04 more), the period has been
    charged 0.05: the next call (0.01) would pass the cap and is refused 429 spend_cap_reached."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5")
    accounts.set_spend_cap("acme", "0.05")
    key = accounts.create_key("acme").plaintext
    assert calls_in_turn(accounts, key, [0]) == [200]
    [event_id] = event_ids(accounts, "acme")
    amended = accounts.amend_event(event_id, units={"tokens": 400}, reason="under-reported")
    assert (amended.applied, amended.credit) == (True, -40_000)
    assert accounts.balance("acme").balance == 5 * CREDIT - 50_000  # charged 0.05 in all
    assert calls_in_turn(accounts, key, [0]) == [429]


def test_a_voided_calls_cost_is_given_back_to_the_spend_cap(accounts: Accounts) -> None:
    """Cap 0.025, calls of 0 tokens at 0.01: two are served, the third refused (0.03 would pass the cap);
    once the first is voided (its 0.01 refunded), the period's spend is 0.01 again: one more is served."""
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "5")
    accounts.set_spend_cap("acme", "0.025")
    key = accounts.create_key("acme").plaintext
    assert calls_in_turn(accounts, key, [0, 0, 0]) == [200, 200, 429]
    first = sorted(event_ids(accounts, "acme"))[0]
    voided = accounts.void_event(first, reason="served in error")
    assert (voided.applied, voided.credit) == (True, 10_000)
    assert calls_in_turn(accounts, key, [0, 0]) == [200, 429]

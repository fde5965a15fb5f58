"""Ambiguous failures: Redis applied a call, then the connection dropped before its reply came back.

A proxy between the app and Redis relays the flush (or admission) script call, waits for Redis to apply it,
and cuts the connection instead of relaying the answer. The app cannot tell whether the batch landed: it
spools it and retries with the same batch id, which must be a no-op the second time. A lost admission reply
leaves a reservation nobody will settle (the call is served fail-open, and charged when its event is
flushed); the worker refunds it after ``policy.reservation_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.faults.books import assert_exact, spool_bytes
from tests.faults.harness import MIXED_PATHS, Load, figures, tokens_of, wait_until
from tests.faults.proxy import Action, script_of
from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

LOST_FLUSHES = 6
LOST_ADMISSIONS = 10


class LoseSome:
    """Lose the replies of the first flushes and of every 20th admission, up to the counts above."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.flushes: list[str] = []  # batch ids whose reply was lost
        self.admissions = 0
        self.admits_seen = 0

    def __call__(self, command: list[bytes]) -> Action:
        script = script_of(command)
        with self.lock:
            if script == "flush" and len(self.flushes) < LOST_FLUSHES:
                keys = int(command[2])
                self.flushes.append(command[3 + keys].decode())
                return Action.LOSE_REPLY
            if script == "admit":
                self.admits_seen += 1
                if self.admits_seen % 20 == 0 and self.admissions < LOST_ADMISSIONS:
                    self.admissions += 1
                    return Action.LOSE_REPLY
        return Action.FORWARD


def test_lost_replies_never_duplicate_events_or_charges(make_scenario: Callable[..., Scenario]) -> None:
    """Flush and admission replies lost after Redis applied them: every call counted and charged once."""
    rule = LoseSome()
    scenario = make_scenario(proxy=rule)
    app = scenario.app()

    began = time.monotonic()
    with Load(app.url, scenario.key, MIXED_PATHS, threads=4, limit=1200) as load:
        wait_until(
            lambda: len(rule.flushes) == LOST_FLUSHES and rule.admissions == LOST_ADMISSIONS,
            30,
            "the proxy lost every reply it was told to",
        )
        time.sleep(0.5)
    lost_admissions_at = time.monotonic()
    wait_until(lambda: spool_bytes(scenario.spool) == 0, 15, "the spooled batches were never replayed")
    output = app.stop()
    assert spool_bytes(scenario.spool) == 0
    # Reservations whose admission reply was lost are due after reservation_timeout (2 s).
    time.sleep(max(0.0, lost_admissions_at + 2.2 - time.monotonic()))
    scenario.rollup_once()

    stream = scenario.stream()
    ledger = scenario.books()
    succeeded = load.paths(200)
    assert_exact(stream, ledger, succeeded, tokens=tokens_of(succeeded))
    for batch_id in rule.flushes:
        assert stream.batch_ids.count(batch_id) == 1, f"batch {batch_id} is not in the stream exactly once"
    assert ledger.calls["server_error"] == len(load.paths(503))
    assert load.statuses().keys() <= {200, 503}, load.statuses()
    assert "flush failed" in output
    figures(
        "ambiguous",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        lost_flush_replies=len(rule.flushes),
        lost_admission_replies=rule.admissions,
        events=len(stream.events),
        batches=stream.entries,
        charged_micros=ledger.charged,
        seconds=round(time.monotonic() - began, 1),
    )


class LoseOneAdmission:
    """Once armed, lose the reply of the next admission (Redis ran it: its reservation and slot are held)."""

    def __init__(self) -> None:
        self.armed = self.lost = False

    def __call__(self, command: list[bytes]) -> Action:
        if self.armed and script_of(command) == "admit" and not self.lost:
            self.lost = True
            return Action.LOSE_REPLY
        return Action.FORWARD


def test_a_lost_admission_reply_is_released_by_the_next_flush(make_scenario: Callable[..., Scenario]) -> None:
    """Under a concurrency cap of 1, an admission's reply is lost after Redis held its slot and credits:
    the call is served fail-open, and its reservation is closed with the next flush, so the next calls are
    served at once (before, the slot stayed taken until ``reservation_timeout``, 60 s here: every call was
    refused ``concurrency_exceeded`` meanwhile) and nothing stays reserved."""
    rule = LoseOneAdmission()
    scenario = make_scenario(
        {"plans": {"payg": {"prepaid": True, "concurrency": 1, "meters": {"calls": {"price": "0.01"}}}},
         "policy": {"reservation_timeout": 60.0}},
        proxy=rule,
    )  # fmt: skip
    app = scenario.app()
    headers = {"Authorization": f"Bearer {scenario.key}"}
    with httpx.Client(base_url=app.url, headers=headers, timeout=10) as client:
        assert client.get("/v1/ok/warm").status_code == 200  # the scripts are loaded
        rule.armed = True
        assert client.get("/v1/ok/lost").status_code == 200  # served fail-open
        assert rule.lost
        wait_until(lambda: scenario.books().reserved == 0, 5, "the lost admission's hold was never released")
        assert [client.get(f"/v1/ok/{n}").status_code for n in range(3)] == [200, 200, 200]
    app.stop()
    scenario.rollup_once()
    ledger = scenario.books()
    assert (ledger.calls["success"], ledger.charged, ledger.reserved) == (5, 5 * 10_000, 0)

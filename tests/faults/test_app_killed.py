"""The app killed with SIGKILL under load: uvicorn (the whole server) and gunicorn (one worker).

A SIGKILLed process runs no exit hook: the events in its memory die with it, and so do the settlements of
its calls in flight. What it had spooled must be replayed by the next process that starts on the same spool
directory (uvicorn: at start-up, without waiting for traffic; gunicorn: the surviving and the respawned
workers). The reservations of its unsettled calls must be refunded by the rollup worker after
``policy.reservation_timeout``: no customer is charged for a call that has no event.

Flushes are refused by a proxy for a while before the kill, so the spool holds events when it comes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from tests.faults.books import spool_bytes, spooled_events
from tests.faults.harness import (
    CALL_PRICE,
    CUSTOMER,
    TOKEN_PRICE,
    Load,
    children,
    figures,
    tokens_of,
    wait_until,
)
from tests.faults.proxy import Action, script_of
from tests.faults.scenario import Scenario
from tests.helpers import paths_cycling

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


TRAFFIC = paths_cycling(
    ["/v1/ok/{}", "/v1/slow/{}?s=0.5", "/v1/tokens/{}?n=3", "/v1/ok/{}", "/v1/ok/{}", "/v1/ok/{}"]
)


class RefuseFlushes:
    """A proxy rule: while ``on`` is set, flush calls never reach Redis."""

    def __init__(self) -> None:
        self.on = threading.Event()

    def __call__(self, command: list[bytes]) -> Action:
        if self.on.is_set() and script_of(command) == "flush":
            return Action.REFUSE
        return Action.FORWARD


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_sigkilled_app_loses_no_spooled_event_and_charges_no_call_without_one(
    kind: str, make_scenario: Callable[..., Scenario]
) -> None:
    """SIGKILL under load: spooled events are replayed, unsettled reservations refunded, totals agree."""
    rule = RefuseFlushes()
    scenario = make_scenario(proxy=rule)
    app = scenario.app(kind)

    with Load(app.url, scenario.key, TRAFFIC, threads=8) as load:
        time.sleep(1.5)
        rule.on.set()
        time.sleep(1.5)
        if kind == "uvicorn":
            app.kill()
        else:
            victim = children(app.pid)[0]
            os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        spooled = spooled_events(scenario.spool)
        reserved_at_kill = scenario.accounts.balance(CUSTOMER).reserved
        rule.on.clear()
        if kind == "gunicorn":
            time.sleep(1.5)  # the surviving and the respawned worker serve on, and replay the spool
    if kind == "uvicorn":
        app.start()  # no traffic: the spool must be replayed at start-up
    wait_until(
        lambda: spool_bytes(scenario.spool) == 0, 15, "the spool of the killed process was never replayed"
    )
    app.stop()
    time.sleep(max(0.0, killed + 2.2 - time.monotonic()))  # unsettled reservations are due after 2 s
    scenario.rollup_once()

    stream = scenario.stream()
    stream.assert_no_duplicates()
    ledger = scenario.books()
    sent = {result.path.split("?")[0] for result in load.snapshot()}
    succeeded = load.paths(200)
    events = stream.paths("success")
    spooled_successes = {event.route for event in spooled if event.outcome == "success"}
    assert spooled_successes, "nothing was spooled before the kill"
    assert reserved_at_kill > 0, "no call was in flight at the kill"
    assert spooled_successes <= events, "spooled events were lost"
    assert events <= sent
    lost = succeeded - events  # in the killed process's memory: never written anywhere
    # Only calls with an event are counted and charged; every other reservation was refunded.
    tokens = tokens_of(events)
    assert ledger.calls["success"] == len(events)
    assert (
        ledger.spend == stream.charged() == ledger.charged == len(events) * CALL_PRICE + tokens * TOKEN_PRICE
    )
    assert ledger.reserved == 0, "reservations of the killed process's calls were not refunded"
    figures(
        f"app-sigkill-{kind}",
        requests=len(load.snapshot()),
        succeeded=len(succeeded),
        spooled_at_kill=len(spooled),
        recovered_from_spool=len(spooled_successes & events),
        reserved_micros_at_kill=reserved_at_kill,
        lost_in_killed_memory=len(lost),
        events=len(stream.events),
        charged_micros=ledger.charged,
    )

"""Redis Sentinel failover under traffic: the primary SIGKILLed, its replica promoted, the books compared.

Redis replicates asynchronously: a write the primary acknowledged may not have reached the replica when
the primary dies, and the promoted replica never has it. For meterware such a write is a flush: a batch of
events with its charges. On loopback the replica is a fraction of a millisecond behind, so the window is
made visible: the replication link is stalled for ``REPLICATION_LAG`` seconds before the kill (the replica
falls behind as over a slow link), and what the link held dies with the primary. Just before the kill,
writes are paused (``CLIENT PAUSE WRITE``) and the streams of the primary and of the replica are read: the
batches on the primary and not on the replica are what the failover can lose ("at risk"). Once the
sentinels have promoted the replica, a new, empty node joins as a replica of the new primary (as a rebuilt
node would), and the load goes on.

- WAIT off: the calls lost are among the at-risk batches' calls, none is counted or charged twice, and the
  customer is charged exactly for the calls in the rollup (the reservations of lost calls are refunded).
- WAIT on (``[storage] wait_replicas = 1``): a flush no replica acknowledged counts as failed and stays in
  the spool, to be replayed on the promoted replica: successes == rollup == charges, exactly. Until the
  new node joins, the new primary has no replica: its flushes fail too, and the spool holds their events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.books import Books, Stream, assert_exact, books, spool_bytes
from tests.faults.harness import (
    CALL_PRICE,
    MIXED_PATHS,
    TOKEN_PRICE,
    App,
    Load,
    base_env,
    figures,
    rollup_once,
    tokens_of,
    wait_until,
)
from tests.faults.scenario import base_config, open_accounts, provision
from tests.helpers import merged, to_toml
from tests.servers import RedisSentinelGroup

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

#: How far the replica is behind the primary when it dies (seconds of flushes it never received).
REPLICATION_LAG = 0.5
#: How long a flush waits for the replica's acknowledgement (below the flush timeout, 1 s).
WAIT_TIMEOUT = 0.5


@pytest.fixture
def sentinel_group(cleanups: ExitStack) -> RedisSentinelGroup:
    """A primary, its replica and three sentinels that fail over one second after the primary stops
    answering."""
    group = RedisSentinelGroup(down_after=1000, failover_timeout=5000)
    cleanups.callback(group.cleanup)
    return group.start()


def client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=10)


@dataclass(slots=True)
class Failover:
    """What a failover under load left: what the client saw, what was at risk, and the books after."""

    load: Load
    at_risk: Stream  # the events on the primary and not on the replica at the kill
    stream: Stream  # every event on the promoted replica, once the app and the rollup are done
    ledger: Books
    killed: float
    failover_seconds: float
    app_metrics: dict[str, float]

    def at_risk_successes(self) -> set[str]:
        return self.at_risk.paths("success")

    def spool_figures(self) -> dict[str, int]:
        """How much of the load went through the spool, and that none of it was dropped."""
        names = ("events_spooled", "batches_replayed", "events_dropped")
        return {name: int(self.app_metrics.get(f"meterware_{name}_total", 0)) for name in names}

    def served_during_failover(self) -> int:
        promoted = self.killed + self.failover_seconds
        return sum(1 for r in self.load.snapshot() if self.killed < r.at < promoted and r.status == 200)


def unreplicated(primary: Stream, replica: Stream) -> Stream:
    """The events of the batches ``primary`` holds and ``replica`` does not."""
    replicated, replicated_batches = {event.id for event in replica.events}, set(replica.batch_ids)
    kept = [(e, c) for e, c in zip(primary.events, primary.costs, strict=True) if e.id not in replicated]
    batches = [batch for batch in primary.batch_ids if batch not in replicated_batches]
    return Stream([e for e, _ in kept], [c for _, c in kept], len(batches), batches)


def fail_over_under_load(
    tmp_path: Path,
    group: RedisSentinelGroup,
    make_app: Callable[..., App],
    changes: dict[str, Any],
) -> Failover:
    """Serve a prepaid customer under load through uvicorn on the Sentinel URL; stall replication, kill the
    primary, serve on through the failover and a new replica's joining, then drain the app, refund due
    reservations and roll up."""
    spool = tmp_path / "spool"
    config = tmp_path / "meterware.toml"
    config.write_text(to_toml(merged(base_config(group.url, spool), changes)))
    env = base_env(config)
    accounts = open_accounts(config)
    key = provision(accounts).plaintext
    accounts.close()
    wait_until(group.in_sync, 10, "the replica never got the customer")
    app = make_app("uvicorn", env).start()

    with Load(app.url, key, MIXED_PATHS, threads=4) as load:
        time.sleep(1.5)
        group.link.stall()
        time.sleep(REPLICATION_LAG)
        # Freeze the primary: writes wait, the replies of applied ones go out; then read both sides.
        primary, replica = client(group.primary.port), client(group.replica.port)
        primary.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        time.sleep(0.3)
        at_risk = unreplicated(Stream.read(primary), Stream.read(replica))
        group.kill_primary()
        killed = time.monotonic()
        failover_seconds = group.wait_for_failover()
        group.rejoin()
        time.sleep(1.5)
    wait_until(lambda: spool_bytes(spool) == 0, 15, "the spool was never replayed")
    app_metrics = app.metrics()
    app.stop()
    assert spool_bytes(spool) == 0
    # Reservations of calls whose batch died with the primary are refunded once due (after 2 s).
    time.sleep(max(0.0, killed + 2.2 - time.monotonic()))
    rollup_once(env, tmp_path / "rollup.log")

    accounts = open_accounts(config)
    try:
        ledger = books(accounts)
    finally:
        accounts.close()
    # The books were read through the sentinels: from the promoted replica, unless it failed over too.
    promoted = ("127.0.0.1", group.primary.port)
    assert all(group.primary_address(s) == promoted for s in group.sentinels), "a second failover"
    return Failover(load, at_risk, Stream.read(replica), ledger, killed, failover_seconds, app_metrics)


def test_failover_without_wait_loses_at_most_the_unreplicated_batches(
    tmp_path: Path, sentinel_group: RedisSentinelGroup, make_app: Callable[..., App]
) -> None:
    """WAIT off: a failover loses only calls of batches the replica never received; never counts one twice
    and charges exactly the calls in the rollup."""
    run = fail_over_under_load(tmp_path, sentinel_group, make_app, {})

    stream, ledger = run.stream, run.ledger
    stream.assert_no_duplicates()
    at_risk = run.at_risk_successes()
    assert at_risk, "no flush happened while the replica was behind"
    succeeded = run.load.paths(200)
    rolled_up = stream.paths("success")
    assert rolled_up <= succeeded, "an event of a call the client did not see succeed"
    lost = succeeded - rolled_up
    assert lost <= at_risk, f"{len(lost - at_risk)} calls lost that the replica had received"
    assert ledger.calls["success"] == len(rolled_up)
    expected = len(rolled_up) * CALL_PRICE + tokens_of(rolled_up) * TOKEN_PRICE
    assert ledger.spend == stream.charged() == ledger.charged == expected
    assert ledger.reserved == 0, "reservations of lost calls were not refunded"
    figures(
        "sentinel-failover-wait-off",
        requests=len(run.load.snapshot()),
        succeeded=len(succeeded),
        rolled_up=len(rolled_up),
        lost=len(lost),
        lost_micros=len(lost) * CALL_PRICE + tokens_of(lost) * TOKEN_PRICE,
        at_risk_batches=run.at_risk.entries,
        at_risk_successes=len(at_risk),
        replication_lag_seconds=REPLICATION_LAG,
        replication_bytes_held=sentinel_group.link.held_bytes,
        served_during_failover=run.served_during_failover(),
        failover_seconds=round(run.failover_seconds, 2),
        charged_micros=ledger.charged,
        slowest_seconds=round(run.load.slowest().seconds, 3),
        **run.spool_figures(),
    )


def test_failover_with_wait_loses_nothing(
    tmp_path: Path, sentinel_group: RedisSentinelGroup, make_app: Callable[..., App]
) -> None:
    """WAIT on: flushes the replica never acknowledged are replayed on the promoted replica; successes ==
    rollup == charges, exactly."""
    durable = {"storage": {"wait_replicas": 1, "wait_timeout": WAIT_TIMEOUT}}
    run = fail_over_under_load(tmp_path, sentinel_group, make_app, durable)

    at_risk = run.at_risk_successes()
    assert at_risk, "no flush reached the primary while the replica was behind"
    succeeded = run.load.paths(200)
    assert_exact(run.stream, run.ledger, succeeded, tokens=tokens_of(succeeded))
    figures(
        "sentinel-failover-wait-on",
        requests=len(run.load.snapshot()),
        succeeded=len(succeeded),
        rolled_up=len(run.stream.paths("success")),
        lost=len(succeeded - run.stream.paths("success")),
        at_risk_batches=run.at_risk.entries,
        at_risk_successes_replayed=len(at_risk),
        replication_lag_seconds=REPLICATION_LAG,
        served_during_failover=run.served_during_failover(),
        failover_seconds=round(run.failover_seconds, 2),
        charged_micros=run.ledger.charged,
        slowest_seconds=round(run.load.slowest().seconds, 3),
        **run.spool_figures(),
    )

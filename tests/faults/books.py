"""The books of a fault test: what the event streams, the spool and the customer's account hold."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

from meterware import Accounts
from meterware.events import UsageEvent, decode_batch
from meterware.metering.spool import Spool
from meterware.rollup.aggregate import parse_entry
from meterware.storage import _keyspace
from tests.faults.harness import CALL_PRICE, CUSTOMER, INITIAL_MICROS, SHARDS, TOKEN_PRICE, stream_fields


@dataclass(slots=True)
class Stream:
    """Every event in the shard streams of a Redis database, with its cost and batch id."""

    events: list[UsageEvent]
    costs: list[int]
    entries: int
    batch_ids: list[str]

    @classmethod
    def read(cls, client: redis.Redis | redis.RedisCluster, *, valid_only: bool = False) -> Stream:
        """Decode every entry (``valid_only``: every entry the rollup would accept; skip the others)."""
        events: list[UsageEvent] = []
        costs: list[int] = []
        batch_ids: list[str] = []
        entries = 0
        for shard in range(SHARDS):
            for fields in stream_fields(client, _keyspace.events(shard)):
                if valid_only and isinstance(parse_entry(fields, {}), str):
                    continue
                entries += 1
                batch = decode_batch(fields[b"b"])
                events += batch
                costs += [int(cost) for cost in fields[b"c"].split(b",")] if fields[b"c"] else []
                batch_ids.append(fields[b"i"].decode())
        return cls(events, costs, entries, batch_ids)

    def assert_no_duplicates(self) -> None:
        """Each batch appended once, each event once, each request (unique path) recorded once."""
        assert len(set(self.batch_ids)) == len(self.batch_ids), "a batch was appended twice"
        ids = Counter(event.id for event in self.events)
        assert not [i for i, n in ids.items() if n > 1], "an event is in the stream twice"
        paths = Counter(event.route for event in self.events)
        assert not [p for p, n in paths.items() if n > 1], "a request has two events"

    def paths(self, outcome: str) -> set[str]:
        return {event.route for event in self.events if event.outcome == outcome}

    def routes(self) -> list[str]:
        return [event.route for event in self.events]

    def of(self, customer: str) -> Stream:
        """The events of ``customer`` and their costs (the entries and batch ids stay the stream's)."""
        assert len(self.costs) == len(self.events), "a batch was priced per call: no cost per event"
        mine = [index for index, event in enumerate(self.events) if event.customer == customer]
        events, costs = [self.events[i] for i in mine], [self.costs[i] for i in mine]
        return Stream(events, costs, self.entries, self.batch_ids)

    def charged(self) -> int:
        return sum(self.costs)


def rolled_up(client: redis.Redis) -> bool:
    """Whether every shard's committed offset is its stream's last entry (the worker caught up)."""
    for shard in range(SHARDS):
        last = client.xrevrange(_keyspace.events(shard), count=1)
        if last and client.get(_keyspace.offset(shard)) != last[0][0]:
            return False
    return True


def spooled_events(spool_dir: Path) -> list[UsageEvent]:
    """Events waiting in a spool directory (read without replaying them)."""
    spool = Spool(spool_dir, 1 << 40)
    events: list[UsageEvent] = []
    for path in spool.pending():
        batch = spool.read(path)
        if batch is not None:
            events += decode_batch(batch.payload)
    return events


def spool_bytes(spool_dir: Path) -> int:
    """Bytes waiting in a spool that the app may be replaying meanwhile (a listed file may be gone)."""
    total = 0
    for path in spool_dir.glob("*.batch") if spool_dir.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


@dataclass(slots=True)
class Books:
    """What the backend says about the customer once everything is rolled up."""

    calls: dict[str, int]
    tokens: int
    spend: int
    charged: int
    reserved: int


def books(accounts: Accounts, customer: str = CUSTOMER) -> Books:
    usage = accounts.usage(customer)
    balance = accounts.balance(customer)
    return Books(
        calls=usage.calls,
        tokens=usage.meters.get("tokens", 0),
        spend=usage.spend,
        charged=INITIAL_MICROS - balance.balance,
        reserved=balance.reserved,
    )


def assert_exact(stream: Stream, ledger: Books, succeeded: set[str], *, tokens: int = 0) -> None:
    """The promise: client-seen successes == successful calls in the rollup == calls charged, once each."""
    stream.assert_no_duplicates()
    assert stream.paths("success") == succeeded, (
        f"{len(succeeded - stream.paths('success'))} successes without an event, "
        f"{len(stream.paths('success') - succeeded)} events of calls the client did not see succeed"
    )
    assert ledger.calls["success"] == len(succeeded)
    expected = len(succeeded) * CALL_PRICE + tokens * TOKEN_PRICE
    assert ledger.spend == stream.charged() == ledger.charged == expected
    assert ledger.reserved == 0, "reservations left open"

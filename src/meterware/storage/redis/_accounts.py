"""Customers, keys, balances, the credits ledger and corrections."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from redis.exceptions import NoScriptError

from meterware.errors import NotFoundError
from meterware.keys import rate_limits_from, stored_rate_limits
from meterware.metering.records import Customer, KeyRecord
from meterware.storage import _keyspace as ks
from meterware.storage.base import (
    Balance,
    Correction,
    LedgerEntry,
    default_grant,
)
from meterware.storage.redis._connection import Connection
from meterware.storage.redis._request import CUSTOMER_FIELDS, customer_from
from meterware.storage.redis._scripts import Arg, Fields, Text, as_str


def correct_call(correction: Correction) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``correct.lua``."""
    shard, customer = correction.shard, correction.customer
    keys = [
        ks.correction(shard, correction.event_id),
        ks.events(shard),
        ks.customer(shard, customer),
        ks.ledger(shard, customer),
        ks.quota(shard, correction.live, customer, correction.period_start),
    ]
    entry = correction.entry or LedgerEntry("refund", 0)
    args: list[Arg] = [
        correction.expected,
        correction.state,
        correction.payload,
        ",".join(map(str, correction.costs)),
        ",".join(map(str, correction.signs)),
        f"fix:{correction.event_id}",
        *ledger_args(entry),
        correction.spent,
    ]
    return keys, args


def ledger_args(entry: LedgerEntry) -> list[Arg]:
    """The 8 arguments of a ledger entry, as ``ledger_fields`` in common.lua reads them."""
    return [
        entry.amount,
        entry.kind,
        entry.grant,
        entry.actor,
        entry.reason,
        entry.ref,
        entry.priority,
        entry.expires_ms,
    ]


def ledger_entry_from(entry_id: Text, fields: Fields) -> LedgerEntry:
    """A ledger entry from its stream fields (absent fields are empty)."""
    get = {as_str(name): as_str(value) for name, value in fields.items()}.get
    return LedgerEntry(
        kind=get("k", ""),
        amount=int(get("a", "0")),
        grant=get("g", ""),
        actor=get("by", ""),
        reason=get("why", ""),
        ref=get("r", ""),
        priority=int(get("p", "0")),
        expires_ms=int(get("x", "0")),
        id=as_str(entry_id),
    )


def key_fields(record: KeyRecord) -> dict[str, Arg]:
    """A key record as the fields of its hash (``remaining`` only on a key that counts its uses)."""
    fields: dict[str, Arg] = {
        "key_id": record.key_id,
        "customer": record.customer,
        "prefix": record.prefix,
        "live": int(record.live),
        "status": record.status,
        "created": record.created,
        "expires_ms": record.expires_ms,
        "last_used_ms": record.last_used_ms,
        "name": record.name,
        "meta": json.dumps(record.metadata, separators=(",", ":")),
        "scopes": " ".join(record.scopes),
    }
    if record.rate_limits:
        fields["rate_limits"] = stored_rate_limits(record.rate_limits)
    if record.remaining is not None:
        fields["remaining"] = record.remaining
    return fields


def key_record_from(fields: Fields) -> KeyRecord | None:
    """A key record from the fields of its hash."""
    if not fields:
        return None
    return KeyRecord(
        key_id=as_str(fields[b"key_id"]),
        customer=as_str(fields[b"customer"]),
        prefix=as_str(fields[b"prefix"]),
        live=fields[b"live"] == b"1",
        status=as_str(fields[b"status"]),  # type: ignore[arg-type]
        created=int(fields[b"created"]),
        expires_ms=int(fields.get(b"expires_ms", 0)),
        last_used_ms=int(fields.get(b"last_used_ms", 0)),
        name=as_str(fields.get(b"name", b"")),
        metadata=json.loads(fields.get(b"meta", b"{}")),
        remaining=int(fields[b"remaining"]) if b"remaining" in fields else None,
        scopes=tuple(as_str(fields.get(b"scopes", b"")).split()),
        rate_limits=rate_limits_from(as_str(fields.get(b"rate_limits", b""))),
    )


def unique_names(fields: Fields) -> list[str]:
    """The fields of a usage hash that count unique values (each has its own set)."""
    return [as_str(name)[2:] for name in fields if as_str(name).startswith("u:")]


def usage_from(fields: Fields, unique_counts: Mapping[str, int]) -> dict[str, int]:
    """Merge a usage hash into one dict, in the order of MemoryStorage: sums, maxes, lasts, uniques."""
    parts: dict[str, dict[str, int]] = {"s:": {}, "m:": {}, "l:": {}}
    for name, value in fields.items():
        part = parts.get(as_str(name)[:2])
        if part is not None:
            part[as_str(name)[2:]] = int(value)
    return parts["s:"] | parts["m:"] | parts["l:"] | dict(unique_counts)


class AccountCommands(Connection):
    """Customers, keys and balances of :class:`~meterware.storage.redis.RedisStorage`."""

    def create_customer(self, customer: Customer) -> None:
        shard = self._shard(ks.check_customer_id(customer.id))
        keys = [ks.customer(shard, customer.id), ks.customers(shard)]
        with self._call():
            created = self._run(
                "create_customer", keys, [customer.id, customer.plan, customer.status, customer.anchor]
            )
        if not created:
            raise ValueError(f"customer {customer.id!r} already exists")

    def get_customer(self, customer_id: str) -> Customer | None:
        with self._call() as client:
            values = client.hmget(ks.customer(self._shard(customer_id), customer_id), CUSTOMER_FIELDS)
        return customer_from(customer_id, values)

    def update_customer(
        self,
        customer_id: str,
        *,
        plan: str | None = None,
        status: str | None = None,
        spend_cap: int | None = None,
    ) -> None:
        ks.check_customer_id(customer_id)
        changes: list[Arg] = []
        if plan:
            changes += ["plan", plan]
        if status:
            changes += ["status", status]
        if spend_cap is not None:
            changes += ["spend_cap", "" if spend_cap < 0 else spend_cap]
        with self._call():
            found = self._run("update_fields", [ks.customer(self._shard(customer_id), customer_id)], changes)
        if not found:
            raise NotFoundError(f"no customer {customer_id!r}")

    def swap_customer_terms(self, customer_id: str, expected: str, terms: str) -> bool:
        ks.check_customer_id(customer_id)
        key = ks.customer(self._shard(customer_id), customer_id)
        with self._call():
            reply = self._run("swap_field", [key], ["terms", expected, terms])
        if not reply:
            raise NotFoundError(f"no customer {customer_id!r}")
        return bool(reply == 1)

    def stored_plans(self) -> dict[str, str]:
        with self._call() as client:
            fields: Fields = client.hgetall(ks.stored_plans())
        return {as_str(name): as_str(record) for name, record in fields.items()}

    def swap_stored_plan(self, name: str, expected: str, record: str) -> bool:
        with self._call():
            return bool(self._run("swap_plan", [ks.stored_plans()], [name, expected, record]) == 1)

    def list_customers(self) -> list[str]:
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.smembers(ks.customers(shard))
            members: list[set[Text]] = pipe.execute()
        return sorted(as_str(member) for shard_members in members for member in shard_members)

    def add_key(self, record: KeyRecord, key_hash: str) -> None:
        shard = self._shard(record.customer)
        keys = [
            ks.customer(shard, record.customer),
            ks.key_record(shard, record.key_id),
            ks.customer_keys(shard, record.customer),
        ]
        fields = key_fields(record)
        with self._call() as client:
            pairs = [item for pair in fields.items() for item in pair]
            added = self._run("add_key", keys, [record.key_id, *pairs])
            if not added:
                raise NotFoundError(f"no customer {record.customer!r}")
            client.set(ks.key_owner(record.key_id), record.customer)
            # The hash index comes last: a key resolves only once everything else is in place. It is
            # written only if no key has the hash (two imports of one hash at once): the other is undone.
            index: list[Arg] = [
                *("key_id", record.key_id, "customer", record.customer, "live", int(record.live)),
                *("prefix", record.prefix, "uses", int(record.remaining is not None)),
                *("scopes", " ".join(record.scopes), "rate_limits", stored_rate_limits(record.rate_limits)),
            ]
            if not self._run("add_key_hash", [ks.key_by_hash(key_hash)], index):
                client.lrem(keys[2], 0, record.key_id)
                client.delete(keys[1])
                client.delete(ks.key_owner(record.key_id))
                raise ValueError("a key with this hash exists already")

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._call() as client:
            owner = client.get(ks.key_owner(key_id))
            if owner is None:
                return None
            fields = client.hgetall(ks.key_record(self._shard(as_str(owner)), key_id))
        return key_record_from(fields)

    def list_keys(self, customer_id: str) -> list[KeyRecord]:
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            key_ids = client.lrange(ks.customer_keys(shard, customer_id), 0, -1)
            pipe = client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hgetall(ks.key_record(shard, as_str(key_id)))
            records = [key_record_from(fields) for fields in pipe.execute()]
        return [record for record in records if record is not None]

    def set_key_state(self, key_id: str, *, status: str | None = None, expires_ms: int | None = None) -> None:
        changes: list[Arg] = []
        if status:
            changes += ["status", status]
        if expires_ms is not None:
            changes += ["expires_ms", expires_ms]
        with self._call() as client:
            owner = client.get(ks.key_owner(key_id))
            found = owner is not None and self._run(
                "update_fields", [ks.key_record(self._shard(as_str(owner)), key_id)], changes
            )
        if not found:
            raise NotFoundError(f"no key {key_id!r}")

    def take_key_uses(self, key_id: str, expires_ms: int) -> int | None:
        with self._call() as client:
            owner = client.get(ks.key_owner(key_id))
            if owner is None:
                return None
            key = ks.key_record(self._shard(as_str(owner)), key_id)
            taken = int(self._run("take_key_uses", [key], [expires_ms]))
        return None if taken < 0 else taken

    def record_key_use(self, uses: Mapping[str, int]) -> None:
        if not uses:
            return
        key_ids = list(uses)
        with self._call() as client:
            # The records live in their customers' shards (on Cluster, slots apart): one script per record,
            # pipelined, after the ids are resolved to their owners.
            pipe = client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.get(ks.key_owner(key_id))
            calls = [
                ([ks.key_record(self._shard(as_str(owner)), key_id)], [uses[key_id]])
                for key_id, owner in zip(key_ids, pipe.execute(), strict=True)
                if owner is not None
            ]
            script = self._scripts["record_key_use"]
            for keys, args in calls:
                script(keys=keys, args=args, client=pipe)
            replies = pipe.execute(raise_on_error=False)
            for (keys, args), reply in zip(calls, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    # A cluster pipeline leaves loading to its caller: a single call loads it on every node.
                    self._run("record_key_use", keys, args)
                elif isinstance(reply, Exception):
                    raise reply

    def get_balance(self, customer_id: str) -> Balance:
        with self._call() as client:
            balance, reserved = client.hmget(
                ks.customer(self._shard(customer_id), customer_id), ["balance", "reserved"]
            )
        if balance is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return Balance(int(balance), int(reserved or 0))

    def read_usage(self, customer_id: str, live: bool, window: str, start: int) -> dict[str, int]:
        return self.read_usage_windows(customer_id, live, window, [start])[0]

    def read_usage_windows(
        self, customer_id: str, live: bool, window: str, starts: Sequence[int]
    ) -> list[dict[str, int]]:
        if not starts:
            return []
        shard = self._shard(customer_id)
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for start in starts:
                pipe.hgetall(ks.usage(shard, live, customer_id, window, start))
            hashes: list[Fields] = pipe.execute()
            # Unique values are sets of their own: counted in a second round trip, only if there are any.
            uniques = [(index, name) for index, fields in enumerate(hashes) for name in unique_names(fields)]
            counts: list[int] = []
            if uniques:
                pipe = client.pipeline(transaction=False)
                for index, name in uniques:
                    pipe.scard(ks.unique_values(shard, live, customer_id, window, starts[index], name))
                counts = pipe.execute()
        per_window: list[dict[str, int]] = [{} for _ in starts]
        for (index, name), number in zip(uniques, counts, strict=True):
            per_window[index][name] = number
        return [usage_from(fields, found) for fields, found in zip(hashes, per_window, strict=True)]


class LedgerCommands(Connection):
    """The credits ledger and corrections of :class:`~meterware.storage.redis.RedisStorage`."""

    def grant_credits(self, customer_id: str, micros: int) -> Balance:
        return self.move_credits(customer_id, default_grant(micros))

    def move_credits(self, customer_id: str, entry: LedgerEntry) -> Balance:
        shard = self._shard(customer_id)
        keys = [ks.customer(shard, customer_id), ks.ledger(shard, customer_id), ks.grant_expiries(shard)]
        with self._call():
            reply = self._run("grant_credits", keys, [*ledger_args(entry), f"{customer_id} {entry.grant}"])
        if reply is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return Balance(int(reply[0]), int(reply[1]))

    def read_ledger(
        self, customer_id: str, start: str = "-", end: str = "+", count: int | None = None
    ) -> list[LedgerEntry]:
        with self._call() as client:
            reply = client.xrange(ks.ledger(self._shard(customer_id), customer_id), start, end, count)
        return [
            ledger_entry_from(entry_id, fields or {})
            for entry_id, fields in reply or ()
            if entry_id is not None
        ]

    def due_grant_expiries(self, shard: int, now_ms: int, limit: int) -> list[tuple[str, str]]:
        with self._call() as client:
            members = client.zrangebyscore(ks.grant_expiries(shard), 0, now_ms, start=0, num=limit)
        due = []
        for member in members:
            customer, _, grant = as_str(member).partition(" ")  # type: ignore[arg-type]
            due.append((customer, grant))
        return due

    def expire_grants(
        self, customer_id: str, last_id: str, expiries: Sequence[tuple[str, int]], actor: str
    ) -> bool:
        shard = self._shard(customer_id)
        keys = [ks.customer(shard, customer_id), ks.ledger(shard, customer_id), ks.grant_expiries(shard)]
        args: list[Arg] = [last_id, actor]
        for grant, amount in expiries:
            args += [grant, amount, f"{customer_id} {grant}"]
        with self._call():
            reply = self._run("expire_grants", keys, args)
        if reply is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return bool(reply)

    def correction_state(self, shard: int, event_id: str) -> str:
        with self._call() as client:
            state = client.get(ks.correction(shard, event_id))
        return "" if state is None else as_str(state)

    def correct_event(self, correction: Correction) -> bool:
        keys, args = correct_call(correction)
        with self._call():
            return bool(self._run("correct", keys, args))

    def imported_entries(self, shard: int, event_ids: Sequence[str]) -> dict[str, str]:
        if not event_ids:
            return {}
        with self._call() as client:
            found = client.hmget(ks.imported(shard), list(event_ids))
        pairs = zip(event_ids, found, strict=True)
        return {event_id: as_str(entry) for event_id, entry in pairs if entry is not None}

    def import_events(self, shard: int, event_ids: Sequence[str], payload: bytes) -> bool:
        keys = [ks.imported(shard), ks.events(shard)]
        costs = ",".join("0" for _ in event_ids)
        args: list[Arg] = [payload, costs, f"import:{event_ids[0]}:{len(event_ids)}", *event_ids]
        with self._call():
            return bool(self._run("import_events", keys, args))

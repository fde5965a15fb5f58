"""``redis://``: the production backend, on one node, under Sentinel or on Redis Cluster.

Atomicity lives in the Lua scripts of ``storage/lua/`` (package data), which do step for step what
:class:`~meterware.storage.memory.MemoryStorage` does. :class:`RedisStorage` (synchronous) and
:class:`AsyncRedisStorage` (asyncio, the request path) sit side by side and differ only by ``await``: the
script arguments are built and the replies read by the pure functions of this module. Every key name
comes from :mod:`meterware.storage._keyspace`; every script touches the keys of one shard, so one hash
slot. Every driver failure surfaces as one :class:`~meterware.errors.StorageError`.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path?db=N``,
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]`` and
``redis+cluster://[[user]:password@]host:port[,host:port...]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

import msgpack
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from meterware.billing.ledger import default_grant
from meterware.errors import NotFoundError, StorageError
from meterware.metering.admission import AdmitRequest, Decision, decision_from_reply
from meterware.metering.records import Customer, KeyInfo, KeyRecord
from meterware.metering.unsettled import Snapshot
from meterware.storage import _keyspace as ks
from meterware.storage.base import (
    ALERTS_MAXLEN,
    BATCH_MEMORY_SECONDS,
    START_OFFSET,
    Balance,
    Batch,
    Billed,
    CloseResult,
    Correction,
    ExportMark,
    LedgerEntry,
    RollupCommit,
    StreamEntry,
)

__all__ = ["AsyncRedisStorage", "RedisStorage"]

#: Seconds each call may take when the caller gives no timeout (the worker and the CLI).
DEFAULT_TIMEOUT: Final = 5.0
#: Calls in flight per storage object; more wait (within the timeout) instead of opening connections
#: without bound. Each connection pool (one per cluster node) is this large.
MAX_CONNECTIONS: Final = 64
#: Rounds of admissions in flight at once per asyncio storage (two: one is written while the other waits).
ADMISSION_ROUNDS: Final = 2
#: Times a call is admitted when a batch of its process was written while the admission was on its way
#: (so calls it counted as unwritten may be written: ``STALE``); the last time is not guarded.
ADMIT_ATTEMPTS: Final = 3
#: admit.lua's reply to a guarded call whose process wrote a batch since the call read its unsettled calls.
STALE_REPLY: Final = -2


class _Stale:
    """An admission to ask again: see :data:`STALE_REPLY`."""


STALE: Final = _Stale()
#: A quota hash outlives its period by this much, so late settlements still find it.
QUOTA_GRACE_SECONDS: Final = 35 * 86_400
#: The longest billing period; a settlement only knows its period's start.
LONGEST_PERIOD_SECONDS: Final = 31 * 86_400
_CUSTOMER_FIELDS: Final = ("plan", "status", "anchor")
_SCRIPTS: Final = (
    "acquire_lease",
    "add_key",
    "admit",
    "close_period",
    "commit",
    "correct",
    "create_customer",
    "due_reservations",
    "expire_grants",
    "fire_alert",
    "flush",
    "grant_credits",
    "import_events",
    "refund",
    "release_lease",
    "update_fields",
)

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"
Arg: TypeAlias = str | int | bytes
#: What the driver's types say a reply holds (always ``bytes`` here: responses are never decoded).
Text: TypeAlias = bytes | str
Fields: TypeAlias = Mapping[bytes | str, bytes | str]
_INTEGER: Final = re.compile(r"-?[0-9]+")


@cache
def script_sources() -> dict[str, str]:
    """The text of every script: its shebang line, the shared helpers of ``common.lua``, then its body.

    Redis 7 reads a script's flags from a ``#!lua`` first line. Without ``allow-oom``, a script that may
    write is refused before it runs when Redis is out of memory, instead of failing half way.
    """
    folder = resources.files("meterware.storage").joinpath("lua")

    def read(name: str) -> str:
        return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")

    common = read("common")
    sources = {}
    for name in _SCRIPTS:
        shebang, _, body = read(name).partition("\n")
        if not shebang.startswith("#!lua") or "allow-oom" in shebang:
            raise RuntimeError(f"{name}.lua must start with a #!lua line without allow-oom")
        sources[name] = f"{shebang}\n{common}\n{body}"
    return sources


def _sources() -> Iterable[tuple[str, str]]:
    return script_sources().items()


# -- URLs and clients -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a storage URL points, parsed without I/O."""

    kind: Literal["url", "sentinel", "cluster"]
    #: The URL itself for ``redis://``, ``rediss://`` and ``unix://``.
    url: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        """The target for messages, without credentials."""
        if self.kind == "url":
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return f"{parts.scheme}://{netloc}{parts.path}"
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.kind == "sentinel":
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        return f"redis+cluster://{hosts}"


def _split_hosts(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    credentials, _, hostlist = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) if has_password else None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ValueError(f"storage URL: {item!r} is not host:port")
        try:
            hosts.append((host.strip("[]"), int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"storage URL: {item!r} has a bad port") from None
    return username, password, tuple(hosts)


def parse_url(url: str) -> RedisTarget:
    """Read a Redis storage URL (no I/O); raise ``ValueError`` naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("storage URL must look like 'redis://host:6379/0'")
    if scheme in ("redis", "rediss", "unix"):
        parts = urlsplit(url)
        return RedisTarget("url", url=url, username=parts.username or None, password=parts.password or None)
    netloc, _, path = rest.partition("/")
    path = path.split("?", 1)[0]
    if scheme == "redis+sentinel":
        username, password, hosts = _split_hosts(netloc, 26379)
        service, _, db = path.strip("/").partition("/")
        if not service:
            raise ValueError(
                "redis+sentinel:// URL must name the service: redis+sentinel://host:26379/mymaster"
            )
        if db and not db.isdigit():
            raise ValueError(f"redis+sentinel:// URL: database {db!r} is not a number")
        return RedisTarget(
            "sentinel", hosts=hosts, service=service, db=int(db or 0), username=username, password=password
        )
    if scheme == "redis+cluster":
        username, password, hosts = _split_hosts(netloc, 6379)
        if path.strip("/") not in ("", "0"):
            raise ValueError("redis+cluster:// URL cannot select a database (a cluster only has db 0)")
        return RedisTarget("cluster", hosts=hosts, username=username, password=password)
    raise ValueError(f"not a Redis storage URL: scheme {scheme!r}")


def check_url(url: str) -> None:
    """Raise ``ValueError`` if the driver could not use ``url`` (no I/O; no password in the message)."""
    target = parse_url(url)
    try:
        target.where  # noqa: B018  # reads the port of a redis:// URL
        if target.kind == "url":
            redis.Redis.from_url(url).close()  # the driver's own checks (port range, options)
    except ValueError as error:
        text = str(error).replace(target.password, "***") if target.password else str(error)
        raise ValueError(f"storage URL: {text}") from None


def _sync_client(target: RedisTarget, timeout: float) -> tuple[SyncClient, redis.sentinel.Sentinel | None]:
    # No retries and short timeouts: the request path fails fast and its own policy decides what next.
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": MAX_CONNECTIONS,
    }
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    retry = Retry(NoBackoff(), 0)
    if target.kind == "cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.hosts]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(startup_nodes=nodes, retry=retry, **auth, **options), None
    if target.kind == "sentinel":
        # Sentinel is untyped before redis-py 6 and typed since: called through Any, both pass mypy.
        untyped_sentinel: Any = redis.sentinel.Sentinel
        sentinel = untyped_sentinel(list(target.hosts), sentinel_kwargs=dict(options), **options)
        client: redis.Redis = sentinel.master_for(target.service, db=target.db, retry=retry, **auth)
        return client, sentinel
    return redis.Redis.from_url(target.url, retry=retry, **options), None


def _async_client(
    target: RedisTarget, timeout: float
) -> tuple[AsyncClient, redis.asyncio.sentinel.Sentinel | None]:
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": MAX_CONNECTIONS,
    }
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    retry = AsyncRetry(NoBackoff(), 0)
    if target.kind == "cluster":
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.hosts]
        client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, retry=retry, **auth, **options)
        return client, None
    if target.kind == "sentinel":
        # As the synchronous one: untyped before redis-py 6, typed since.
        untyped_sentinel: Any = redis.asyncio.sentinel.Sentinel
        sentinel: redis.asyncio.sentinel.Sentinel = untyped_sentinel(
            list(target.hosts), sentinel_kwargs=dict(options), **options
        )
        return sentinel.master_for(target.service, db=target.db, retry=retry, **auth), sentinel
    return redis.asyncio.Redis.from_url(target.url, retry=retry, **options), None


class _DriverErrors:
    """Turn every failure of the driver into one :class:`StorageError`: one line, no password."""

    def __init__(self, target: RedisTarget) -> None:
        self.where = target.where
        self.secrets = tuple(secret for secret in (target.password,) if secret)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, RedisError | RedisClusterException | OSError):
            # The scripts' own refusals: they checked everything and wrote nothing.
            refused = isinstance(error, ResponseError) and str(error).startswith(("WRONGTYPE", "BADVALUE"))
            raise StorageError(self.message(error), refused=refused) from error

    def message(self, error: BaseException) -> str:
        text = " ".join(str(error).split())
        for secret in self.secrets:
            text = text.replace(secret, "***")
        # Long enough for a script's refusal naming its longest key (a customer id is up to 128 characters).
        return f"Redis at {self.where}: {type(error).__name__}: {text[:400]}"


# -- script arguments and replies (pure, shared by both clients) -----------------------------------------


class _Keys:
    """The KEYS of one script call, each key once; arguments refer to them by 1-based index."""

    def __init__(self, *fixed: str) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        for key in fixed:
            self.index(key)

    def index(self, key: str) -> int:
        found = self._index.get(key)
        if found is None:
            self.keys.append(key)
            found = self._index[key] = len(self.keys)
        return found


#: Admission templates kept (a template per key, plan terms, period and route weight in use).
TEMPLATE_CACHE_SIZE: Final = 10_000
_templates: dict[tuple[object, ...], tuple[tuple[str, ...], tuple[Arg, ...]]] = {}


def admit_template(request: AdmitRequest) -> tuple[tuple[str, ...], tuple[Arg, ...]]:
    """The KEYS and arguments of one call in ``admit.lua``, less its reservation id (cached: calls with
    the same key, terms and period share them)."""
    identity = (
        request.shard,
        request.key_id,
        request.customer,
        request.live,
        request.plan.name,
        request.plan.prepaid,
        request.plan.rate_limits,
        request.period_start,
        request.period_end,
        request.holds,
        request.reservation_timeout_ms,
        request.calls,
    )
    template = _templates.get(identity)
    if template is not None:
        return template
    shard, customer, live = request.shard, request.customer, request.live
    keys = [
        ks.key_record(shard, request.key_id),
        ks.customer(shard, customer),
        ks.quota(shard, live, customer, request.period_start),
        ks.reservations(shard),
        ks.reservation_deadlines(shard),
    ]
    keys += [ks.rate(shard, live, customer, limit.seconds) for limit in request.plan.rate_limits]
    args: list[Arg] = [
        customer,
        int(request.charges_credits),
        "",  # the reservation id: each call's own
        request.reservation_timeout_ms,
        request.period_end + QUOTA_GRACE_SECONDS,
        f"{customer} {int(live)} {request.period_start}",
        request.calls,
        len(request.plan.rate_limits),
    ]
    for limit in request.plan.rate_limits:
        args += [limit.amount, limit.seconds]
    args.append(len(request.holds))
    for hold in request.holds:
        args += [hold.meter, hold.quota, hold.included, hold.price, hold.need, hold.hold, int(hold.exact)]
    if len(_templates) >= TEMPLATE_CACHE_SIZE:
        _templates.clear()
    template = _templates[identity] = (tuple(keys), tuple(args))
    return template


def admit_call(requests: Sequence[AdmitRequest], *, guarded: bool = True) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``admit.lua`` admitting ``requests`` (of one shard) in order.

    ``guarded``: a call whose unsettled calls were read outside any batch is answered ``STALE`` (and
    writes nothing) if a batch its process made since has been written: it is to be asked again.
    """
    keys: list[str] = []
    args: list[Arg] = [0]
    calls: list[Arg] = []
    numbers: dict[int, int] = {}
    markers: list[str] = []  # batch markers, after every template's keys
    unsettled: list[tuple[int, list[list[int]]]] = []
    for request in requests:
        template = admit_template(request)
        number = numbers.get(id(template))
        if number is None:
            number = numbers[id(template)] = len(numbers) + 1
            template_keys, template_args = template
            keys += template_keys
            args += (len(template_keys), len(template_args), *template_args)
        calls += (number, request.reservation_id, "")
        if snapshot := request.unsettled_changes():
            unsettled.append((len(calls) - 1, _unsettled_rows(request, snapshot, markers, guarded)))
    for at, rows in unsettled:
        for row in rows:
            row[0] = row[0] and row[0] + len(keys)
        calls[at] = msgpack.packb(rows)
    args[0] = len(numbers)
    return keys + markers, args + calls


def _unsettled_rows(
    request: AdmitRequest, snapshot: Snapshot, markers: list[str], guarded: bool
) -> list[list[int]]:
    """A call's changes still to come, as admit.lua reads them (key positions counted in ``markers``):
    first the guard (the key of its process's highest generation written, and the generation read),
    then per change the key of its batch marker, the credits it releases, and per hold the units."""
    rows = [[0, 0]]
    if guarded and snapshot.guarded:
        markers.append(ks.batch_writer(request.shard, snapshot.writer))
        rows[0] = [len(markers), snapshot.generation]
    for batch_id, change in snapshot.changes:
        marker = 0
        if batch_id:
            markers.append(ks.flushed_batch(request.shard, batch_id))
            marker = len(markers)
        row = [marker, change.released]
        for hold in request.holds:
            used, held = change.meters.get(hold.meter, (0, 0))
            row += (used, held)
        rows.append(row)
    return rows


def decisions_from_replies(
    requests: Sequence[AdmitRequest], replies: Sequence[Any], errors: _DriverErrors
) -> list[Decision | StorageError | _Stale]:
    """Each call's decision, the refusal of a call whose keys hold garbage (it wrote nothing), or
    ``STALE`` for a call to ask again (it wrote nothing either)."""
    now = time.time()
    return [_decision(request, reply, now, errors) for request, reply in zip(requests, replies, strict=True)]


def _decision(
    request: AdmitRequest, reply: Any, now: float, errors: _DriverErrors
) -> Decision | StorageError | _Stale:
    if int(reply[0]) >= 0:
        return decision_from_reply(request, reply, now)
    if int(reply[0]) == STALE_REPLY:
        return STALE
    return StorageError(errors.message(ResponseError(_text(reply[1]))), refused=True)


_term_of: Final = operator.attrgetter(
    "customer", "live", "period_start", "billable", "charges_credits", "meters"
)
_reservation_of: Final = operator.attrgetter("reservation_id")


def flush_call(batch: Batch) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``flush.lua`` (every settlement's customer lives in the batch's shard).

    A batch holds many calls of few customers: the settlements are sent as terms (what calls of one
    customer with the same flags and meters share), each once; every event names its term (by the
    position of the term's first event), and only the reservations to close go one by one.
    """
    shard = batch.shard
    keys = _Keys(
        ks.flushed_batch(shard, batch.batch_id),
        ks.events(shard),
        ks.reservations(shard),
        ks.reservation_deadlines(shard),
    )
    settlements = batch.settlements
    identities: list[tuple[Any, ...] | None]
    reservation_ids: list[str | None]
    try:
        identities = list(map(_term_of, settlements))
        reservation_ids = list(map(_reservation_of, settlements))
    except AttributeError:  # refused calls (None) settle nothing
        identities = [None if item is None else _term_of(item) for item in settlements]
        reservation_ids = [None if item is None else item.reservation_id for item in settlements]
    first: dict[tuple[Any, ...] | None, int] = {}
    events = list(map(first.setdefault, identities, itertools.count(1)))
    counts = Counter(events)
    # The costs text of the batch if no call crosses its included units (flush.lua checks that).
    texts: dict[int, str] = {}
    term_args: list[Arg] = []
    for identity, number in first.items():
        if identity is None:
            texts[number] = "0"
            continue
        customer, live, period_start, billable, charges_credits, meters = identity
        texts[number] = str(sum(units * price for _, units, price, _ in meters) if billable else 0)
        term_args += [
            number,
            counts[number],
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.ledger(shard, customer)),
            keys.index(ks.quota(shard, live, customer, period_start)),
            period_start + LONGEST_PERIOD_SECONDS + QUOTA_GRACE_SECONDS,
            int(billable),
            int(charges_credits),
            len(meters),
        ]
        for meter in meters:
            term_args += meter
    reservations: list[Arg] = []
    if any(reservation_ids):
        for number, (settlement, reservation_id, term) in enumerate(
            zip(settlements, reservation_ids, events, strict=True), 1
        ):
            if reservation_id:
                assert settlement is not None
                reservations += (reservation_id, term, number, int(settlement.closes))
    # Beyond 14 digits Lua's numbers would print (and sum) otherwise: such a batch is priced per call.
    costs = ",".join(map(texts.__getitem__, events)) if max(map(len, texts.values()), default=0) < 15 else ""
    args: list[Arg] = [batch.batch_id, batch.payload, BATCH_MEMORY_SECONDS]
    args += [msgpack.packb(term_args), msgpack.packb(events), msgpack.packb(reservations), costs]
    writer = keys.index(ks.batch_writer(shard, batch.writer)) if batch.writer else 0
    args += [writer, batch.generation]
    return keys.keys, args


def flush_result(batch: Batch, reply: Any, errors: _DriverErrors) -> bool:
    """Whether ``flush.lua`` applied ``batch`` (False: it had already); raise its refusal of a customer's
    stored values as a ``StorageError`` naming the customer (``customers``), so the rest can go."""
    if not isinstance(reply, list):
        return bool(reply)
    customer_key, problem = _text(reply[0]), _text(reply[1])
    owners = {ks.customer(batch.shard, s.customer): s.customer for s in batch.settlements if s is not None}
    customer = owners.get(customer_key)
    message = errors.message(ResponseError(problem))
    raise StorageError(message, refused=True, customers=(customer,) if customer else ())


def correct_call(correction: Correction) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``correct.lua``."""
    shard, customer = correction.shard, correction.customer
    keys = [
        ks.correction(shard, correction.event_id),
        ks.events(shard),
        ks.customer(shard, customer),
        ks.ledger(shard, customer),
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
    ]
    return keys, args


def commit_call(commit: RollupCommit) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``commit.lua`` (every window's customer lives in the commit's shard)."""
    shard = commit.shard
    keys = _Keys(ks.fence(shard), ks.offset(shard), ks.events(shard), ks.dead_letters(shard))
    args: list[Arg] = [commit.token, commit.expected_offset, commit.new_offset, len(commit.windows)]
    for window, totals in commit.windows.items():
        where = (shard, window.live, window.customer, window.window, window.start)
        args += [keys.index(ks.usage(*where)), totals.ttl, len(totals.sums)]
        for name, amount in totals.sums.items():
            args += [name, amount]
        args.append(len(totals.maxes))
        for name, value in totals.maxes.items():
            args += [name, value]
        args.append(len(totals.lasts))
        for name, (stamp, value) in totals.lasts.items():
            args += [name, stamp, value]
        uniques = {name: values for name, values in totals.uniques.items() if values}
        args.append(len(uniques))
        for name, values in uniques.items():
            args += [name, keys.index(ks.unique_values(*where, name)), len(values), *sorted(values)]
    args.append(len(commit.dead_letters))
    for entry_id, reason in commit.dead_letters:
        args += [entry_id, reason]
    return keys.keys, args


def refund_call(shard: int, due: Sequence[bytes]) -> tuple[list[str], list[Arg]]:
    """KEYS and ARGV of ``refund.lua`` from the ``id, record`` pairs of ``due_reservations.lua``.

    Raise ``ValueError`` naming the reservation if a record is not one (it was not written by admit.lua).
    """
    keys = _Keys(ks.reservations(shard), ks.reservation_deadlines(shard))
    args: list[Arg] = []
    for reservation_id, record in zip(due[::2], due[1::2], strict=True):
        fields = record.decode(errors="replace").split()
        # "customer live period_start credits meter hold ...", as release() in common.lua checks it.
        if (
            len(fields) < 4
            or len(fields) % 2
            or not _INTEGER.fullmatch(fields[2])
            or not all(_INTEGER.fullmatch(number) for number in fields[3::2])
        ):
            where = f"{ks.reservations(shard)} field {reservation_id.decode(errors='replace')}"
            raise ValueError(f"BADVALUE {where} is not a reservation record")
        customer, live, period_start = fields[:3]
        args += [
            reservation_id,
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.quota(shard, live == "1", customer, int(period_start))),
        ]
    return keys.keys, args


def release_calls(admissions: Sequence[AdmitRequest]) -> list[tuple[list[str], list[Arg]]]:
    """KEYS and ARGV of ``refund.lua`` closing the reservations of ``admissions``, one call per shard."""
    by_shard: dict[int, tuple[_Keys, list[Arg]]] = {}
    for admission in admissions:
        shard, customer = admission.shard, admission.customer
        keys, args = by_shard.setdefault(
            shard, (_Keys(ks.reservations(shard), ks.reservation_deadlines(shard)), [])
        )
        args += [
            admission.reservation_id,
            keys.index(ks.customer(shard, customer)),
            keys.index(ks.quota(shard, admission.live, customer, admission.period_start)),
        ]
    return [(keys.keys, args) for keys, args in by_shard.values()]


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
    get = {_text(name): _text(value) for name, value in fields.items()}.get
    return LedgerEntry(
        kind=get("k", ""),
        amount=int(get("a", "0")),
        grant=get("g", ""),
        actor=get("by", ""),
        reason=get("why", ""),
        ref=get("r", ""),
        priority=int(get("p", "0")),
        expires_ms=int(get("x", "0")),
        id=_text(entry_id),
    )


def _text(value: Text) -> str:
    return value.decode() if isinstance(value, bytes) else value


def customer_from(customer_id: str, values: Sequence[Text | None]) -> Customer | None:
    """A customer from the ``plan, status, anchor`` fields of its hash."""
    plan, status, anchor = values
    if plan is None or status is None:
        return None
    return Customer(customer_id, _text(plan), _text(status), int(anchor or 0))  # type: ignore[arg-type]


def key_info_from(fields: Fields, customer: Customer | None) -> KeyInfo | None:
    """What a key hash resolves to, from the key-hash index entry and the owner's record."""
    if not fields or customer is None:
        return None
    return KeyInfo(_text(fields[b"key_id"]), customer, fields[b"live"] == b"1", _text(fields[b"prefix"]))


def key_fields(record: KeyRecord) -> dict[str, Arg]:
    """A key record as the fields of its hash."""
    return {
        "key_id": record.key_id,
        "customer": record.customer,
        "prefix": record.prefix,
        "live": int(record.live),
        "status": record.status,
        "created": record.created,
        "expires_ms": record.expires_ms,
    }


def key_record_from(fields: Fields) -> KeyRecord | None:
    """A key record from the fields of its hash."""
    if not fields:
        return None
    return KeyRecord(
        key_id=_text(fields[b"key_id"]),
        customer=_text(fields[b"customer"]),
        prefix=_text(fields[b"prefix"]),
        live=fields[b"live"] == b"1",
        status=_text(fields[b"status"]),  # type: ignore[arg-type]
        created=int(fields[b"created"]),
        expires_ms=int(fields.get(b"expires_ms", 0)),
    )


def unique_names(fields: Fields) -> list[str]:
    """The fields of a usage hash that count unique values (each has its own set)."""
    return [_text(name)[2:] for name in fields if _text(name).startswith("u:")]


def usage_from(fields: Fields, unique_counts: Mapping[str, int]) -> dict[str, int]:
    """Merge a usage hash into one dict, in the order of MemoryStorage: sums, maxes, lasts, uniques."""
    parts: dict[str, dict[str, int]] = {"s:": {}, "m:": {}, "l:": {}}
    for name, value in fields.items():
        part = parts.get(_text(name)[:2])
        if part is not None:
            part[_text(name)[2:]] = int(value)
    return parts["s:"] | parts["m:"] | parts["l:"] | dict(unique_counts)


def billed_from(fields: Fields) -> Billed:
    """What closed invoices billed, from the customer's billed hash (``v`` and one field per period)."""
    periods = {int(name): _text(value) for name, value in fields.items() if _text(name).isdigit()}
    return Billed(int(fields.get(b"v", 0)), periods)


def stream_entries(reply: Iterable[tuple[Text | None, Fields | None]] | None) -> list[StreamEntry]:
    """Stream entries from an XRANGE reply (fields stay bytes, as the worker reads them)."""
    return [
        StreamEntry(_text(entry_id), {_bytes(name): _bytes(value) for name, value in (fields or {}).items()})
        for entry_id, fields in reply or ()
        if entry_id is not None
    ]


def _bytes(value: Text) -> bytes:
    return value.encode() if isinstance(value, str) else value


# -- the synchronous backend --------------------------------------------------------------------------


class RedisStorage:
    """The Redis backend for threads: the WSGI request path, the rollup worker and the CLI.

    ``timeout`` (seconds) bounds connecting and every call; nothing is retried. No connection is made
    until the first call.
    """

    def __init__(self, url: str, *, shards: int = 16, timeout: float | None = None) -> None:
        self.shards = shards
        self._target = parse_url(url)
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._errors = _DriverErrors(self._target)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._client: SyncClient | None = None
        self._sentinel: redis.sentinel.Sentinel | None = None
        self._scripts: dict[str, Script] = {}

    def _redis(self) -> SyncClient:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client, self._sentinel = _sync_client(self._target, self._timeout)
                    self._scripts = {name: client.register_script(text) for name, text in _sources()}
                    self._client = client
        return client

    @contextmanager
    def _call(self) -> Iterator[SyncClient]:
        """Run one operation: wait (within the timeout) for a free connection, translate driver errors."""
        with self._errors:
            if not self._slots.acquire(timeout=self._timeout):
                raise TimeoutError(f"no free connection within {self._timeout}s")
            client: SyncClient | None = None
            try:
                client = self._redis()
                yield client
            except redis.ConnectionError:
                # As in the asyncio client: drop the idle pooled connections to a server that went away.
                if isinstance(client, redis.Redis):
                    with contextlib.suppress(RedisError, OSError):
                        client.connection_pool.disconnect(inuse_connections=False)
                raise
            finally:
                self._slots.release()

    def _run(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return self._scripts[script](keys=keys, args=args)

    def _shard(self, customer_id: str) -> int:
        return ks.shard_of(customer_id, self.shards)

    # -- the request path

    def resolve_key(self, key_hash: str) -> KeyInfo | None:
        with self._call() as client:
            fields = client.hgetall(ks.key_by_hash(key_hash))
            if not fields:
                return None
            customer_id = _text(fields[b"customer"])
            values = client.hmget(ks.customer(self._shard(customer_id), customer_id), _CUSTOMER_FIELDS)
        return key_info_from(fields, customer_from(customer_id, values))

    def admit(self, request: AdmitRequest) -> Decision:
        for attempt in range(1, ADMIT_ATTEMPTS + 1):
            with self._call():
                # Read at the last moment: the calls this process finished until then count.
                keys, args = admit_call((request,), guarded=attempt < ADMIT_ATTEMPTS)
                replies = self._run("admit", keys, args)
            (decision,) = decisions_from_replies((request,), replies, self._errors)
            if isinstance(decision, StorageError):
                raise decision
            if isinstance(decision, Decision):
                return decision
        raise AssertionError("the last attempt is not guarded")

    def flush(self, batch: Batch) -> bool:
        keys, args = flush_call(batch)
        with self._call():
            reply = self._run("flush", keys, args)
        return flush_result(batch, reply, self._errors)

    def release(self, admissions: Sequence[AdmitRequest]) -> int:
        with self._call():
            return sum(int(self._run("refund", keys, args)) for keys, args in release_calls(admissions))

    # -- the rollup worker

    def acquire_lease(self, shard: int, owner: str, ttl_ms: int) -> int | None:
        if ttl_ms < 1:
            raise ValueError(f"a lease lasts at least 1 ms, not {ttl_ms}")
        with self._call():
            token = self._run("acquire_lease", [ks.lease(shard), ks.fence(shard)], [owner, ttl_ms])
        return None if token is None else int(token)

    def release_lease(self, shard: int, owner: str) -> None:
        with self._call():
            self._run("release_lease", [ks.lease(shard)], [owner])

    def committed_offset(self, shard: int) -> str:
        with self._call() as client:
            offset = client.get(ks.offset(shard))
        return START_OFFSET if offset is None else _text(offset)

    def read_stream(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        if count <= 0:
            return []
        with self._call() as client:
            reply = client.xrange(ks.events(shard), min=f"({after}", max="+", count=count)
        return stream_entries(reply)

    def commit_rollup(self, commit: RollupCommit) -> bool:
        keys, args = commit_call(commit)
        with self._call():
            return bool(self._run("commit", keys, args))

    def expire_reservations(self, shard: int, limit: int) -> int:
        if limit <= 0:
            return 0
        due_keys = [ks.reservations(shard), ks.reservation_deadlines(shard)]
        with self._call():
            due = self._run("due_reservations", due_keys, [limit])
            if not due:
                return 0
            try:
                keys, args = refund_call(shard, due)
            except ValueError as error:
                raise StorageError(f"Redis at {self._errors.where}: {error}") from None
            return int(self._run("refund", keys, args))

    def trim_stream(self, shard: int, min_id: str) -> int:
        with self._call() as client:
            return int(client.xtrim(ks.events(shard), minid=min_id, approximate=False))

    def stream_length(self, shard: int) -> int:
        with self._call() as client:
            return int(client.xlen(ks.events(shard)))

    def lease_holder(self, shard: int) -> tuple[str, int] | None:
        """Who holds the shard's rollup lease, and until when (epoch ms); None when no one does."""
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            pipe.get(ks.lease(shard))
            pipe.pttl(ks.lease(shard))
            owner, ttl_ms = pipe.execute()
        if owner is None or ttl_ms < 0:
            return None
        return _text(owner), time.time_ns() // 1_000_000 + int(ttl_ms)

    def dead_letters(self, shard: int) -> list[StreamEntry]:
        """Entries the worker could not decode (for inspection)."""
        with self._call() as client:
            return stream_entries(client.xrange(ks.dead_letters(shard)))

    # -- accounts

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
            values = client.hmget(ks.customer(self._shard(customer_id), customer_id), _CUSTOMER_FIELDS)
        return customer_from(customer_id, values)

    def update_customer(
        self, customer_id: str, *, plan: str | None = None, status: str | None = None
    ) -> None:
        ks.check_customer_id(customer_id)
        changes: list[Arg] = []
        if plan:
            changes += ["plan", plan]
        if status:
            changes += ["status", status]
        with self._call():
            found = self._run("update_fields", [ks.customer(self._shard(customer_id), customer_id)], changes)
        if not found:
            raise NotFoundError(f"no customer {customer_id!r}")

    def list_customers(self) -> list[str]:
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.smembers(ks.customers(shard))
            members: list[set[Text]] = pipe.execute()
        return sorted(_text(member) for shard_members in members for member in shard_members)

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
            # The hash index comes last: a key resolves only once everything else is in place.
            client.hset(
                ks.key_by_hash(key_hash),
                mapping={
                    "key_id": record.key_id,
                    "customer": record.customer,
                    "live": int(record.live),
                    "prefix": record.prefix,
                },
            )

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._call() as client:
            owner = client.get(ks.key_owner(key_id))
            if owner is None:
                return None
            fields = client.hgetall(ks.key_record(self._shard(_text(owner)), key_id))
        return key_record_from(fields)

    def list_keys(self, customer_id: str) -> list[KeyRecord]:
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            key_ids = client.lrange(ks.customer_keys(shard, customer_id), 0, -1)
            pipe = client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hgetall(ks.key_record(shard, _text(key_id)))
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
                "update_fields", [ks.key_record(self._shard(_text(owner)), key_id)], changes
            )
        if not found:
            raise NotFoundError(f"no key {key_id!r}")

    def grant_credits(self, customer_id: str, micros: int) -> Balance:
        return self.move_credits(customer_id, default_grant(micros))

    # -- the credits ledger and corrections

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
            customer, _, grant = _text(member).partition(" ")  # type: ignore[arg-type]
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
        return "" if state is None else _text(state)

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
        return {event_id: _text(entry) for event_id, entry in pairs if entry is not None}

    def import_events(self, shard: int, event_ids: Sequence[str], payload: bytes) -> bool:
        keys = [ks.imported(shard), ks.events(shard)]
        costs = ",".join("0" for _ in event_ids)
        args: list[Arg] = [payload, costs, f"import:{event_ids[0]}:{len(event_ids)}", *event_ids]
        with self._call():
            return bool(self._run("import_events", keys, args))

    def get_balance(self, customer_id: str) -> Balance:
        with self._call() as client:
            balance, reserved = client.hmget(
                ks.customer(self._shard(customer_id), customer_id), ["balance", "reserved"]
            )
        if balance is None:
            raise NotFoundError(f"no customer {customer_id!r}")
        return Balance(int(balance), int(reserved or 0))

    def read_usage(self, customer_id: str, live: bool, window: str, start: int) -> dict[str, int]:
        where = (self._shard(customer_id), live, customer_id, window, start)
        with self._call() as client:
            fields = client.hgetall(ks.usage(*where))
            names = unique_names(fields)
            counts: list[int] = []
            if names:
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.scard(ks.unique_values(*where, name))
                counts = pipe.execute()
        return usage_from(fields, dict(zip(names, counts, strict=True)))

    # -- invoices

    def read_billed(self, customer_id: str) -> Billed:
        key = ks.billed(self._shard(customer_id), customer_id)
        with self._call() as client:
            fields = client.hgetall(key)
        try:
            return billed_from(fields)
        except ValueError:
            where = self._errors.where
            raise StorageError(f"Redis at {where}: BADVALUE {key} field v is not an integer") from None

    def read_invoice(self, customer_id: str, period_start: int) -> str | None:
        with self._call() as client:
            invoice = client.get(ks.invoice(self._shard(customer_id), customer_id, period_start))
        return None if invoice is None else _text(invoice)

    def close_period(
        self, customer_id: str, period_start: int, invoice: str, billed: Mapping[int, str], version: int
    ) -> CloseResult:
        shard = self._shard(customer_id)
        keys = [ks.invoice(shard, customer_id, period_start), ks.billed(shard, customer_id)]
        args: list[Arg] = [invoice, version]
        for start, record in billed.items():
            args += [start, record]
        with self._call():
            reply = int(self._run("close_period", keys, args))
        return "closed" if reply == 1 else "exists" if reply == 0 else "conflict"

    # -- export to billing providers

    def set_external_id(self, customer_id: str, provider: str, external_id: str | None) -> None:
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            if external_id is None:
                client.hdel(ks.external_ids(shard, customer_id), provider)
            else:
                client.hset(ks.external_ids(shard, customer_id), provider, external_id)

    def get_external_ids(self, customer_id: str) -> dict[str, str]:
        with self._call() as client:
            ids = client.hgetall(ks.external_ids(self._shard(customer_id), customer_id))
        return {_text(provider): _text(external) for provider, external in ids.items()}

    def read_export_marks(
        self, provider: str, customer_id: str, window: str, starts: Sequence[int]
    ) -> dict[int, dict[str, ExportMark]]:
        if not starts:
            return {}
        shard = self._shard(customer_id)
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for start in starts:
                pipe.hgetall(ks.export_marks(shard, provider, customer_id, window, start))
            replies = pipe.execute()
        marks: dict[int, dict[str, ExportMark]] = {}
        for start, fields in zip(starts, replies, strict=True):
            if fields:
                marks[start] = {_text(meter): _export_mark(text) for meter, text in fields.items()}
        return marks

    def write_export_marks(
        self,
        provider: str,
        customer_id: str,
        window: str,
        marks: Mapping[int, Mapping[str, ExportMark | None]],
        ttl: int,
    ) -> None:
        shard = self._shard(customer_id)
        with self._call() as client:
            pipe = client.pipeline(transaction=False)
            for start, meters in marks.items():
                key = ks.export_marks(shard, provider, customer_id, window, start)
                kept = {
                    meter: f"{m.total} {m.revision} {m.value} {int(m.confirmed)}"
                    for meter, m in meters.items()
                    if m is not None
                }
                dropped = [meter for meter, mark in meters.items() if mark is None]
                if kept:
                    pipe.hset(key, mapping=kept)  # type: ignore[arg-type]  # str values are fine
                if dropped:
                    pipe.hdel(key, *dropped)
                if ttl > 0:
                    pipe.expire(key, ttl)
            pipe.execute()

    def read_export_cursor(self, provider: str, customer_id: str, window: str) -> int | None:
        with self._call() as client:
            end = client.get(ks.export_cursor(self._shard(customer_id), provider, customer_id, window))
        return None if end is None else int(end)

    def write_export_cursor(self, provider: str, customer_id: str, window: str, end: int) -> None:
        with self._call() as client:
            client.set(ks.export_cursor(self._shard(customer_id), provider, customer_id, window), end)

    # -- alerts

    def set_alert_rules(self, customer_id: str, rules: str | None) -> None:
        shard = self._shard(customer_id)
        with self._call() as client:
            if not client.exists(ks.customer(shard, customer_id)):
                raise NotFoundError(f"no customer {customer_id!r}")
            if rules is None:
                client.delete(ks.alert_rules(shard, customer_id))
            else:
                client.set(ks.alert_rules(shard, customer_id), rules)

    def get_alert_rules(self, customer_id: str) -> str | None:
        with self._call() as client:
            rules = client.get(ks.alert_rules(self._shard(customer_id), customer_id))
        return None if rules is None else _text(rules)

    def fire_alert(
        self, customer_id: str, name: str, expires_at: int, fields: Mapping[str, str]
    ) -> str | None:
        shard = self._shard(customer_id)
        keys = [ks.alert_fired(shard, customer_id, name), ks.alerts(shard)]
        args: list[Arg] = [expires_at, ALERTS_MAXLEN]
        args += [item for pair in fields.items() for item in pair]
        with self._call():
            entry_id = self._run("fire_alert", keys, args)
        return None if not entry_id else _text(entry_id)

    def read_alerts(self, shard: int, after: str, count: int) -> list[StreamEntry]:
        if count <= 0:
            return []
        with self._call() as client:
            return stream_entries(client.xrange(ks.alerts(shard), min=f"({after}", max="+", count=count))

    def close(self) -> None:
        """Close the connections (the storage reconnects if used again)."""
        with self._lock:
            client, sentinel, self._client, self._sentinel = self._client, self._sentinel, None, None
        with self._errors:
            if client is not None:
                client.close()
            for node in sentinel.sentinels if sentinel is not None else ():
                node.close()


def _export_mark(text: bytes | str) -> ExportMark:
    total, revision, value, confirmed = _text(text).split()
    return ExportMark(int(total), int(revision), int(value), confirmed == "1")


# -- the asyncio request path ------------------------------------------------------------------------


class AsyncRedisStorage:
    """The Redis backend's request path for asyncio (ASGI): :class:`RedisStorage` with ``await``.

    The client is made on first use, on the running event loop (never at import or construction); a
    storage used from a new loop makes a new client there.
    """

    def __init__(self, url: str, *, shards: int = 16, timeout: float | None = None) -> None:
        self.shards = shards
        self._target = parse_url(url)
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._errors = _DriverErrors(self._target)
        self._client: AsyncClient | None = None
        self._sentinel: redis.asyncio.sentinel.Sentinel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.BoundedSemaphore(MAX_CONNECTIONS)
        self._starting = asyncio.Lock()
        self._started = False
        self._scripts: dict[str, AsyncScript] = {}
        self._admit_loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[AdmitRequest, asyncio.Future[Decision]]] = []
        self._admitters: set[asyncio.Task[None]] = set()

    async def _redis(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._client
        if client is None or self._loop is not loop:
            client, self._sentinel = _async_client(self._target, self._timeout)
            self._scripts = {name: client.register_script(text) for name, text in _sources()}
            self._slots, self._starting = asyncio.BoundedSemaphore(MAX_CONNECTIONS), asyncio.Lock()
            self._client, self._loop, self._started = client, loop, False
        if not self._started:
            # redis-py's asyncio cluster client breaks when many first commands race its lazy start
            # (seen with 8.1: "Connection closed by server"), so it starts once, before any command.
            async with self._starting:
                if not self._started and isinstance(client, redis.asyncio.cluster.RedisCluster):
                    await client.initialize()
                self._started = True
        return client

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[AsyncClient]:
        """Run one operation: wait (within the timeout) for a free connection, translate driver errors."""
        with self._errors:
            async with asyncio.timeout(self._timeout):
                client = await self._redis()
                slots = self._slots
                await slots.acquire()
            try:
                yield client
            except redis.ConnectionError:
                # The server is gone or went away: drop the idle pooled connections to it, so none is met
                # dead later (the fault tests saw a key lookup fail with "Connection closed by server" a
                # second after Redis came back from a SIGKILL, on a connection pooled before it).
                if isinstance(client, redis.asyncio.Redis):
                    with contextlib.suppress(RedisError, OSError):  # closing dead sockets may complain
                        await client.connection_pool.disconnect(inuse_connections=False)
                raise
            finally:
                slots.release()

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self._scripts[script](keys=keys, args=args)

    async def resolve_key(self, key_hash: str) -> KeyInfo | None:
        async with self._call() as client:
            fields = await client.hgetall(ks.key_by_hash(key_hash))
            if not fields:
                return None
            customer_id = _text(fields[b"customer"])
            shard = ks.shard_of(customer_id, self.shards)
            values = await client.hmget(ks.customer(shard, customer_id), _CUSTOMER_FIELDS)
        return key_info_from(fields, customer_from(customer_id, values))

    async def admit(self, request: AdmitRequest) -> Decision:
        """Admit a call together with the calls of other requests that wait meanwhile.

        At most ``ADMISSION_ROUNDS`` rounds of admissions are in flight: calls that arrive meanwhile go
        together in the next, one script call per shard, so under load one round trip admits many calls
        and when idle a call goes at once. Each call is still decided on its own, in order, exactly as
        alone.
        """
        loop = asyncio.get_running_loop()
        if self._admit_loop is not loop:  # a new event loop: whatever waited on the old one is gone
            self._admit_loop, self._waiting, self._admitters = loop, [], set()
        future: asyncio.Future[Decision] = loop.create_future()
        self._waiting.append((request, future))
        if len(self._admitters) < ADMISSION_ROUNDS:
            self._admitters.add(loop.create_task(self._admit_waiting()))
        return await future

    async def _admit_waiting(self) -> None:
        try:
            while self._waiting:
                calls, self._waiting = self._waiting, []
                by_shard: dict[int, list[tuple[AdmitRequest, asyncio.Future[Decision]]]] = {}
                for call in calls:
                    by_shard.setdefault(call[0].shard, []).append(call)
                # Failures reach the callers through their futures; the next round goes on regardless.
                await asyncio.gather(
                    *(self._admit_shard(shard_calls) for shard_calls in by_shard.values()),
                    return_exceptions=True,
                )
        finally:
            # At once, not in a done callback: a call arriving in between would find no room for a
            # new round and wait for one that never starts.
            self._admitters.discard(asyncio.current_task())

    async def _admit_shard(self, calls: list[tuple[AdmitRequest, asyncio.Future[Decision]]]) -> None:
        try:
            for attempt in range(1, ADMIT_ATTEMPTS + 1):
                requests = [request for request, _ in calls]
                async with self._call():
                    # Read at the last moment: the calls this process finished until then count.
                    keys, args = admit_call(requests, guarded=attempt < ADMIT_ATTEMPTS)
                    replies = await self._run("admit", keys, args)
                decisions = decisions_from_replies(requests, replies, self._errors)
                self._settle_admissions(calls, decisions)
                calls = [call for call, decision in zip(calls, decisions, strict=True) if decision is STALE]
                if not calls:
                    return
        except StorageError as error:
            for _, future in calls:
                if not future.done():
                    # Each caller raises its own exception: one object raised in many tasks would gather
                    # all their tracebacks.
                    future.set_exception(StorageError(str(error), refused=error.refused))
            return
        except BaseException as error:
            for _, future in calls:
                if not future.done():
                    future.set_exception(error) if isinstance(error, Exception) else future.cancel()
            raise

    @staticmethod
    def _settle_admissions(
        calls: list[tuple[AdmitRequest, asyncio.Future[Decision]]],
        decisions: list[Decision | StorageError | _Stale],
    ) -> None:
        """Answer the waiting calls (a ``STALE`` one waits for the next attempt)."""
        for (_, future), decision in zip(calls, decisions, strict=True):
            if not future.done():
                if isinstance(decision, StorageError):
                    future.set_exception(decision)
                elif isinstance(decision, Decision):
                    future.set_result(decision)

    async def flush(self, batch: Batch) -> bool:
        keys, args = flush_call(batch)
        async with self._call():
            reply = await self._run("flush", keys, args)
        return flush_result(batch, reply, self._errors)

    async def release(self, admissions: Sequence[AdmitRequest]) -> int:
        async with self._call():
            replies = [await self._run("refund", keys, args) for keys, args in release_calls(admissions)]
        return sum(int(reply) for reply in replies)

    async def aclose(self) -> None:
        """Close the connections (the storage reconnects if used again)."""
        client, sentinel, self._client, self._sentinel = self._client, self._sentinel, None, None
        with self._errors:
            if client is not None:
                await client.aclose()
            for node in sentinel.sentinels if sentinel is not None else ():
                await node.aclose()

"""Every Redis key name meterware uses, built in one place.

All keys of one customer share the hash tag of the customer's shard, ``{mw:sN}`` with
``N = crc32(customer) % shards``: the customer's counters, balance and reservations, and the shard's
event stream and rollups. So each atomic script touches a single hash slot, and the same code runs on a
single node, under Sentinel and on Redis Cluster. The only keys outside a shard are the key-hash index
and the key-id index, read with single-key commands, and the rollup workers' membership (one key, used
by one script).
"""

from __future__ import annotations

import re
import zlib
from typing import Final

# \Z, not $: "$" also matches before a trailing newline. An id with spaces or newlines would also split
# into other words in a reservation record (common.lua), whose orphan refund would go to another customer.
CUSTOMER_ID_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,128}\Z")
#: A quota hash outlives its period by this much, so late settlements still find it.
QUOTA_GRACE_SECONDS: Final = 35 * 86_400
#: The field of a quota hash summing what the period's flushes charged (micro-credits, postpaid too):
#: the spend cap's count. ``@`` keeps it apart from the meters' ``<meter>:u`` / ``<meter>:h`` fields.
SPENT_FIELD: Final = "@spent"


def check_customer_id(customer_id: str) -> str:
    """``customer_id`` if it is one, else raise ``ValueError`` saying what an id is."""
    if not CUSTOMER_ID_RE.match(customer_id):
        shown = f"{customer_id!r:.150}"  # a one-line error, whatever its size
        raise ValueError(f"customer id {shown} must be 1-128 letters, digits, '_', '.', '@' or '-'")
    return customer_id


def shard_of(customer: str, shards: int) -> int:
    """The shard that holds every key of ``customer``."""
    return zlib.crc32(customer.encode()) % shards


def tag(shard: int) -> str:
    return f"mw:{{s{shard}}}"


def _mode(live: bool) -> str:
    return "live" if live else "test"


# Outside any shard: resolved once per key and cached by the request path.
def key_by_hash(key_hash: str) -> str:
    return f"mw:key:{key_hash}"


def key_owner(key_id: str) -> str:
    return f"mw:keyid:{key_id}"


def stored_plans() -> str:
    """The plans stored in the backend: a hash of plan name -> its record (versions, as JSON)."""
    return "mw:plans"


def rollup_workers() -> str:
    """The live rollup workers: a zset of owner -> when its heartbeat expires (epoch ms)."""
    return "mw:rollup:workers"


# Per customer, inside the shard.
def customer(shard: int, customer_id: str) -> str:
    return f"{tag(shard)}:c:{customer_id}"


def customer_keys(shard: int, customer_id: str) -> str:
    return f"{tag(shard)}:ck:{customer_id}"


def key_record(shard: int, key_id: str) -> str:
    return f"{tag(shard)}:k:{key_id}"


def rate(shard: int, live: bool, customer_id: str, seconds: int, scope: str = "") -> str:
    """A rate limit's TAT: the customer's, or one of its routes' or keys' (``scope``: ``r<crc32>``,
    ``k<key id>``; from the config and the key records, never from a request)."""
    if scope:
        return f"{tag(shard)}:rl:{_mode(live)}:{customer_id}:{seconds}:{scope}"
    return f"{tag(shard)}:rl:{_mode(live)}:{customer_id}:{seconds}"


def quota(shard: int, live: bool, customer_id: str, period_start: int) -> str:
    return f"{tag(shard)}:q:{_mode(live)}:{customer_id}:{period_start}"


def invoice(shard: int, customer_id: str, period_start: int) -> str:
    """The frozen invoice of a closed billing period (a JSON string, set once)."""
    return f"{tag(shard)}:inv:{customer_id}:{period_start}"


def billed(shard: int, customer_id: str) -> str:
    """What the closed invoices billed per closed period (a hash: ``v`` version, ``<start>`` JSON)."""
    return f"{tag(shard)}:billed:{customer_id}"


def usage(shard: int, live: bool, customer_id: str, window: str, start: int) -> str:
    return f"{tag(shard)}:u:{_mode(live)}:{customer_id}:{window}:{start}"


def portal_marker(shard: int, customer_id: str, token_id: str) -> str:
    return f"{tag(shard)}:pm:{customer_id}:{token_id}"


def alert_rules(shard: int, customer_id: str) -> str:
    return f"{tag(shard)}:ar:{customer_id}"


def alert_destinations(shard: int, customer_id: str) -> str:
    """Where the customer wants its alerts to go (JSON: email, webhook_url)."""
    return f"{tag(shard)}:an:{customer_id}"


def alert_fired(shard: int, customer_id: str, name: str) -> str:
    """Marker of an alert that fired (``name`` holds the period, the rule and the threshold)."""
    return f"{tag(shard)}:af:{customer_id}:{name}"


def unique_values(shard: int, live: bool, customer_id: str, window: str, start: int, meter: str) -> str:
    return f"{usage(shard, live, customer_id, window, start)}:{meter}"


def external_ids(shard: int, customer_id: str) -> str:
    """The customer's ids at billing providers: a hash of provider -> id."""
    return f"{tag(shard)}:xid:{customer_id}"


def export_marks(shard: int, provider: str, customer_id: str, window: str, start: int) -> str:
    """What was exported of one (live) window to ``provider``: a hash of meter -> mark."""
    return f"{tag(shard)}:x:{provider}:{customer_id}:{window}:{start}"


def export_cursor(shard: int, provider: str, customer_id: str, window: str) -> str:
    """The end of the last window exported to ``provider`` (epoch seconds)."""
    return f"{tag(shard)}:xc:{provider}:{customer_id}:{window}"


def ledger(shard: int, customer_id: str) -> str:
    """The customer's credits ledger: a stream, one entry per movement of the balance."""
    return f"{tag(shard)}:ledger:{customer_id}"


def correction(shard: int, event_id: str) -> str:
    """The state of a corrected event (voided, or its amended units): kept for good."""
    return f"{tag(shard)}:fix:{event_id}"


# Per shard.
def grant_expiries(shard: int) -> str:
    """Grants that expire: a zset of ``<customer> <grant id>`` scored by the expiry (ms)."""
    return f"{tag(shard)}:grantexp"


def imported(shard: int) -> str:
    """Backfilled events: a hash of event id -> the stream entry that holds it."""
    return f"{tag(shard)}:imported"


def customers(shard: int) -> str:
    return f"{tag(shard)}:customers"


def reservations(shard: int) -> str:
    return f"{tag(shard)}:r"


def reservation_deadlines(shard: int) -> str:
    return f"{tag(shard)}:rd"


def events(shard: int) -> str:
    return f"{tag(shard)}:events"


def alerts(shard: int) -> str:
    return f"{tag(shard)}:alerts"


def dead_letters(shard: int) -> str:
    return f"{tag(shard)}:dead"


def flushed_batch(shard: int, batch_id: str) -> str:
    return f"{tag(shard)}:b:{batch_id}"


def batch_writer(shard: int, writer: str) -> str:
    """The highest generation written of the batches a process made (``Batch.writer``)."""
    return f"{tag(shard)}:w:{writer}"


def shard_claim(shard: int) -> str:
    """Which rollup worker claims the shard. The key keeps its older name ("lease"), so workers of the
    previous release and this one fence each other during a rolling upgrade."""
    return f"{tag(shard)}:lease"


def fence(shard: int) -> str:
    return f"{tag(shard)}:fence"


def offset(shard: int) -> str:
    return f"{tag(shard)}:offset"

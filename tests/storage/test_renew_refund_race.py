"""The worker's refund of expired reservations against a renewal landing between its two steps (Redis).

``RedisStorage.expire_reservations`` lists the reservations past their deadline (``due_reservations.lua``)
and refunds them in a second script call (``refund.lua``), which checks only that each still exists. Since
deadlines can move forward (``renew_reservations.lua``), a renewal landing between the two calls is
ignored: the running call's reservation would be refunded although its deadline is in the future; so the
worker's refund re-checks each deadline. MemoryStorage does both steps under one lock.
"""

from __future__ import annotations

import time

import pytest

from meterware.storage import _keyspace as ks
from meterware.storage._keyspace import shard_of
from meterware.storage.redis import RedisStorage
from meterware.storage.redis._rollup import refund_call
from tests.storage.conftest import Backend
from tests.storage.test_contract import admit_request, make_plan, open_account

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
def test_a_reservation_renewed_after_it_was_listed_due_is_not_refunded(backend: Backend) -> None:
    storage = backend.sync
    assert isinstance(storage, RedisStorage)
    open_account(storage, credits=1000)
    plan = make_plan(quota=5, price=100, prepaid=True)
    running = admit_request(storage, plan, timeout_ms=100)
    assert storage.admit(running).allowed
    time.sleep(0.15)  # past its deadline: its process was slow to renew (a short outage)
    shard = shard_of("acme", storage.shards)
    # The worker's expire_reservations, step by step, with the app's renewal landing in between.
    listed = [ks.reservations(shard), ks.reservation_deadlines(shard)]
    with storage._call():
        due = storage._run("due_reservations", listed, [10])
    assert len(due) == 2
    assert storage.renew_reservations([running]) == 1  # the call runs on: its deadline is 100 ms ahead
    keys, args = refund_call(shard, due)
    with storage._call():
        refunded = int(storage._run("refund", keys, args))
    assert (refunded, storage.get_balance("acme").reserved) == (0, 100)
    time.sleep(0.15)  # its renewed deadline passes (its process died after all): refunded once
    assert storage.expire_reservations(shard, 10) == 1
    assert storage.get_balance("acme").reserved == 0

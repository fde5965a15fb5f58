"""What a seller attaches to a key through ``Accounts`` and the CLI: a name, metadata and an expiry."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import UsageError
from meterware.keys import NewKey, hash_key
from meterware.metering.records import KeyRecord
from meterware.storage import open_storage
from tests.storage.conftest import BACKENDS


@pytest.fixture
def accounts(storage_url: str) -> Iterator[Accounts]:
    """Accounts over memory and a real Redis, with one customer, ``acme``."""
    config = Config.from_dict({"storage": storage_url, "plans": {"free": {}}, "default_plan": "free"})
    accounts = Accounts(open_storage(config.storage, shards=config.shards), config)
    accounts.create_customer("acme")
    yield accounts
    accounts.close()


def test_a_key_is_created_with_a_name_metadata_and_an_expiry(accounts: Accounts) -> None:
    """create_key keeps the name, the metadata and the expiry (in ms), listed and shown by id."""
    expires_at = time.time() + 3600
    new = accounts.create_key("acme", name="Production", metadata={"team": "data"}, expires_at=expires_at)
    record = accounts.key(new.key_id)
    assert (record.name, record.metadata, record.expires_ms) == (
        "Production",
        {"team": "data"},
        int(expires_at * 1000),
    )
    assert accounts.list_keys("acme") == [record]
    plain = accounts.key(accounts.create_key("acme").key_id)
    assert (plain.name, plain.metadata, plain.expires_ms) == ("", {}, 0)


def test_rotation_keeps_the_name_and_metadata(accounts: Accounts) -> None:
    """The replacement of a rotated key carries its name and metadata."""
    old = accounts.create_key("acme", name="CI", metadata={"owner": "ops"})
    new = accounts.rotate_key(old.key_id, grace_seconds=60)
    record = accounts.key(new.key_id)
    assert (record.name, record.metadata) == ("CI", {"owner": "ops"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"name": "n" * 101}, "name must be printable text of at most 100", id="long-name"),
        pytest.param({"name": "two\nlines"}, "name must be printable", id="name-newline"),
        pytest.param(
            {"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16 entries", id="too-many-entries"
        ),
        pytest.param({"metadata": {"k" * 41: "v"}}, "1-40 characters", id="long-metadata-name"),
        pytest.param({"metadata": {"": "v"}}, "1-40 characters", id="empty-metadata-name"),
        pytest.param({"metadata": {"k": "v" * 201}}, "at most 200", id="long-metadata-value"),
        pytest.param({"metadata": {"k": {"nested": "no"}}}, "printable string", id="nested-metadata"),
        pytest.param({"metadata": {"k": 1}}, "printable string", id="number-metadata"),
        pytest.param({"metadata": ["k", "v"]}, "dict of at most 16", id="not-a-dict"),
        pytest.param({"expires_at": time.time() - 1}, "in the future", id="expired-already"),
        pytest.param({"expires_at": "tomorrow"}, "epoch seconds", id="expiry-not-a-number"),
    ],
)
def test_bad_key_terms_are_refused(accounts: Accounts, options: dict[str, Any], message: str) -> None:
    """Names, metadata and expiries out of bounds raise UsageError, and no key is created."""
    with pytest.raises(UsageError, match=message):
        accounts.create_key("acme", **options)
    assert accounts.list_keys("acme") == []


def test_bounds_are_inclusive(accounts: Accounts) -> None:
    """A 100-character name and 16 entries of 40-character names and 200-character values are kept."""
    metadata = {f"{i:02d}" + "k" * 38: "v" * 200 for i in range(16)}
    new = accounts.create_key("acme", name="n" * 100, metadata=metadata)
    assert accounts.key(new.key_id).metadata == metadata


def test_a_key_is_created_with_remaining_uses(accounts: Accounts) -> None:
    """create_key(remaining=N) keeps the count; None (the default) is no count at all."""
    counted = accounts.create_key("acme", remaining=50)
    assert accounts.key(counted.key_id).remaining == 50
    assert accounts.key(accounts.create_key("acme").key_id).remaining is None


@pytest.mark.parametrize(
    "remaining",
    [
        pytest.param(-1, id="negative"),
        pytest.param(1.5, id="fraction"),
        pytest.param(True, id="bool"),
        pytest.param(10**12 + 1, id="too-many"),
    ],
)
def test_bad_remaining_uses_are_refused(accounts: Accounts, remaining: Any) -> None:
    """Remaining uses are a whole number from 0 to 10^12."""
    with pytest.raises(UsageError, match="remaining must be a whole number of uses"):
        accounts.create_key("acme", remaining=remaining)
    assert accounts.list_keys("acme") == []


def test_rotation_hands_the_uses_left_to_the_replacement(accounts: Accounts) -> None:
    """A key counting its uses is rotated without grace: it stops, and its replacement has its uses left;
    a grace period is refused (both keys would spend them)."""
    old = accounts.create_key("acme", remaining=5)
    with pytest.raises(UsageError, match="rotated without a grace period"):
        accounts.rotate_key(old.key_id, grace_seconds=60)
    new = accounts.rotate_key(old.key_id)
    assert accounts.key(new.key_id).remaining == 5
    assert 0 < accounts.key(old.key_id).expires_ms <= time.time() * 1000


def test_a_rotated_key_cannot_be_rotated_again(accounts: Accounts) -> None:
    """Rotating the stopped key a second time would hand the same uses over twice: refused."""
    old = accounts.create_key("acme", remaining=5)
    accounts.rotate_key(old.key_id)
    with pytest.raises(UsageError, match="has expired and cannot be rotated"):
        accounts.rotate_key(old.key_id)
    live = [
        key for key in accounts.list_keys("acme") if not key.expires_ms or key.expires_ms > time.time() * 1000
    ]
    assert sum(key.remaining or 0 for key in live) == 5


@pytest.mark.parametrize("remaining", [None, 5], ids=["no-uses", "uses"])
def test_rotation_keeps_the_expiry(accounts: Accounts, remaining: int | None) -> None:
    """A trial key's replacement expires when the trial does, not never."""
    expires_at = int(time.time()) + 30 * 86_400
    old = accounts.create_key("acme", remaining=remaining, expires_at=expires_at)
    new = accounts.rotate_key(old.key_id)
    assert accounts.key(new.key_id).expires_ms == expires_at * 1000


def test_a_key_is_created_with_scopes(accounts: Accounts) -> None:
    """Scopes are kept in the order given, without repeats, and carried to a rotated key's replacement."""
    new = accounts.create_key("acme", scopes=["files:read", "files:write", "files:read"])
    assert accounts.key(new.key_id).scopes == ("files:read", "files:write")
    rotated = accounts.rotate_key(new.key_id)
    assert accounts.key(rotated.key_id).scopes == ("files:read", "files:write")


@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        pytest.param("files:read", "a list of names, not one string", id="one-string"),
        pytest.param(["has space"], "1-64 characters", id="space"),
        pytest.param([""], "1-64 characters", id="empty"),
        pytest.param(["s" * 65], "1-64 characters", id="long"),
        pytest.param([7], "1-64 characters", id="not-a-string"),
        pytest.param([f"s{i}" for i in range(33)], "at most 32 scopes", id="too-many"),
    ],
)
def test_bad_scopes_are_refused(accounts: Accounts, scopes: Any, message: str) -> None:
    """Scopes out of bounds raise UsageError, and no key is created."""
    with pytest.raises(UsageError, match=message):
        accounts.create_key("acme", scopes=scopes)
    assert accounts.list_keys("acme") == []


def test_a_key_is_created_with_a_custom_prefix_and_rotated_with_it(accounts: Accounts) -> None:
    """create_key(prefix=) makes <prefix>_...; the replacement of a rotated key keeps the prefix."""
    new = accounts.create_key("acme", prefix="acme_live")
    assert new.plaintext.startswith("acme_live_")
    assert accounts.key(new.key_id).prefix == new.plaintext[:14]
    rotated = accounts.rotate_key(new.key_id)
    assert rotated.plaintext.startswith("acme_live_")
    with pytest.raises(UsageError, match="meterware's own"):
        accounts.create_key("acme", prefix="mw_acme")
    assert len(accounts.list_keys("acme")) == 2


def test_a_key_is_imported_by_its_hash(accounts: Accounts) -> None:
    """import_key keeps a key of another system by its SHA-256 (in either case), with its terms; it
    resolves to its customer; the same hash twice, or a hash that is not one, is refused."""
    plaintext = "sk_live_" + "Legacy0123456789" * 2
    key_hash = hash_key(plaintext)
    record = accounts.import_key(
        "acme", key_hash=key_hash.upper(), start="sk_live_Lega", name="from Stripe", remaining=10,
        scopes=["read"],
    )  # fmt: skip
    assert accounts.key(record.key_id) == record
    assert (record.prefix, record.name, record.remaining, record.scopes) == (
        "sk_live_Lega",
        "from Stripe",
        10,
        ("read",),
    )
    resolved = accounts.storage.resolve_key(key_hash)
    assert resolved is not None
    assert (resolved.key_id, resolved.customer.id, resolved.counts_uses) == (record.key_id, "acme", True)
    with pytest.raises(UsageError, match="exists already"):
        accounts.import_key("acme", key_hash=key_hash)
    with pytest.raises(UsageError, match="64 hexadecimal digits"):
        accounts.import_key("acme", key_hash="abc")
    with pytest.raises(UsageError, match="start must be printable"):
        accounts.import_key("acme", key_hash=hash_key("other" * 4), start="x" * 21)
    assert accounts.list_keys("acme") == [record]


@pytest.fixture(params=BACKENDS)
def any_accounts(request: pytest.FixtureRequest) -> Iterator[Accounts]:
    """Accounts over memory, a real redis-server and a real 3-node Redis Cluster, with ``acme``."""
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
    else:
        url = str(request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url"))
    config = Config.from_dict({"storage": url, "plans": {"free": {}}, "default_plan": "free"})
    accounts = Accounts(open_storage(config.storage, shards=config.shards), config)
    accounts.create_customer("acme")
    yield accounts
    accounts.close()


def at_once(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(0..count-1)`` in as many threads, released together: what each returned or raised."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(number: int) -> None:
        barrier.wait()
        try:
            results[number] = work(number)
        except Exception as error:
            results[number] = error

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_imports_of_one_hash_make_one_key(any_accounts: Accounts) -> None:
    """8 imports of the same key hash at once (10 rounds, for two customers): one succeeds, the others are
    refused as "exists already"; the hash resolves to the one kept and no other key is listed."""
    any_accounts.create_customer("other")
    for round_number in range(10):
        key_hash = hash_key(f"sk_live_concurrent_import_{round_number:04d}")

        def one(number: int, key_hash: str = key_hash) -> KeyRecord:
            return any_accounts.import_key("acme" if number % 2 else "other", key_hash=key_hash)

        results = at_once(8, one)
        kept = [result for result in results if isinstance(result, KeyRecord)]
        assert len(kept) == 1, results
        assert all(isinstance(r, UsageError) and "exists already" in str(r) for r in results if r not in kept)
        resolved = any_accounts.storage.resolve_key(key_hash)
        assert resolved is not None
        assert (resolved.key_id, resolved.customer.id) == (kept[0].key_id, kept[0].customer)
    listed = any_accounts.list_keys("acme") + any_accounts.list_keys("other")
    assert len(listed) == 10


def test_concurrent_rotations_hand_the_uses_over_once(any_accounts: Accounts) -> None:
    """8 rotations of one key with 5 uses at once: one replacement is made, with the 5 uses; the old key
    keeps none; the uses across every key never pass 5."""
    old = any_accounts.create_key("acme", remaining=5)
    results = at_once(8, lambda n: any_accounts.rotate_key(old.key_id))
    made = [result for result in results if isinstance(result, NewKey)]
    assert len(made) == 1, results
    assert all(isinstance(r, UsageError) for r in results if r not in made)
    keys = any_accounts.list_keys("acme")
    assert sum(key.remaining or 0 for key in keys) == 5
    assert any_accounts.key(made[0].key_id).remaining == 5
    assert any_accounts.key(old.key_id).remaining == 0

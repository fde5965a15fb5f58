"""The bounded cache the request path remembers keys with."""

from __future__ import annotations

import threading

import pytest

from meterware.metering.cache import LRUCache


def test_holds_at_most_max_size_entries_forgetting_the_least_recently_used() -> None:
    """Past its size the cache forgets the entry used longest ago; reading an entry makes it recent."""
    cache: LRUCache[str, int] = LRUCache(3)
    for number, name in enumerate("abc"):
        cache.put(name, number)
    assert cache.get("a") == 0  # "a" is now the most recent: "b" goes first
    cache.put("d", 3)
    assert len(cache) == 3
    assert "b" not in cache
    assert [cache.get(name) for name in "acd"] == [0, 2, 3]
    cache.put("e", 4)
    assert "a" not in cache


def test_put_replaces_a_value_and_makes_it_recent() -> None:
    """Putting a known key replaces its value without growing the cache, and saves it from eviction."""
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (10, None, 3, 2)


def test_pop_forgets_an_entry() -> None:
    """``pop`` returns the value it forgot, None when there was none."""
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    assert (cache.pop("a"), cache.pop("a"), len(cache)) == (1, None, 0)


def test_a_flood_of_new_keys_never_grows_it_past_its_size() -> None:
    """100,000 distinct keys through a cache of 1,000 leave 1,000 entries: the latest."""
    cache: LRUCache[int, int] = LRUCache(1_000)
    for number in range(100_000):
        cache.put(number, number)
    assert len(cache) == 1_000
    assert cache.get(99_000) == 99_000
    assert cache.get(98_999) is None


def test_threads_sharing_it_never_raise_and_keep_it_bounded() -> None:
    """Four threads reading, writing and removing the same keys: no error, and the bound holds."""
    cache: LRUCache[int, int] = LRUCache(50)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for number in range(20_000):
                key = (number + offset) % 80
                cache.put(key, number)
                cache.get((key + 1) % 80)
                if number % 7 == 0:
                    cache.pop((key + 2) % 80)
        except BaseException as error:  # pragma: no cover - the assertion says what happened
            errors.append(error)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(cache) <= 50


def test_refuses_a_size_below_one() -> None:
    """A cache that can hold nothing is a configuration mistake, said at once."""
    with pytest.raises(ValueError, match="max_size must be at least 1, got 0"):
        LRUCache(0)

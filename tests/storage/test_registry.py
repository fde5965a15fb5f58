"""Backends are found by URL scheme: each class declares its schemes once, and drivers load on demand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meterware.storage import check_url, open_storage
from meterware.storage._registry import backend_for
from meterware.storage.memory import MemoryStorage
from meterware.storage.redis import RedisStorage


@pytest.mark.parametrize("scheme", RedisStorage.SCHEMES + MemoryStorage.SCHEMES)
def test_each_scheme_opens_the_class_that_declares_it(scheme: str) -> None:
    """The table of schemes is filled from the classes' SCHEMES, in any case of the scheme."""
    expected = MemoryStorage if scheme in MemoryStorage.SCHEMES else RedisStorage
    assert backend_for(f"{scheme.upper()}://somewhere") is expected


@pytest.mark.parametrize("url", ["http://localhost", "mongodb://x", "no-scheme-at-all"])
def test_an_unknown_scheme_names_the_known_ones(url: str) -> None:
    """check_url refuses a scheme no backend declares, listing every declared scheme."""
    with pytest.raises(ValueError, match="storage URL: unknown scheme") as caught:
        check_url(url)
    assert "(memory, redis, rediss, unix, redis+sentinel, redis+cluster)" in str(caught.value)


def test_memory_urls_never_import_the_redis_driver() -> None:
    """Opening and checking memory:// leaves redis-py unimported (it loads with the first Redis URL)."""
    code = (
        "import sys\n"
        "from meterware.storage import check_url, open_storage\n"
        "check_url('memory://')\n"
        "open_storage('memory://', shards=2).list_customers()\n"
        "assert 'redis' not in sys.modules, 'memory:// imported redis'\n"
        "check_url('redis://localhost:6379/0')\n"
        "assert 'redis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_checked_url_opens() -> None:
    """A URL check_url accepts opens without I/O (the Redis client connects on its first call)."""
    url = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    check_url(url)
    assert isinstance(open_storage(url, shards=2, timeout=0.1), RedisStorage)

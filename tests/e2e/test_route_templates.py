"""End to end: a bare WSGI app (no router) under a real gunicorn, its routes named by ``routes.templates``.

Its events carry the template a path matched (``/v1/items/<id>``), or ``<unmatched>``, never the raw path.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from meterware import Accounts, Config
from meterware.events import decode_batch
from tests.servers import ServerProcess, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TEMPLATES = """
[routes]
templates = ["/v1/items/<int:item>", "/v1/items/<int:item>/parts/<part>", "/v1/files/<path:name>"]
"""


def test_a_bare_wsgi_apps_events_carry_the_declared_route_templates(
    e2e_env: dict[str, str], tmp_path: Path
) -> None:
    """Paths matching a template are recorded as the template; other paths as ``<unmatched>``."""
    config = Path(e2e_env["METERWARE_CONFIG"])
    config.write_text(config.read_text() + TEMPLATES)
    accounts = Accounts.open(Config.load(config, storage=e2e_env["METERWARE_STORAGE"]))
    accounts.create_customer("acme", plan="payg")
    accounts.grant_credits("acme", "100")
    key = accounts.create_key("acme").plaintext
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}"]
    server = ServerProcess([*args, "tests.e2e.wsgiref_app:app"], e2e_env, port, tmp_path / "gunicorn.log")
    paths = ["/v1/items/1", "/v1/items/22", "/v1/items/3/parts/x", "/v1/files/a/b.txt", "/v1/items/x", "/v1"]
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, timeout=20, headers=headers) as client:
            statuses = [client.get(path).status_code for path in paths]
    finally:
        output = server.stop()  # SIGTERM: the worker drains its buffer on its way out
    assert statuses == [200] * len(paths), output

    entries = [
        entry
        for shard in range(accounts.config.shards)
        for entry in accounts.storage.read_stream(shard, "0-0", 100)
    ]
    routes = Counter(event.route for entry in entries for event in decode_batch(entry.fields[b"b"]))
    assert routes == {
        "/v1/items/<int:item>": 2,
        "/v1/items/<int:item>/parts/<part>": 1,
        "/v1/files/<path:name>": 1,
        "<unmatched>": 2,
    }, output
    accounts.close()

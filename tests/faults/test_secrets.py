"""No key, key hash or Redis password ever leaves meterware: a full run, then a grep of everything it made.

Redis requires a password. The run has traffic with live and test keys, refusals of every kind (unknown,
near-miss, revoked, expired keys), failing handlers and hostile units, a Redis outage (spooled batches,
connection errors logged), a dead letter, the worker with its metrics endpoint, the CLI (listings, an
unreachable backend, a configuration mistake in the URL). Then every log, response (headers and bodies),
metrics page, stream entry, dead letter, spool file and CLI output is searched for each plaintext key,
each key's hash, and the password.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from meterware.storage import _keyspace
from tests.faults.books import spool_bytes
from tests.faults.harness import CUSTOMER, SHARDS, Load, figures, wait_until
from tests.faults.scenario import Scenario
from tests.helpers import paths_cycling
from tests.servers import free_port

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


TRAFFIC = paths_cycling(
    [
        "/v1/ok/{}", "/v1/fail/{}", "/v1/boom/{}", "/v1/tokens/{}?n=2", "/v1/units/{}?kind=nan",
        "/v1/stream/{}?n=3&delay=0.001", "/v1/ok/{}",
    ]
)  # fmt: skip


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meterware", *args], env=env, capture_output=True, text=True, timeout=60
    )
    return done.stdout + done.stderr  # what meterware wrote (not the command line, which holds secrets)


def test_no_key_hash_or_password_appears_in_anything_produced(
    tmp_path: Path, make_scenario: Callable[..., Scenario]
) -> None:
    """A full run with faults; then the grep: no plaintext key, no key hash, no Redis password anywhere."""
    password = "pw-" + secrets.token_hex(16)
    scenario = make_scenario(persistent=True, password=password)
    server, spool, env, accounts = scenario.server, scenario.spool, scenario.env, scenario.accounts
    live = scenario.new_key
    test_key = accounts.create_key(CUSTOMER, live=False)
    revoked = accounts.create_key(CUSTOMER)
    accounts.revoke_key(revoked.key_id)
    rotated = accounts.create_key(CUSTOMER)
    replacement = accounts.rotate_key(rotated.key_id, grace_seconds=0)
    keys = [live, test_key, revoked, rotated, replacement]
    produced: dict[str, str | bytes] = {}

    app = scenario.app()
    worker_port = free_port()
    worker = scenario.worker("--metrics-port", str(worker_port), "--log-level", "DEBUG")
    responses: list[str] = []

    def call(path: str, key: str) -> None:
        response = httpx.get(f"{app.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        responses.append(f"{response.status_code} {dict(response.headers)} {response.text}")

    near_miss = live.plaintext[:-1] + ("a" if live.plaintext[-1] != "a" else "b")
    for presented in [near_miss, revoked.plaintext, rotated.plaintext, live.plaintext + "x", "mw_live_short"]:
        call("/v1/ok/refused", presented)
    call("/v1/ok/test", test_key.plaintext)
    with Load(app.url, live.plaintext, TRAFFIC, threads=3) as load:
        time.sleep(1.0)
        server.kill()
        wait_until(lambda: spool_bytes(spool) > 0, 10, "nothing was spooled during the outage")
        # Not the batch being written: its temporary file may be renamed while the copy lists the directory.
        shutil.copytree(spool, tmp_path / "spool-copy", ignore=shutil.ignore_patterns("*.tmp*"))
        server.start()
        time.sleep(1.0)
    server.client().xadd(_keyspace.events(0), {"b": b"\xc1 junk", "c": b"0"})
    wait_until(lambda: spool_bytes(spool) == 0, 15, "the spool was never replayed")
    produced["app metrics"] = app.metrics_text()
    app.stop()
    wait_until(lambda: server.client().xlen(_keyspace.dead_letters(0)) == 1, 15, "no dead letter")
    produced["worker metrics"] = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
    assert worker.terminate() == 0
    scenario.rollup_once()

    unreachable = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    typo = tmp_path / "typo.toml"
    typo.write_text(f'storage = "redis//:{password}@127.0.0.1:{server.port}/0"\n')
    produced["cli"] = "\n".join(
        [
            cli(env, "keys", "list", "acme", "--json"),
            cli(env, "keys", "list", "acme"),
            cli(env, "credits", "show", "acme"),
            cli(env, "usage", "acme", "--json"),
            cli(env, "customers", "show", "acme"),
            cli({**env, "METERWARE_STORAGE": unreachable}, "credits", "show", "acme"),
            cli(env, "--storage", f"redis://:{password}@127.0.0.1:{free_port()}/0", "keys", "list", "acme"),
            cli(env, "config", "check", str(typo)),
            cli({**env, "METERWARE_CONFIG": str(typo)}, "credits", "show", "acme"),
        ]
    )
    assert "Traceback" not in str(produced["cli"]), produced["cli"]

    client = server.client()
    for shard in range(SHARDS):
        produced[f"stream {shard}"] = repr(client.xrange(_keyspace.events(shard)))
        produced[f"dead letters {shard}"] = repr(client.xrange(_keyspace.dead_letters(shard)))
    produced["responses"] = "\n".join(responses) + "\n".join(
        f"{r.status} {dict(r.headers)} {r.body!r}" for r in load.snapshot()
    )
    produced["app logs"] = app.logs()
    produced["worker log"] = worker.output()
    produced["rollup log"] = scenario.rollup_log.read_text()
    produced["redis log"] = server.log()
    for path in sorted((tmp_path / "spool-copy").iterdir()):
        produced[f"spool {path.name}"] = path.read_bytes()

    # What must never appear, as text and as bytes.
    forbidden = {"the Redis password": password}
    for new_key in keys:
        forbidden[f"key {new_key.key_id}"] = new_key.plaintext
        forbidden[f"hash of key {new_key.key_id}"] = new_key.hash
    forbidden["near-miss key"] = near_miss
    leaks = []
    for where, content in produced.items():
        text = content if isinstance(content, str) else content.decode("latin-1")
        leaks += [f"{what} in {where}" for what, secret in forbidden.items() if secret in text]
    assert not leaks, leaks
    # The run did what it says (so the grep had something to search).
    assert "flush failed" in str(produced["app logs"])
    assert "is a dead letter" in str(produced["worker log"])
    assert any(path.startswith("spool ") for path in produced)
    assert "revoked_key" in str(produced["responses"])
    assert "expired_key" in str(produced["responses"])
    figures(
        "secrets",
        sources=len(produced),
        bytes_searched=sum(len(content) for content in produced.values()),
        secrets_searched=len(forbidden),
        requests=len(load.snapshot()) + len(responses),
        leaks=len(leaks),
    )

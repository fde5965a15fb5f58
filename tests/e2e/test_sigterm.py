"""SIGTERM right after the last response, under every server the README names: no buffered event is lost.

Python's default SIGTERM action kills the process without running exit hooks, so the development servers
(``flask run``, ``app.run()``, ``manage.py runserver``, a plain ``wsgiref`` server), which install no
handler of their own, lost the events still buffered. The flush interval is a minute here: every event is
still in the buffer when the signal comes. The production servers (uvicorn, gunicorn) install their own
handlers and drain through the lifespan or the exit hooks: they must still stop cleanly and lose nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from meterware import Accounts
from meterware.events import UsageEvent, decode_batch
from tests.e2e.test_servers import _gunicorn
from tests.helpers import accounts_of, new_customer
from tests.servers import free_port, wait_for_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

E2E = Path(__file__).parent
PYTHON = sys.executable
MANAGE = str(E2E / "django_site" / "manage.py")

TOKENS = "/v1/tokens/2"
FLASK = [PYTHON, "-m", "flask", "--app", "tests.e2e.flask_app", "run"]
#: The command of each server ({port} is filled in) and the path its calls go to.
SERVERS = {
    "flask-run": ([*FLASK, "--port", "{port}"], TOKENS),
    "flask-run-reload": ([*FLASK, "--reload", "--port", "{port}"], TOKENS),
    "flask-app-run": ([PYTHON, str(E2E / "flask_app.py")], TOKENS),
    "wsgiref": ([PYTHON, str(E2E / "wsgiref_app.py")], "/v1/hello"),
    "django-runserver-noreload": ([PYTHON, MANAGE, "runserver", "--noreload", "127.0.0.1:{port}"], TOKENS),
    "django-runserver": ([PYTHON, MANAGE, "runserver", "127.0.0.1:{port}"], TOKENS),
    "uvicorn": ([PYTHON, "-m", "uvicorn", "tests.e2e.asgi_app:app", "--port", "{port}"], TOKENS),
    "gunicorn-flask": (
        [*_gunicorn("tests.e2e.flask_app:app", "--workers", "2"), "--bind", "127.0.0.1:{port}"],
        TOKENS,
    ),
}

CALLS = 12
#: How each server's process exits on SIGTERM: 143 (128 + SIGTERM) where meterware's handler turns the
#: signal into an exit through the exit hooks; the status the server gives itself where it has a handler.
EXIT_STATUS = {
    "flask-run": 143,
    "flask-run-reload": 0,  # werkzeug's reloader: sys.exit(0)
    "flask-app-run": 143,
    "wsgiref": 143,
    "django-runserver-noreload": 143,
    "django-runserver": 0,  # Django's reloader: sys.exit(0)
    "uvicorn": -signal.SIGTERM,  # uvicorn re-raises the signal after its shutdown
    "gunicorn-flask": 0,
}
#: werkzeug's reloader child finishes a call in the response's ``close()``, after its body went out, and
#: writes its event then: a SIGTERM within that moment (its parent SIGKILLs it) loses the last call.
PAUSE = {"flask-run-reload": 1.0}


@pytest.fixture
def env(e2e_env: dict[str, str]) -> dict[str, str]:
    """The e2e deployment, flushing once a minute: every event is buffered when the signal comes."""
    config = Path(e2e_env["METERWARE_CONFIG"])
    config.write_text(config.read_text().replace("flush_interval = 0.05", "flush_interval = 60.0"))
    return {**e2e_env, "DJANGO_SETTINGS_MODULE": "tests.e2e.django_site.settings"}


@pytest.fixture
def accounts(env: dict[str, str]) -> Iterator[Accounts]:
    accounts = accounts_of(env)
    yield accounts
    accounts.close()


def serve(name: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server ``name`` in a session of its own (with its reloader's child); return it, its URL."""
    port = free_port()
    args = [arg.replace("{port}", str(port)) for arg in SERVERS[name][0]]
    with open(log, "wb") as output:  # a file: a pipe nobody reads would block the server once full
        process = subprocess.Popen(
            args,
            env={**env, "PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')}") from None
    return process, f"http://127.0.0.1:{port}"


def events(accounts: Accounts) -> list[UsageEvent]:
    shards = accounts.config.shards
    entries = [entry for shard in range(shards) for entry in accounts.storage.read_stream(shard, "0-0", 100)]
    return [event for entry in entries for event in decode_batch(entry.fields[b"b"])]


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_sigterm_right_after_the_last_response_loses_no_event(
    name: str, env: dict[str, str], accounts: Accounts, tmp_path: Path
) -> None:
    """Calls answered, then SIGTERM to the server's process at once: every call's event is in Redis."""
    key = new_customer(accounts, "acme", "100").plaintext
    log = tmp_path / f"{name}.log"
    process, url = serve(name, env, log)
    try:
        with httpx.Client(base_url=url, timeout=20, headers={"Authorization": f"Bearer {key}"}) as client:
            statuses = [client.get(SERVERS[name][1]).status_code for _ in range(CALLS)]
        time.sleep(PAUSE.get(name, 0.0))
        process.send_signal(signal.SIGTERM)  # the server's own process only, as `docker stop` does
        returncode = process.wait(timeout=30)
    finally:
        # A reloader's child left behind would hold the port (the group is the server's, started above).
        with_children_gone = time.monotonic() + 10
        while time.monotonic() < with_children_gone:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = log.read_text(errors="replace")
    assert statuses == [200] * CALLS, output
    assert len(events(accounts)) == CALLS, f"exit status {returncode}\n{output}"
    assert returncode == EXIT_STATUS[name], output
    assert "Traceback" not in output, output
    assert "meterware:" not in output, output  # nothing dropped or failed


@pytest.mark.parametrize("name", ["flask-app-run", "flask-run"])
def test_sigterm_waits_for_a_call_still_finishing_after_its_response(
    name: str, env: dict[str, str], accounts: Accounts, tmp_path: Path
) -> None:
    """The threaded servers finish a call in its own thread after the client has the response (the
    response's ``close()`` work here takes half a second): SIGTERM's exit waits for it, then drains."""
    key = new_customer(accounts, "acme", "100").plaintext
    log = tmp_path / f"{name}.log"
    process, url = serve(name, env, log)
    with httpx.Client(base_url=url, timeout=20, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/closing/7").status_code == 200
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(timeout=30)
    output = log.read_text(errors="replace")
    (event,) = events(accounts)
    assert (event.outcome, event.billable, event.units["tokens"]) == ("success", True, 7), output
    assert returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output, output


def test_sigterm_while_the_main_thread_serves_a_call_lets_it_finish(
    env: dict[str, str], accounts: Accounts, tmp_path: Path
) -> None:
    """wsgiref serves calls in its main thread: a SIGTERM in the middle of one exits once it is recorded."""
    key = new_customer(accounts, "acme", "100").plaintext
    log = tmp_path / "wsgiref.log"
    process, url = serve("wsgiref", env, log)
    with (
        httpx.Client(base_url=url, timeout=20, headers={"Authorization": f"Bearer {key}"}) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        slow = pool.submit(client.get, "/v1/slow")  # a second long
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert slow.result().status_code == 200
    returncode = process.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert returncode == 128 + signal.SIGTERM, output  # the status a shell shows for a SIGTERM death
    (event,) = events(accounts)
    assert (event.outcome, event.billable) == ("success", True)
    assert "Traceback" not in output, output

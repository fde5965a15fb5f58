"""``meterware demo``: the whole job in one command.

A FastAPI app metered by one line runs under a real uvicorn server on a loopback port; three customers on
three pricing models send a burst of real HTTP calls (successes, failures, token-metered chat calls, a
stream, calls over quota and beyond their credit); then the rollup runs and a summary shows usage,
balances and what was refused and why. On ``memory://`` (the default) everything runs in this process;
with ``--storage redis://...`` the rollup worker runs as a separate process, as in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEMO_CONFIG = """\
[storage]
url = "memory://"
shards = 4

[meters.calls]
aggregation = "count"
source = "call"

[meters.tokens]
aggregation = "sum"
source = "handler"

[plans.free]                      # free tier: a hard quota, no charge
rate_limits = ["20/second"]
[plans.free.meters.calls]
quota = 5

[plans.payg]                      # pay per call, and per token, from prepaid credits
prepaid = true
rate_limits = ["50/second", "1000/minute"]
[plans.payg.meters.calls]
price = "0.01"
[plans.payg.meters.tokens]
price = "0.00002"

[plans.pro]                       # subscription: included calls, then metered overage
rate_limits = ["100/second"]
[plans.pro.meters.calls]
included = 10
price = "0.005"
quota = 1000
quota_mode = "soft"

[routes]
exclude = ["/health", "/docs*", "/openapi.json"]
portal = "/portal"                # the customer portal and the operator view are never metered
admin = "/admin"
[routes.weights]
"/v1/chat" = 1

[portal]
secure_cookies = false            # the demo serves plain http on loopback

[pipeline]
flush_interval = 0.05
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_app(config_path: str) -> Any:
    """The demo API: a FastAPI app metered with one line."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    import meterware
    import meterware.portal
    from meterware import MeteringMiddleware

    app = FastAPI(title="meterware demo API")
    app.add_middleware(MeteringMiddleware, config=config_path)
    app.mount("/portal", meterware.portal.asgi_app(config_path))
    app.mount("/admin", meterware.portal.admin_asgi_app(config_path))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/v1/chat")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        prompt = str(body.get("prompt", ""))
        tokens = 10 * len(prompt.split())
        meterware.usage.add("tokens", tokens)  # charged only if the call succeeds
        return {"reply": prompt.upper(), "tokens": tokens}

    @app.get("/v1/flaky")
    async def flaky() -> dict[str, str]:
        raise HTTPException(status_code=503, detail="upstream model overloaded")

    @app.get("/v1/crash")
    async def crash() -> dict[str, str]:
        raise RuntimeError("a bug in the handler")

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for index in range(5):
                yield f"data: chunk {index}\n\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


class _Server:
    """uvicorn in a thread on a loopback port (``port`` 0: a free one)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        import uvicorn

        self.port = port or _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True  # lifespan shutdown drains the event buffer
        self.thread.join(15)


def _traffic(base: str, keys: dict[str, str]) -> Counter[tuple[str, int, str]]:
    """Send the demo's calls; count them by (customer, status, refusal reason)."""
    import httpx

    seen: Counter[tuple[str, int, str]] = Counter()

    def call(who: str, method: str, path: str, **kwargs: Any) -> None:
        headers = {"Authorization": f"Bearer {keys[who]}"} if who in keys else {}
        headers |= kwargs.pop("headers", {})
        response = client.request(method, path, headers=headers, **kwargs)
        if path == "/v1/stream" and response.status_code == 200:
            assert response.text.count("data:") == 5
        reason = ""
        if response.headers.get("content-type") == "application/problem+json":
            reason = response.json()["reason"]
        seen[(who, response.status_code, reason)] += 1

    # uvicorn closes a connection after an app exception (the /v1/crash call): no keep-alive.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=10, limits=no_reuse) as client:
        for _ in range(8):  # the free tier's quota is 5 calls
            call("hobbyist", "GET", "/v1/hello")
        for index in range(6):
            call("startup", "POST", "/v1/chat", json={"prompt": f"tell me a story number {index}"})
        call("startup", "GET", "/v1/flaky")
        call("startup", "GET", "/v1/crash")
        call("startup", "GET", "/v1/stream")
        for _ in range(20):  # 0.25 credits last a handful of calls
            call("startup", "GET", "/v1/hello")
        for _ in range(15):  # 10 included calls, then overage
            call("bigco", "GET", "/v1/hello")
        call("bigco", "GET", "/v1/stream")
        call("stranger", "GET", "/v1/hello")  # no key at all
        call("stranger", "GET", "/v1/hello", headers={"Authorization": "Bearer mw_live_not-a-real-key"})
        client.get("/health")  # excluded from metering
    return seen


class _Receiver:
    """A webhook endpoint on a loopback port, as a customer of meterware would run one: it checks
    each alert's signature with :func:`meterware.billing.alerts.verify_signature`."""

    def __init__(self, secret: str) -> None:
        from meterware.billing.alerts import SIGNATURE_HEADER, verify_signature

        self.received: list[tuple[bool, dict[str, Any]]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                signed = verify_signature(body, self.headers.get(SIGNATURE_HEADER), secret)
                received.append((signed, json.loads(body)))
                self.send_response(204 if signed else 400)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` alerts have arrived (they are sent by a background thread)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_ROW = "  {:<9} {:<5} {:>5} {:>6} {:>3} {:>3} {:>3} {:>7} {:>10} {:>10}"


def run_demo(*, storage: str | None = None, serve: bool = False, port: int = 0) -> int:
    """Run the demo end to end and print what happened; ``serve``: then keep the API, the rollup and the
    portal running (on ``port``, default a free one) until interrupted, and print a portal link for each
    customer."""
    from meterware.billing.accounts import Accounts
    from meterware.config import Config, format_credits

    workdir = Path(tempfile.mkdtemp(prefix="meterware-demo-"))
    config_path = workdir / "meterware.toml"
    # Alerts go to the alerts stream, the log and a webhook: a receiver on a loopback port, with a secret
    # passed the way meterware reads it (the environment; the worker process inherits it).
    os.environ["METERWARE_WEBHOOK_SECRET"] = secret = secrets.token_hex(16)
    # The portal signs its links and sessions with a secret from the environment, as in a deployment.
    os.environ.setdefault("METERWARE_PORTAL_SECRET", secrets.token_urlsafe(32))
    os.environ.setdefault("METERWARE_ADMIN_TOKEN", secrets.token_urlsafe(32))
    receiver = _Receiver(secret)
    alerts = '\n[alerts]\nquota_percent = [80, 100]\ncredits_below = ["0.1"]\n'
    alerts += f'webhook_url = "{receiver.url}"\n'
    config_path.write_text(DEMO_CONFIG + f'spool_dir = "{workdir / "spool"}"\n' + alerts)
    # The demo prints the alerts itself (the log line is for operators).
    logging.getLogger("meterware.billing.alerts").addHandler(logging.NullHandler())
    # The app below and the worker process read the storage URL from the environment, like a deployment.
    os.environ.pop("METERWARE_REDIS_URL", None)
    os.environ.pop("METERWARE_STORAGE", None)
    if storage:
        os.environ["METERWARE_STORAGE"] = storage
    config = Config.load(config_path)
    accounts = Accounts.open(config)
    print(f"meterware demo: storage {config.storage}, config {config_path}\n")

    keys: dict[str, str] = {}
    for customer, plan, credits in (
        ("hobbyist", "free", None),
        ("startup", "payg", "0.25"),
        ("bigco", "pro", None),
    ):
        accounts.create_customer(customer, plan=plan)
        keys[customer] = accounts.create_key(customer).plaintext
        if credits:
            accounts.grant_credits(customer, credits)
        print(f"  customer {customer:<9} plan {plan:<5} key {keys[customer][:12]}...")

    app = build_app(str(config_path))
    with _Server(app) as base:
        print(f"\n  serving the demo API at {base}; sending traffic...")
        seen = _traffic(base, keys)

    if not config.storage.startswith("memory://"):
        print("  running the rollup worker as a separate process: meterware rollup --once")
        subprocess.run(
            [sys.executable, "-m", "meterware", "rollup", "--once", "--config", str(config_path)],
            check=True,
        )

    print("\nWhat the clients saw")
    print(f"  {'customer':<9} {'status':>6} {'calls':>5}  refused because")
    for (who, status, reason), count in sorted(seen.items()):
        print(f"  {who:<9} {status:>6} {count:>5}  {reason}")
    print("\nUsage this period, from the rollup")
    columns = ("customer", "plan", "calls", "tokens", "ok", "4xx", "5xx", "refused", "charged", "balance")
    print(_ROW.format(*columns))
    for customer in keys:
        report = accounts.usage(customer)
        balance = accounts.balance(customer)
        plan = accounts.customer(customer).plan
        calls = report.calls
        print(
            _ROW.format(
                customer,
                plan,
                report.meters["calls"],
                report.meters["tokens"],
                calls["success"],
                calls["client_error"],
                calls["server_error"],
                calls["rejected"],
                format_credits(report.spend),
                format_credits(balance.balance) if plan == "payg" else "-",
            )
        )
    print(
        "\nRefused calls never reached the app; failed calls (the 503 and the crash, counted as 5xx) were\n"
        "refunded; bigco's first 10 calls were included in its plan, the rest billed as overage."
    )

    fired = accounts.alerts()
    receiver.wait(len(fired))
    print("\nAlerts fired by the rollup, each threshold once per billing period (meterware alerts list)")
    print(f"  {'type':<16} {'customer':<9} {'threshold':>9}  value")
    for alert in fired:
        threshold, value = alert.threshold, f"{alert.value} credits"
        if alert.type == "quota.threshold":
            threshold = f"{alert.threshold}%"
            value = f"{alert.value}% ({alert.used} of {alert.quota} {alert.meter})"
        print(f"  {alert.type:<16} {alert.customer:<9} {threshold:>9}  {value}")
    verified = sum(signed for signed, _ in receiver.received)
    print(
        f"  webhook: {len(receiver.received)} alerts POSTed to {receiver.url}, "
        f"{verified} signatures verified (Meterware-Signature, HMAC-SHA256)"
    )
    receiver.close()

    print("\nInvoice preview: bigco, running period (meterware invoice bigco)")
    for line in accounts.invoice("bigco").to_text().splitlines():
        print(f"  {line}")
    accounts.close()
    if serve:
        _serve(config, str(config_path), keys, port)
    return 0


def _serve(config: Any, config_path: str, keys: dict[str, str], port: int) -> None:
    """Keep the demo API with its portal, and the rollup, running until Ctrl-C or SIGTERM."""
    import signal

    from meterware.portal import sign_in_link

    def interrupt(signum: int, frame: object) -> None:
        # Raised where the main thread waits: a handler that set an Event the main thread waits on could
        # deadlock on the Event's own lock.
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    worker = None
    if not config.storage.startswith("memory://"):  # on memory:// the app rolls up in process
        command = [sys.executable, "-m", "meterware", "rollup", "--config", config_path]
        worker = subprocess.Popen(command)
    with _Server(build_app(config_path), port) as base:
        print(f"\nServing the demo API, its portal and the operator view at {base} (Ctrl-C stops)")
        for customer, key in keys.items():
            link = sign_in_link(customer, config=config, seconds=3600, base_url=f"{base}/portal")
            print(f"  {customer}: API key {key}\n    portal (the link works once, for an hour): {link}")
        print(f"  Operator view: {base}/admin/  (admin token: {os.environ['METERWARE_ADMIN_TOKEN']})")
        print(f"  Try: curl -H 'Authorization: Bearer {keys['bigco']}' {base}/v1/hello")
        sys.stdout.flush()
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            print("\nStopping.")
    if worker is not None:
        worker.terminate()
        worker.wait(15)

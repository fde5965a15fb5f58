"""A client that disconnects mid-stream: the call is recorded as aborted and charged for what it was served.

The streaming endpoints here never watch for the disconnect themselves (many hand-written streams do not):
the middleware must notice on its own, under uvicorn (ASGI) and gunicorn (WSGI).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest

from tests.faults.harness import CALL_PRICE, TOKEN_PRICE, figures, wait_until
from tests.faults.scenario import Scenario

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

CHUNKS = 40


def read_first_chunk_and_leave(port: int, path: str, key: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"chunk 0" not in received:
            data = sock.recv(4096)
            assert data, "the server closed before the first chunk"
            received += data
        assert received.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("refund", [False, True], ids=["default", "refund-policy"])
@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_client_leaving_mid_stream_is_aborted_and_pays_for_what_it_was_served(
    kind: str, refund: bool, make_scenario: Callable[..., Scenario]
) -> None:
    """Streams the client leaves after the first chunk are aborted events. By default each is charged for
    the call and the tokens its handler reported until it finished (under uvicorn the handler never sees
    the client leave and runs to its end: every token counts); with ``policy.refund_aborted_streams`` they
    are refunded. Complete streams are charged in full either way."""
    # The default is not written out: the setting is the policy choice a deployment makes.
    scenario = make_scenario({"policy": {"refund_aborted_streams": True}} if refund else {})
    key = scenario.key
    app = scenario.app(kind)
    left = [f"/v1/stream/left-{index}" for index in range(5)]
    for path in left:
        read_first_chunk_and_leave(app.port, f"{path}?n={CHUNKS}&delay=0.02", key)
    complete = [f"/v1/stream/complete-{index}" for index in range(3)]
    with httpx.Client(base_url=app.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client:
        for path in complete:
            response = client.get(f"{path}?n={CHUNKS}&delay=0.001")
            assert response.text.count("chunk") == CHUNKS
    # The handlers of the streams left behind run on until they end (uvicorn) or their next write fails.
    wait_until(lambda: app.metrics().get("meterware_requests_total", 0) >= 8, 10, "every stream ended")
    app.stop()
    scenario.rollup_once()

    stream = scenario.stream()
    stream.assert_no_duplicates()
    events = {event.route: event for event in stream.events}
    assert {path: events[path].outcome for path in left} == dict.fromkeys(left, "aborted")
    assert {path: events[path].billable for path in left} == dict.fromkeys(left, not refund)
    assert {path: events[path].outcome for path in complete} == dict.fromkeys(complete, "success")
    left_tokens = [int(events[path].units.get("tokens", 0)) for path in left]
    if kind == "uvicorn":
        assert left_tokens == [CHUNKS] * len(left)
    else:  # gunicorn closes the handler's generator at the write that fails
        assert all(1 <= tokens <= CHUNKS for tokens in left_tokens), left_tokens
    ledger = scenario.books()
    assert ledger.calls["aborted"] == len(left)
    assert ledger.calls["success"] == len(complete)
    served_tokens = 0 if refund else sum(left_tokens)
    assert ledger.tokens == len(complete) * CHUNKS + served_tokens
    expected = len(complete) * (CALL_PRICE + CHUNKS * TOKEN_PRICE)
    if not refund:
        expected += len(left) * CALL_PRICE + served_tokens * TOKEN_PRICE
    assert ledger.spend == ledger.charged == stream.charged() == expected
    assert ledger.reserved == 0
    figures(
        f"disconnect-{kind}-{'refund' if refund else 'default'}",
        aborted=len(left),
        aborted_tokens=left_tokens,
        complete=len(complete),
        charged_micros=ledger.charged,
    )

"""An API sold by the token, metered by meterware with one line (Flask).

    METERWARE_CONFIG=examples/meterware.toml gunicorn examples.flask_app:app

``examples/README.md`` shows how to create a customer and a key, and how to call it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask, Response, request

import meterware
from meterware.wsgi import WSGIMeteringMiddleware

app = Flask(__name__)
app.wsgi_app = WSGIMeteringMiddleware(app.wsgi_app)  # reads $METERWARE_CONFIG (or ./meterware.toml)


def complete(prompt: str) -> list[str]:
    """Stand in for a language model: the reply, word by word."""
    return ["You", "said:", *prompt.split()]


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}  # excluded in meterware.toml: no key, not metered


@app.post("/v1/chat")
def chat() -> dict[str, str]:
    prompt = str(request.get_json()["prompt"])
    words = complete(prompt)
    meterware.usage.add("tokens", len(prompt.split()) + len(words))  # charged if the call succeeds
    return {"reply": " ".join(words)}


@app.get("/v1/stream")
def stream() -> Response:
    """Server-sent events, one word each; every word is a token."""
    words = complete(request.args.get("prompt", "hello"))

    def events() -> Iterator[str]:
        for word in words:
            meterware.usage.add("tokens", 1)
            yield f"data: {word}\n\n"
            time.sleep(0.05)

    return Response(events(), mimetype="text/event-stream")

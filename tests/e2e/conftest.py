from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port, wait_for_port

CONFIG = """
[storage]
url = "memory://"
shards = 4

[meters.calls]
aggregation = "count"
[meters.tokens]
aggregation = "sum"
source = "handler"

[plans.payg]
prepaid = true
[plans.payg.meters.calls]
price = "0.01"
[plans.payg.meters.tokens]
price = "0.0001"

[pipeline]
flush_interval = 0.05
"""


class ServerProcess:
    """A real server process (uvicorn, gunicorn...) on a loopback port."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        # Output goes to a file: a pipe nobody reads would block the server once it fills up.
        with open(log, "wb") as output:
            self.process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=20)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"server did not start:\n{self.output()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the server (SIGTERM: graceful, the lifespan drains the buffer) and return its output."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        return self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def e2e_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    config = tmp_path / "meterware.toml"
    config.write_text(CONFIG + f'spool_dir = "{tmp_path / "spool"}"\n')
    return {
        **os.environ,
        "METERWARE_CONFIG": str(config),
        "METERWARE_STORAGE": redis_url,
        "E2E_STREAM_FLAG": str(tmp_path / "stream-flag"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }


@pytest.fixture
def uvicorn_server(e2e_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.e2e.asgi_app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = ServerProcess(args, e2e_env, port, tmp_path / "uvicorn.log")
    yield server
    server.stop()

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ServerProcess, child_env, free_port

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


@pytest.fixture
def e2e_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    config = tmp_path / "meterware.toml"
    config.write_text(CONFIG + f'spool_dir = "{tmp_path / "spool"}"\n')
    return child_env(
        METERWARE_CONFIG=str(config),
        METERWARE_STORAGE=redis_url,
        E2E_STREAM_FLAG=str(tmp_path / "stream-flag"),
    )


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

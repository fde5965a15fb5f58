"""The scale-out benchmark (``benchmarks/scaleout.py``) in its smallest shape, so it keeps running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import child_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_two_rollup_processes_drain_a_cluster_exactly(tmp_path: Path) -> None:
    """Two ``meterware rollup`` processes drain 5,000 events over 16 shards of a real 3-primary cluster:
    the benchmark finds every customer's period total exact, every event committed once, every shard held."""
    out = tmp_path / "scaleout.json"
    command = [sys.executable, "-m", "benchmarks.scaleout", "--skip-http", "--json", str(out)]
    command += ["--shards", "16", "--workers", "2", "--events", "5000", "--customers", "50"]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = json.loads(out.read_text())["rollup"]
    assert run["exact"]
    assert sum(run["per_worker"]) == 5000
    assert sum(run["shards_held"]) == 16

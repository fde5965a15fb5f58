"""meterware's benchmark suite: ``python -m benchmarks`` (README.md in this directory says what it measures).

The suite measures the tree it lives in: its ``src/`` goes first on ``sys.path`` here and on the
``PYTHONPATH`` of every server it starts, whichever meterware happens to be installed. The servers of
``--baseline`` get ``BENCH_METERWARE_SRC``, the ``src/`` of the revision they measure instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("BENCH_METERWARE_SRC") or ROOT / "src")

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

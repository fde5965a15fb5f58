"""``python -m meterware.cli``: the same command as ``meterware`` and ``python -m meterware``."""

import sys

from meterware.cli import main

sys.exit(main())

"""The customer of a Redis-backed benchmark run, created and read by the meterware its server runs.

``python -m benchmarks.customers new`` prints a new benchmark customer's id and key, ``python -m
benchmarks.customers charged CUSTOMER`` what that customer was charged so far, in micro-credits; both on
the storage of ``METERWARE_CONFIG``. The suite runs it in the environment of the run's server, so the
customer of a ``--baseline`` run is written and read by the baseline's meterware, whatever its layout.
"""

from __future__ import annotations

import os
import sys

from benchmarks.apps import CREDITS_MICROS, create_customer
from meterware import Accounts, Config


def main(argv: list[str]) -> int:
    accounts = Accounts.open(Config.from_file(os.environ["METERWARE_CONFIG"]))
    try:
        if argv == ["new"]:
            print(*create_customer(accounts))
        elif len(argv) == 2 and argv[0] == "charged":
            print(CREDITS_MICROS - accounts.balance(argv[1]).balance)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    finally:
        accounts.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m meterware.rollup``: run the rollup worker (what ``meterware rollup`` runs)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from meterware.config import Config
from meterware.errors import ConfigError
from meterware.rollup.metrics import add_metrics_arguments, metrics_options
from meterware.rollup.worker import run_worker


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the worker; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m meterware.rollup", description=__doc__)
    parser.add_argument("--config", help="TOML file (default: $METERWARE_CONFIG or ./meterware.toml)")
    parser.add_argument("--storage", help="backend URL, overriding the configuration")
    parser.add_argument("--once", action="store_true", help="roll up what is there, then exit")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_metrics_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = Config.load(args.config)
    except ConfigError as error:
        print(f"meterware: {error}", file=sys.stderr)
        return 2
    if args.storage:
        config = dataclasses.replace(config, storage=args.storage)
    return run_worker(config, once=args.once, metrics=metrics_options(args))


if __name__ == "__main__":
    sys.exit(main())

"""``meterware doctor``: whether the configured Redis keeps the money, check by check."""

from __future__ import annotations

import argparse
import json

from meterware.cli._common import Commands, load_config
from meterware.errors import StorageError

#: Exit status when Redis could not be reached (1 is kept for a check that failed).
UNREACHABLE = 2


def cmd_doctor(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config.storage.startswith("memory://"):
        text = "memory:// keeps data inside one process: nothing to check (production needs redis://)"
        print(json.dumps({"storage": "memory://", "checks": [], "status": "ok"}) if args.json else text)
        return 0

    from meterware.storage.redis import inspect_redis, parse_url

    where = parse_url(config.storage).where
    try:
        wait_replicas = config.replica_wait.replicas if config.replica_wait else 0
        found = inspect_redis(
            config.storage, allow_eviction=config.allow_eviction, wait_replicas=wait_replicas
        )
    except StorageError as error:
        if args.json:
            print(json.dumps({"storage": where, "checks": [], "status": "unreachable", "error": str(error)}))
        else:
            print(f"unreachable  {error}")
        return UNREACHABLE
    levels = {finding.level for finding in found}
    status = next((level for level in ("error", "warning") if level in levels), "ok")
    if args.json:
        checks = [{"level": f.level, "check": f.check, "node": f.node, "message": f.message} for f in found]
        print(json.dumps({"storage": where, "checks": checks, "status": status}, indent=2, sort_keys=True))
    else:
        print(f"Redis at {where}")
        for f in found:
            print(f"{f.level:<8} {f.check:<12} {f.node:<22} {f.message}")
        print(f"status: {status}")
    return 1 if status == "error" else 0


def add_doctor(commands: Commands) -> None:
    commands.command(
        "doctor",
        cmd_doctor,
        "check that the storage Redis keeps the money: eviction policy, persistence, version and replicas, on"
        " every primary",
    )

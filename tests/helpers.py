"""Small helpers shared by the tests and the benchmarks: configurations, customers, request paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.types import ASGIApp, Message

from meterware import Accounts, Config
from meterware.keys import NewKey


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the settings of ``changes`` (one level deep: sections are merged, not replaced)."""
    result = dict(base)
    for section, values in changes.items():
        if isinstance(values, Mapping) and isinstance(result.get(section), Mapping):
            result[section] = {**result[section], **values}
        else:
            result[section] = values
    return result


def to_toml(data: Mapping[str, Any]) -> str:
    """A TOML document for a configuration (tables of tables, strings, numbers, booleans, lists)."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"cannot write {item!r} as TOML")

    def table(prefix: str, content: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in content.items() if not isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for key, sub in content.items():
            if isinstance(sub, Mapping):
                table(f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key), sub)

    table("", data)
    return "\n".join(lines) + "\n"


def accounts_of(env: Mapping[str, str]) -> Accounts:
    """The accounts of a deployment configured by ``METERWARE_CONFIG`` and ``METERWARE_STORAGE``."""
    return Accounts.open(Config.load(env["METERWARE_CONFIG"], storage=env["METERWARE_STORAGE"]))


def new_customer(accounts: Accounts, customer: str, credits: str, *, plan: str = "payg") -> NewKey:
    """A customer on ``plan`` granted ``credits``, and a live key of theirs."""
    accounts.create_customer(customer, plan=plan)
    accounts.grant_credits(customer, credits)
    return accounts.create_key(customer)


def paths_cycling(templates: Sequence[str]) -> Callable[[int], str]:
    """Request paths taking turns through ``templates``; ``{}`` in a template becomes the request's number."""
    return lambda number: templates[number % len(templates)].format(number)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan around the block, as a server would: started before, shut down after
    (the metering middleware drains its buffer at shutdown)."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, send)

    await messages.put({"type": "lifespan.startup"})
    running = asyncio.create_task(run())
    await started.wait()
    try:
        yield
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        await running

"""The Lua scripts (package data) and the pieces every script call and reply shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Final, TypeAlias

from meterware.storage.base import StreamEntry

_SCRIPTS: Final = (
    "add_key",
    "add_key_hash",
    "admit",
    "claim_shard",
    "close_period",
    "commit",
    "correct",
    "create_customer",
    "due_reservations",
    "expire_grants",
    "fire_alert",
    "flush",
    "grant_credits",
    "import_events",
    "record_key_use",
    "refund",
    "release_shard",
    "renew_reservations",
    "rollup_heartbeat",
    "swap_field",
    "swap_plan",
    "take_key_uses",
    "update_fields",
)

Arg: TypeAlias = str | int | bytes
#: What the driver's types say a reply holds (always ``bytes`` here: responses are never decoded).
Text: TypeAlias = bytes | str
Fields: TypeAlias = Mapping[bytes | str, bytes | str]


@cache
def script_sources() -> dict[str, str]:
    """The text of every script: its shebang line, the shared helpers of ``common.lua``, then its body.

    Redis 7 reads a script's flags from a ``#!lua`` first line. Without ``allow-oom``, a script that may
    write is refused before it runs when Redis is out of memory, instead of failing half way.
    """
    folder = resources.files("meterware.storage").joinpath("lua")

    def read(name: str) -> str:
        return folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")

    common = read("common")
    sources = {}
    for name in _SCRIPTS:
        shebang, _, body = read(name).partition("\n")
        if not shebang.startswith("#!lua") or "allow-oom" in shebang:
            raise RuntimeError(f"{name}.lua must start with a #!lua line without allow-oom")
        sources[name] = f"{shebang}\n{common}\n{body}"
    return sources


def sources() -> Iterable[tuple[str, str]]:
    return script_sources().items()


class Keys:
    """The KEYS of one script call, each key once; arguments refer to them by 1-based index."""

    def __init__(self, *fixed: str) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        for key in fixed:
            self.index(key)

    def index(self, key: str) -> int:
        found = self._index.get(key)
        if found is None:
            self.keys.append(key)
            found = self._index[key] = len(self.keys)
        return found


def as_str(value: Text) -> str:
    return value.decode() if isinstance(value, bytes) else value


def to_bytes(value: Text) -> bytes:
    return value.encode() if isinstance(value, str) else value


def stream_entries(reply: Iterable[tuple[Text | None, Fields | None]] | None) -> list[StreamEntry]:
    """Stream entries from an XRANGE reply (fields stay bytes, as the worker reads them)."""
    return [
        StreamEntry(
            as_str(entry_id), {to_bytes(name): to_bytes(value) for name, value in (fields or {}).items()}
        )
        for entry_id, fields in reply or ()
        if entry_id is not None
    ]

"""A TCP proxy on loopback between an app and Redis that can lose replies: the network of the fault suite.

It reads just enough RESP to relay one command and then its one reply, so a rule can look at each command
and choose what the network does with it:

- ``FORWARD``: relay the command and the reply;
- ``LOSE_REPLY``: relay the command, wait until Redis has *applied* it and answered, then drop the
  connection instead of relaying the answer (the ambiguous failure: the client cannot tell what happened);
- ``REFUSE``: drop the connection without relaying the command (Redis never sees it).

``block()`` cuts every connection and refuses new ones until ``unblock()`` (a partition), which also lets a
test reach Redis directly while the app cannot.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections import Counter
from collections.abc import Callable
from enum import Enum
from functools import cache
from typing import BinaryIO

from meterware.storage.redis import script_sources


class Action(Enum):
    FORWARD = "forward"
    LOSE_REPLY = "lose_reply"
    REFUSE = "refuse"


Rule = Callable[[list[bytes]], Action]


def script_sha(name: str) -> bytes:
    """The SHA1 redis-py sends with ``EVALSHA`` for one of meterware's scripts."""
    return hashlib.sha1(script_sources()[name].encode()).hexdigest().encode()


def script_of(command: list[bytes]) -> str | None:
    """The meterware script a command runs (``EVALSHA <sha> ...``), if any."""
    if len(command) < 2 or command[0].upper() != b"EVALSHA":
        return None
    return _script_names().get(command[1].lower())


@cache
def _script_names() -> dict[bytes, str]:
    return {script_sha(name): name for name in script_sources()}


def forward_all(command: list[bytes]) -> Action:
    return Action.FORWARD


class _Closed(Exception):
    pass


def _line(stream: BinaryIO) -> bytes:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise _Closed
    return line


def _exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise _Closed
    return data


def read_command(stream: BinaryIO) -> tuple[bytes, list[bytes]]:
    """One client command: its raw bytes and its arguments (clients send arrays of bulk strings)."""
    header = _line(stream)
    if header[:1] != b"*":
        return header, header.split()  # an inline command
    raw = [header]
    arguments = []
    for _ in range(int(header[1:])):
        length_line = _line(stream)
        data = _exactly(stream, int(length_line[1:]) + 2)
        raw += [length_line, data]
        arguments.append(data[:-2])
    return b"".join(raw), arguments


def read_reply(stream: BinaryIO) -> bytes:
    """One complete reply (RESP2, and the RESP3 types), as raw bytes."""
    line = _line(stream)
    kind = line[:1]
    if kind in (b"$", b"!", b"="):
        length = int(line[1:])
        return line if length < 0 else line + _exactly(stream, length + 2)
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(line[1:])
        if kind in (b"%", b"|"):
            count *= 2
        parts = [line]
        for _ in range(max(0, count)):
            parts.append(read_reply(stream))
        if kind == b"|":  # an attribute precedes the real reply
            parts.append(read_reply(stream))
        return b"".join(parts)
    return line  # + - : _ , # (


class RedisProxy:
    """Relays connections from a loopback port to Redis at ``upstream_port``, one command at a time."""

    def __init__(self, upstream_port: int, rule: Rule = forward_all) -> None:
        self.upstream_port = upstream_port
        self.rule = rule
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._blocked = False
        self._connections: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="redis-proxy", daemon=True)
        self._thread.start()

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def count(self, what: str) -> int:
        with self._lock:
            return self.counts[what]

    def block(self) -> None:
        """Cut every connection and refuse new ones."""
        with self._lock:
            self._blocked = True
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._closed = True
        self.block()
        _close(self._listener)
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._blocked:
                    self.counts["refused_connections"] += 1
                    _close(client)
                    continue
                self._connections.add(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=None)
            with self._lock:
                if self._blocked:
                    return
                self._connections.add(upstream)
            from_client = client.makefile("rb")
            from_upstream = upstream.makefile("rb")
            while True:
                raw, command = read_command(from_client)
                name = script_of(command) or (command[0].decode(errors="replace").lower() if command else "")
                action = self.rule(command)
                with self._lock:
                    self.counts[f"{name}:{action.value}"] += 1
                if action is Action.REFUSE:
                    return
                upstream.sendall(raw)
                reply = read_reply(from_upstream)
                if action is Action.LOSE_REPLY:
                    return
                client.sendall(reply)
        except (OSError, _Closed, ValueError):
            return
        finally:
            for connection in (client, upstream):
                if connection is not None:
                    with self._lock:
                        self._connections.discard(connection)
                    _close(connection)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()

"""Parse a Redis storage URL without I/O (a leaf: the configuration checks URLs with it).

``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path?db=N``,
``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]`` and
``redis+cluster://[[user]:password@]host:port[,host:port...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a storage URL points, parsed without I/O."""

    kind: Literal["url", "sentinel", "cluster"]
    #: The URL itself for ``redis://``, ``rediss://`` and ``unix://``.
    url: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        """The target for messages, without credentials."""
        if self.kind == "url":
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return f"{parts.scheme}://{netloc}{parts.path}"
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.kind == "sentinel":
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        return f"redis+cluster://{hosts}"


def _split_hosts(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    credentials, _, hostlist = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) if has_password else None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ValueError(f"storage URL: {item!r} is not host:port")
        try:
            hosts.append((host.strip("[]"), int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"storage URL: {item!r} has a bad port") from None
    return username, password, tuple(hosts)


def parse_url(url: str) -> RedisTarget:
    """Read a Redis storage URL (no I/O); raise ``ValueError`` naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("storage URL must look like 'redis://host:6379/0'")
    if scheme in ("redis", "rediss", "unix"):
        parts = urlsplit(url)
        return RedisTarget("url", url=url, username=parts.username or None, password=parts.password or None)
    netloc, _, path = rest.partition("/")
    path = path.split("?", 1)[0]
    if scheme == "redis+sentinel":
        username, password, hosts = _split_hosts(netloc, 26379)
        service, _, db = path.strip("/").partition("/")
        if not service:
            raise ValueError(
                "redis+sentinel:// URL must name the service: redis+sentinel://host:26379/mymaster"
            )
        if db and not db.isdigit():
            raise ValueError(f"redis+sentinel:// URL: database {db!r} is not a number")
        return RedisTarget(
            "sentinel", hosts=hosts, service=service, db=int(db or 0), username=username, password=password
        )
    if scheme == "redis+cluster":
        username, password, hosts = _split_hosts(netloc, 6379)
        if path.strip("/") not in ("", "0"):
            raise ValueError("redis+cluster:// URL cannot select a database (a cluster only has db 0)")
        return RedisTarget("cluster", hosts=hosts, username=username, password=password)
    raise ValueError(f"not a Redis storage URL: scheme {scheme!r}")

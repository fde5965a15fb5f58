"""The table of storage backends by URL scheme, filled by the backend classes themselves.

As ``limits``' storage registry: each backend class declares its schemes once (``SCHEMES``) and is entered
in the table when it is defined. The built-in backends are imported on the first URL that needs one, so
reading this module (and ``meterware.storage``) never imports a driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from meterware.storage.base import AsyncStorage, ReplicaWait, Storage

#: The modules defining the built-in backends, in the order they are tried for an unknown scheme (the
#: Redis one imports its driver).
BUILTIN_BACKENDS = ("meterware.storage.memory", "meterware.storage.redis")

_by_scheme: dict[str, type[Backend]] = {}


class Backend:
    """A storage backend opened from a URL; a subclass that sets ``SCHEMES`` handles those schemes."""

    #: The URL schemes (lower case) this class opens.
    SCHEMES: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for scheme in cls.__dict__.get("SCHEMES", ()):
            _by_scheme[scheme] = cls

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise ``ValueError`` naming the problem (never a password) if ``url`` could not be opened."""

    @classmethod
    def open(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> Storage:
        """The synchronous backend at ``url``; unless ``allow_eviction`` is ``None``, its first use checks
        that the backend keeps the money and refuses an evicting one unless allowed. ``replica_wait``:
        see :class:`~meterware.storage.base.ReplicaWait` (a backend without replicas ignores it)."""
        raise NotImplementedError

    @classmethod
    def open_async(
        cls,
        url: str,
        *,
        shards: int,
        timeout: float | None,
        allow_eviction: bool | None = None,
        replica_wait: ReplicaWait | None = None,
    ) -> AsyncStorage:
        """The asyncio request path of the backend at ``url``."""
        raise NotImplementedError


def backend_for(url: str) -> type[Backend]:
    """The backend class of ``url``'s scheme; raise ``ValueError`` for a scheme no backend handles."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    for module in BUILTIN_BACKENDS:
        if scheme in _by_scheme:
            break
        importlib.import_module(module)
    backend = _by_scheme.get(scheme)
    if backend is None:
        raise ValueError(f"storage URL: unknown scheme {scheme!r} ({', '.join(_by_scheme)})")
    return backend

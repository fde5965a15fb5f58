"""The request path's internals: what happens before and after the app, shared by every adapter.

``core`` decides (sans-I/O), the ``drivers`` do the backend calls (sync and asyncio), ``facade`` is the
per-middleware object the adapters hold; ``keycache``, ``leases`` and ``measure`` are the core's parts,
``admission``, ``records``, ``responses``, ``outcomes`` and ``periods`` its pure types and rules, and
``batching``, ``spool``, ``batcher`` and ``flushers`` carry finished calls to the backend.

Nothing is imported here, so importing a type from a module of this package never loads the others.
"""

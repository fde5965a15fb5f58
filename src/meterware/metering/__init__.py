"""The request path's internals: what happens before and after the app, shared by every adapter.

- ``facade``: :class:`~meterware.metering.facade.Metering`, what an adapter holds per middleware instance.
- ``core`` decides every step of a call, sans I/O; ``drivers`` make its backend calls (sync and asyncio).
- The core's parts: ``keycache`` (presented keys), ``leases`` (admission blocks), ``measure`` (a finished
  call's units, settlement and event row), ``calls`` (a call in flight), ``cache`` (the bounded cache).
- Its pure types and rules: ``records``, ``admission``, ``responses``, ``outcomes``, ``periods``.
- After the call: ``batching`` (the buffer and its batches), ``spool``, ``batcher`` (the decisions of a
  flush), ``flushers`` (the flush passes and the thread or task that runs them), and ``unsettled`` (what
  finished calls still change, counted at admission until they are written).

Nothing is imported here, so importing a type from one module of this package never loads the others.
"""

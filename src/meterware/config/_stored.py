"""Plans stored in the backend, next to those of the config file: their versions, and the cache of them
each process keeps (:attr:`Config.stored`), which :meth:`Config.plan` consults.

A stored plan is the table one ``[plans.NAME]`` of the config file holds, parsed by the same parser
(:func:`~meterware.config._parse.parse_plan`), so it may only price meters the config file declares. It is
kept as versions (the table, who stored it and when): a change appends one, none is ever edited, the last
:data:`MAX_PLAN_VERSIONS` are kept, and the last one is the plan. A name the config file defines is refused
(the file's plan would win, silently). A process reads every stored plan at once (one backend read) at most
once per ``policy.key_cache_ttl`` seconds: so it sees a change within that time. Nothing here does I/O: the
callers pass the read.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from meterware.config._parse import check_call_costs, parse_plan
from meterware.config._sections import Plan
from meterware.config._table import toml_key
from meterware.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from meterware.config._load import Config

logger = logging.getLogger("meterware")

#: Versions kept per stored plan (the oldest go first).
MAX_PLAN_VERSIONS: Final = 50


@dataclass(frozen=True, slots=True)
class PlanVersion:
    """One stored version of a plan: the ``[plans.NAME]`` table, when and by whom it was stored."""

    recorded_at: int
    actor: str
    table: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"recorded_at": self.recorded_at, "actor": self.actor, "table": dict(self.table)}


def load_plan_versions(record: str) -> tuple[PlanVersion, ...]:
    """The versions in a stored plan's record (``""``: none); ValueError if it is not one."""
    if not record:
        return ()
    try:
        return tuple(
            PlanVersion(int(v["recorded_at"]), str(v["actor"]), dict(v["table"])) for v in json.loads(record)
        )
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"is not a stored plan record ({type(error).__name__}: {error})") from None


def dump_plan_versions(versions: tuple[PlanVersion, ...]) -> str:
    return json.dumps([v.as_dict() for v in versions[-MAX_PLAN_VERSIONS:]], separators=(",", ":"))


def parse_stored_plan(name: str, table: Any, config: Config) -> Plan:
    """A stored plan's table as a :class:`Plan`, checked as the config file's plans are (ConfigError)."""
    if name in config.plans:
        raise ConfigError(
            f"plans.{toml_key(name)}",
            "is defined in the config file, which wins over a stored plan of the same name: change it there",
        )
    plan = parse_plan(name, table, config.meters)
    heaviest = max([1, *(weight for _, weight in config.routes.weights)])
    check_call_costs({name: plan}, config.meters, heaviest)
    return plan


class StoredPlans:
    """The stored plans one process knows, read at most once per ``policy.key_cache_ttl`` seconds.

    A record that no longer parses (or a name the config file took since) keeps the last good plan of
    that name, with an error logged once per change of the record.
    """

    def __init__(self) -> None:
        self.plans: Mapping[str, Plan] = {}
        #: Changes whenever :attr:`plans` does (caches of what a plan holds key on it).
        self.generation = 0
        #: Whether a stored plan has route limits (the request path then matches paths).
        self.routed = False
        #: ``time.perf_counter_ns()`` from which a read is due (the request path compares its clock).
        self.due_ns = 0
        #: Whether a first read was made (calls wait for it, as they would for their key's).
        self.settled = False
        self._records: dict[str, str] = {}
        self._lock = threading.Lock()
        self._reading = threading.Lock()

    def __reduce__(self) -> tuple[type[StoredPlans], tuple[()]]:
        """A copy (``copy.deepcopy``, pickle: a Config sent to a worker) starts empty: it is a cache."""
        return StoredPlans, ()

    def claim(self, ttl: float, *, force: bool = False) -> bool:
        """Whether the caller reads now: once per ``ttl`` seconds per process, whoever asks first."""
        now = time.perf_counter_ns()
        with self._lock:
            if not force and now < self.due_ns:
                return False
            self.due_ns = now + int(ttl * 1e9)
            return True

    def refresh(self, config: Config, read: Callable[[], Mapping[str, str]], *, force: bool = False) -> None:
        """Read the stored plans if due (``force``: now), keeping what is known if the read fails; a
        thread that comes while another reads waits for that read."""
        with self._reading:
            if self.claim(config.policy.key_cache_ttl, force=force):
                try:
                    self.update(config, read())
                except StorageError as error:
                    logger.warning("meterware: stored plans not read (%s); keeping the ones known", error)
                finally:
                    self.settled = True

    async def arefresh(
        self, config: Config, read: Callable[[], Awaitable[Mapping[str, str]]], *, force: bool = False
    ) -> None:
        """The asyncio twin of :meth:`refresh` (the caller shares one read among concurrent calls)."""
        if self.claim(config.policy.key_cache_ttl, force=force):
            try:
                self.update(config, await read())
            except StorageError as error:
                logger.warning("meterware: stored plans not read (%s); keeping the ones known", error)
            finally:
                self.settled = True

    def update(self, config: Config, records: Mapping[str, str]) -> None:
        """Take the records read (name -> record): parse those that changed, keep the last good plan of
        those that do not parse."""
        with self._lock:
            if records == self._records:
                return
            plans = dict(self.plans)
            for name in set(plans) - set(records):
                del plans[name]
            for name, record in records.items():
                if record == self._records.get(name):
                    continue
                try:
                    versions = load_plan_versions(record)
                    if not versions:
                        raise ValueError("holds no version")
                    plans[name] = parse_stored_plan(name, versions[-1].table, config)
                except (ValueError, TypeError, ConfigError) as error:
                    kept = (
                        "keeping the last good one" if name in plans else "its customers get the default plan"
                    )
                    logger.error("meterware: stored plan %r: %s; %s", name, error, kept)
            self._records = dict(records)
            self.plans = plans
            self.routed = any(plan.route_limits for plan in plans.values())
            self.generation += 1

"""Which request paths are metered, and the weight of a call to each (the ``[routes]`` section)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, Final

from meterware.errors import ConfigError

#: The route of a call no route or template of the app matched.
UNMATCHED_ROUTE: Final = "<unmatched>"

#: Paths excluded when the configuration names none: the metrics endpoint (``meterware.metrics``).
DEFAULT_EXCLUDE: Final = ("/metrics", "/metrics/")


def has_dot_segments(path: str) -> bool:
    return "/." in path and any(segment in (".", "..") for segment in path.split("/"))


def _without_dot_segments(path: str) -> str:
    """``path`` with its ``.`` and ``..`` segments resolved (RFC 3986 5.2.4)."""
    segments = path.split("/")
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
            continue
        if last:
            kept.append("")
    return "/".join(kept)


def _globs(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern matching any of ``globs`` (None for none)."""
    return re.compile("|".join(f"(?:{translate(glob)})" for glob in globs)) if globs else None


def _template_matcher(templates: tuple[str, ...]) -> Any:
    """The bound ``werkzeug.routing.Map`` matching ``templates`` (None for none); a rule werkzeug refuses is
    a ``ConfigError`` naming it."""
    if not templates:
        return None
    # Imported here: only apps that declare templates pay for werkzeug's routing.
    from werkzeug.routing import Map, Rule

    rules = Map(strict_slashes=False, merge_slashes=False)
    for index, template in enumerate(templates):
        try:
            rules.add(Rule(template, endpoint=template))
        except (ValueError, LookupError) as error:  # a malformed rule, an unknown converter
            raise ConfigError(f"routes.templates[{index}]", f"{template!r}: {error}") from None
    return rules.bind("")


@dataclass(frozen=True, slots=True)
class Routes:
    """Which paths are metered, and what a call to each costs in units of the ``call`` meters."""

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    #: ``(glob, weight)`` pairs; the first matching glob wins, otherwise the weight is 1.
    weights: tuple[tuple[str, int], ...] = ()
    #: Globs of paths that serve live keys only: test keys get 403 ``test_key_not_allowed``.
    live_only: tuple[str, ...] = ()
    #: Where the customer's own account (:mod:`meterware.billing.selfservice`) is mounted, without a trailing
    #: slash: never metered, with or without the slash and below it, whatever ``exclude`` says.
    account: str | None = None
    #: Where the customer portal and its operator view (:mod:`meterware.portal`) are mounted: never metered
    #: either, as ``account``.
    portal: str | None = None
    admin: str | None = None
    #: Route templates of an app without a router (werkzeug rules, ``/v1/items/<id>``): its calls' events
    #: and metrics carry the template their path matches (:meth:`route_of`).
    templates: tuple[str, ...] = ()
    _exclude_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _live_only_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _weight_res: tuple[tuple[re.Pattern[str], int], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    _templates: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_exclude_re", _globs(self.exclude))
        object.__setattr__(self, "_live_only_re", _globs(self.live_only))
        object.__setattr__(
            self, "_weight_res", tuple((re.compile(translate(glob)), w) for glob, w in self.weights)
        )
        object.__setattr__(self, "_templates", _template_matcher(self.templates))

    def route_of(self, path: str) -> str:
        """The route of a call to an app without a router: the template ``path`` matches,
        :data:`UNMATCHED_ROUTE`, or ``path`` itself when no templates are declared."""
        templates = self._templates
        if templates is None:
            return path
        from werkzeug.exceptions import HTTPException  # loaded with the routing map already

        try:
            template, _ = templates.match(path)
        except HTTPException:
            return UNMATCHED_ROUTE
        return str(template)

    def is_excluded(self, path: str) -> bool:
        """Whether calls to ``path`` (a route template or raw path) bypass metering entirely.

        A path with ``.`` or ``..`` segments is never excluded: a router that resolves them would serve
        ``/health/../v1/paid`` as ``/v1/paid``, one that does not would serve ``/v1/paid/../../health``
        from ``/v1/paid``; either way an exclusion could let a metered route through.
        """
        if has_dot_segments(path):
            return False
        for mount in (self.account, self.portal, self.admin):
            if mount is not None and (path == mount or path.startswith(f"{mount}/")):
                return True
        pattern = self._exclude_re
        return pattern is not None and pattern.match(path) is not None

    def is_live_only(self, path: str) -> bool:
        """Whether ``path`` refuses test keys (as written, or with its dot segments resolved)."""
        pattern = self._live_only_re
        if pattern is None:
            return False
        return pattern.match(path) is not None or (
            has_dot_segments(path) and pattern.match(_without_dot_segments(path)) is not None
        )

    def weight(self, path: str) -> int:
        """Units of each ``call`` meter that one call to ``path`` counts for."""
        for pattern, weight in self._weight_res:
            if pattern.match(path):
                return weight
        return 1

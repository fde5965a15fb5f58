"""The configuration: the documented example, where a config comes from, and one-line errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import meterware
from meterware import Accounts, MeteringMiddleware
from meterware.config import Config, Meter, MeterTerms, Plan, RateLimit, parse_credits, resolve_config
from meterware.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "meterware.toml"
ENV_VARS = ("METERWARE_CONFIG", "METERWARE_STORAGE", "METERWARE_REDIS_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run every test in an empty directory without meterware's environment variables."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- the documented example ----------------------------------------------------------------------------


def test_readme_example_is_the_example_file() -> None:
    """The README's first TOML block is examples/meterware.toml, byte for byte; the others are TOML."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first, *others = re.findall(r"^```toml\n(.*?)^```", readme, flags=re.S | re.M)
    assert first == EXAMPLE.read_text(encoding="utf-8")
    for block in others:
        tomllib.loads(block)


def test_example_file_parses_to_the_documented_values() -> None:
    """Every setting of the example file arrives in the Config as documented."""
    config = Config.from_file(EXAMPLE)

    assert config.storage == "redis://localhost:6379/0"
    assert config.shards == 16
    assert config.default_plan == "free"
    assert config.meters == {
        "calls": Meter("calls", "count", "call", 0),
        "tokens": Meter("tokens", "sum", "handler", 0),
    }
    assert config.plans == {
        "free": Plan(
            "free", (RateLimit(5, 1), RateLimit(100, 60)), "month", False, {"calls": MeterTerms(1000)}
        ),
        "payg": Plan("payg", (RateLimit(50, 1),), "month", True, {"calls": MeterTerms(price=2000)}),
        "pro": Plan(
            "pro",
            (RateLimit(200, 1), RateLimit(10000, 60)),
            "month",
            False,
            {"calls": MeterTerms(quota=1_000_000, hard=False, included=100_000, price=500)},
            route_limits=(("/v1/chat*", (RateLimit(10, 1),)),),
            concurrency=20,
            spend_cap=500_000_000,
        ),
        "tokens": Plan(
            "tokens",
            (RateLimit(600, 60), RateLimit(100_000, 60, "tokens", 1)),
            "month",
            True,
            {"tokens": MeterTerms(price=20)},
        ),
    }
    assert config.routes.exclude == ("/health", "/metrics", "/docs*", "/openapi.json")
    assert config.routes.weights == (("/v1/embeddings/batch", 10),)
    policy = config.policy
    assert (policy.on_backend_error, policy.bill_client_errors, policy.refund_aborted_streams) == (
        "open",
        False,
        False,
    )
    assert policy.key_headers == ("authorization", "x-api-key")
    assert policy.key_query is None  # the example's key_query = "" means "no query parameter"
    assert (policy.timeout, policy.reservation_timeout, policy.key_cache_ttl) == (0.25, 300.0, 10.0)
    pipeline = config.pipeline
    assert (pipeline.batch_size, pipeline.flush_interval, pipeline.buffer_size) == (1000, 0.2, 100_000)
    assert (pipeline.spool_dir, pipeline.spool_max_bytes) == (".meterware-spool", 268_435_456)
    assert (config.rollup.batch_size, config.rollup.lease_seconds, config.rollup.retention_seconds) == (
        10_000,
        10.0,
        86_400.0,
    )


@pytest.mark.parametrize(
    ("path", "excluded", "weight"),
    [
        pytest.param("/health", True, 1, id="exact-exclude"),
        pytest.param("/docs/oauth2-redirect", True, 1, id="glob-exclude"),
        pytest.param("/healthz", False, 1, id="exclude-is-whole-path"),
        pytest.param("/v1/embeddings/batch", False, 10, id="weighted"),
        pytest.param("/v1/embeddings", False, 1, id="default-weight"),
    ],
)
def test_example_routes(path: str, excluded: bool, weight: int) -> None:
    """Route globs match whole paths: excluded paths bypass metering, weights default to 1."""
    routes = Config.from_file(EXAMPLE).routes
    assert routes.is_excluded(path) is excluded
    assert routes.weight(path) == weight


@pytest.mark.parametrize(
    ("path", "excluded", "live_only"),
    [
        pytest.param("/health", True, False, id="excluded"),
        pytest.param("/docs/../v1/paid", False, False, id="dot-segments-never-excluded"),
        pytest.param("/v1/paid/../../health", False, False, id="dot-segments-to-an-excluded-path"),
        pytest.param("/health/.", False, False, id="dot-segment-at-the-end"),
        pytest.param("/health..", True, False, id="dots-in-a-name-are-not-segments"),
        pytest.param("/v1/payouts/7", False, True, id="live-only"),
        pytest.param("/v1/other/../payouts/7", False, True, id="live-only-after-resolving"),
        pytest.param("/v1/payouts/../other", False, True, id="live-only-as-written"),
        pytest.param("/v1/other", False, False, id="neither"),
    ],
)
def test_routes_with_dot_segments(path: str, excluded: bool, live_only: bool) -> None:
    """No exclusion lets a path with dot segments through; live-only routes hold either way it resolves."""
    routes = Config.from_dict(
        {"routes": {"exclude": ["/health*", "/docs*"], "live_only": ["/v1/payouts/*"]}}
    ).routes
    assert routes.is_excluded(path) is excluded
    assert routes.is_live_only(path) is live_only


def test_empty_config_gets_the_defaults() -> None:
    """An empty dict is a working memory:// config with one 'calls' meter and one 'default' plan."""
    config = Config.from_dict({})
    assert config == Config()
    assert config.storage == "memory://"
    assert list(config.meters) == ["calls"]
    assert config.default_plan == "default"


def test_default_plan_is_the_first_plan() -> None:
    """Without default_plan, new customers get the first plan of the file."""
    config = Config.from_dict({"plans": {"basic": {}, "gold": {}}})
    assert config.default_plan == "basic"


def test_unknown_plan_name_falls_back_to_default_plan() -> None:
    """Config.plan() resolves a plan that was removed from the file to the default plan."""
    config = Config.from_file(EXAMPLE)
    assert config.plan("pro").name == "pro"
    assert config.plan("retired").name == "free"


@pytest.mark.parametrize(
    ("text", "amount", "seconds"),
    [
        pytest.param("10/second", 10, 1, id="per-second"),
        pytest.param("600/minute", 600, 60, id="per-minute"),
        pytest.param("1000 per 5 minutes", 1000, 300, id="per-n-minutes"),
        pytest.param(" 3 / hours ", 3, 3600, id="spaces-plural"),
        pytest.param("1/day", 1, 86400, id="per-day"),
    ],
)
def test_rate_limit_parse(text: str, amount: int, seconds: int) -> None:
    """Rate strings turn into calls per number of seconds."""
    assert RateLimit.parse(text) == RateLimit(amount, seconds)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        pytest.param("0.002", 2000, id="decimal-string"),
        pytest.param("0.000001", 1, id="one-micro"),
        pytest.param(" 25.50 ", 25_500_000, id="spaces"),
        pytest.param(5, 5_000_000, id="integer"),
        pytest.param("0", 0, id="zero"),
        pytest.param("0.0010000000", 1000, id="trailing-zeros"),
    ],
)
def test_parse_credits_is_exact(value: str | int, micros: int) -> None:
    """Credit amounts become exact micro-credits."""
    assert parse_credits(value, "price") == micros


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("\u0663", id="arabic-indic-digit"),
        pytest.param("\uff15", id="fullwidth-digit"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1_000", id="underscore"),
        pytest.param("+5", id="plus-sign"),
        pytest.param(".5", id="no-whole-part"),
        pytest.param("5.", id="no-fraction"),
        pytest.param("5\u00a0", id="no-break-space"),
        pytest.param("Infinity", id="infinity"),
        pytest.param("NaN", id="nan"),
        pytest.param("1" * 5000, id="five-thousand-digits"),
        pytest.param(10**5000, id="integer-of-five-thousand-digits"),
        pytest.param(-(10**5000), id="negative-integer-of-five-thousand-digits"),
    ],
)
def test_parse_credits_takes_plain_ascii_decimals_only(value: str | int) -> None:
    """A credit amount is ASCII digits with an optional fraction: what Python's Decimal also reads
    (other scripts' digits, exponents, underscores, signs) is refused in one line naming the field."""
    with pytest.raises(ConfigError, match=r"^price: ") as refused:
        parse_credits(value, "price")
    assert "\n" not in str(refused.value)
    assert len(str(refused.value)) < 200


# -- where a configuration comes from ------------------------------------------------------------------

SHARDS_4 = '[storage]\nurl = "redis://file-host:6379/0"\nshards = 4\n'


def test_load_without_a_file_uses_defaults(tmp_path: Path) -> None:
    """Config.load() with no ./meterware.toml and no METERWARE_CONFIG is the default config."""
    assert Config.load() == Config()


def test_load_reads_meterware_toml_in_the_working_directory(tmp_path: Path) -> None:
    """Config.load() reads ./meterware.toml when it exists."""
    write(tmp_path / "meterware.toml", SHARDS_4)
    assert Config.load().shards == 4


def test_meterware_config_beats_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """METERWARE_CONFIG names the file to read instead of ./meterware.toml."""
    write(tmp_path / "meterware.toml", SHARDS_4)
    monkeypatch.setenv("METERWARE_CONFIG", str(write(tmp_path / "other.toml", "[storage]\nshards = 8\n")))
    assert Config.load().shards == 8


def test_explicit_path_beats_meterware_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path passed to Config.load() wins over METERWARE_CONFIG."""
    monkeypatch.setenv("METERWARE_CONFIG", str(write(tmp_path / "env.toml", "[storage]\nshards = 8\n")))
    assert Config.load(write(tmp_path / "explicit.toml", SHARDS_4)).shards == 4


def test_missing_meterware_config_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """METERWARE_CONFIG naming a missing file is an error, not a silent fallback to defaults."""
    monkeypatch.setenv("METERWARE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError) as caught:
        Config.load()
    assert str(caught.value) == f"{tmp_path / 'nope.toml'}: file: does not exist"


def test_keyword_overrides_replace_whole_sections(tmp_path: Path) -> None:
    """Keyword overrides replace the file's top-level sections."""
    path = write(tmp_path / "meterware.toml", SHARDS_4 + "[plans.free]\n[plans.gold]\nprepaid = true\n")
    config = Config.load(path, plans={"basic": {}}, policy={"timeout": 1})
    assert list(config.plans) == ["basic"]
    assert config.default_plan == "basic"
    assert config.policy.timeout == 1.0
    assert config.storage == "redis://file-host:6379/0"


def test_keyword_storage_url_keeps_the_file_shards(tmp_path: Path) -> None:
    """A keyword storage URL (the CLI's --storage) replaces the URL but keeps the file's shard count."""
    config = Config.load(write(tmp_path / "meterware.toml", SHARDS_4), storage="redis://kw-host:6379/0")
    assert (config.storage, config.shards) == ("redis://kw-host:6379/0", 4)


def test_keyword_storage_table_replaces_the_section(tmp_path: Path) -> None:
    """A keyword storage table replaces the file's [storage] table."""
    config = Config.load(
        write(tmp_path / "meterware.toml", SHARDS_4), storage={"url": "memory://", "shards": 2}
    )
    assert (config.storage, config.shards) == ("memory://", 2)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"METERWARE_STORAGE": "redis://env-host:1/0"}, "redis://env-host:1/0", id="storage"),
        pytest.param(
            {"METERWARE_REDIS_URL": "redis://redis-url:2/0"}, "redis://redis-url:2/0", id="redis-url"
        ),
        pytest.param(
            {"METERWARE_STORAGE": "redis://env-host:1/0", "METERWARE_REDIS_URL": "redis://redis-url:2/0"},
            "redis://env-host:1/0",
            id="storage-beats-redis-url",
        ),
        pytest.param({"METERWARE_STORAGE": ""}, "redis://kw-host:6379/0", id="empty-is-unset"),
    ],
)
def test_environment_storage_url_wins(
    env: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """METERWARE_STORAGE, then METERWARE_REDIS_URL, win over file and keywords; shards are kept."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Config.load(write(tmp_path / "meterware.toml", SHARDS_4), storage="redis://kw-host:6379/0")
    assert (config.storage, config.shards) == (expected, 4)


def test_environment_storage_url_applies_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """METERWARE_STORAGE alone turns the default config into a Redis config."""
    monkeypatch.setenv("METERWARE_STORAGE", "redis://env-host:1/0")
    config = Config.load()
    assert (config.storage, config.shards) == ("redis://env-host:1/0", 16)


def test_from_dict_and_from_file_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config.from_dict/from_file read exactly what they are given; only load() looks at the environment."""
    monkeypatch.setenv("METERWARE_STORAGE", "redis://env-host:1/0")
    assert Config.from_dict({}).storage == "memory://"
    assert Config.from_file(EXAMPLE).storage == "redis://localhost:6379/0"


def test_resolve_config_dict_with_overrides_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A middleware given a dict applies keyword overrides, then the environment's storage URL."""
    monkeypatch.setenv("METERWARE_REDIS_URL", "redis://env-host:1/0")
    config = resolve_config({"storage": {"url": "memory://", "shards": 2}}, {"default_plan": "default"})
    assert (config.storage, config.shards) == ("redis://env-host:1/0", 2)


def test_resolve_config_passes_an_instance_through() -> None:
    """A Config instance is used as it is, and cannot be combined with keyword overrides."""
    config = Config(shards=3)
    assert resolve_config(config, {}) is config
    with pytest.raises(TypeError, match="not both"):
        resolve_config(config, {"storage": "memory://"})


def test_resolve_config_path_loads_the_file(tmp_path: Path) -> None:
    """A middleware given a path reads that file."""
    assert resolve_config(str(write(tmp_path / "x.toml", SHARDS_4)), {}).shards == 4


# -- which configuration a middleware starts with ------------------------------------------------------


async def app_ok(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that answers 200."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_middleware_started_with_no_configuration_found_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No config= , no METERWARE_CONFIG, no ./meterware.toml: one line naming the places searched, raised
    and logged (a server may swallow the error: uvicorn does, in the lifespan that builds Starlette's
    middleware).

    Started from the wrong directory, the app would otherwise run on an empty memory:// store, answering
    401 to every key (and, with METERWARE_STORAGE set, serving every customer on a plan without limits).
    """
    with pytest.raises(ConfigError) as caught:
        MeteringMiddleware(app_ok, registry=CollectorRegistry())
    message = str(caught.value)
    assert message == (
        "no configuration found (searched: config=, METERWARE_CONFIG, "
        f"{tmp_path / 'meterware.toml'}): create the file, pass config=, "
        "or set METERWARE_CONFIG=defaults to run on the defaults (memory://, one plan without limits)"
    )
    assert "\n" not in message
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("ERROR", f"meterware: {message}")]


@pytest.mark.parametrize("app", ["asgi", "wsgi", "self-service"])
def test_every_start_up_with_no_configuration_found_refuses(app: str) -> None:
    """The same rule for the ASGI and WSGI middleware and the self-service app; the storage URL alone
    (``storage=``, ``METERWARE_STORAGE``) is not a configuration."""
    from meterware.billing.selfservice import AccountView
    from meterware.wsgi import WSGIMeteringMiddleware

    build = {
        "asgi": lambda: MeteringMiddleware(app_ok, storage="memory://x", registry=CollectorRegistry()),
        "wsgi": lambda: WSGIMeteringMiddleware(
            lambda e, s: [], storage="memory://x", registry=CollectorRegistry()
        ),
        "self-service": lambda: AccountView(storage="memory://x"),
    }[app]
    with pytest.raises(ConfigError, match=r"^no configuration found"):
        build()


def test_the_defaults_are_an_explicit_choice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """METERWARE_CONFIG=defaults starts on the defaults (and says so); so does config={}."""
    monkeypatch.setenv("METERWARE_CONFIG", "defaults")
    caplog.set_level(logging.INFO, logger="meterware")
    assert MeteringMiddleware(app_ok, registry=CollectorRegistry()).metering.config == Config()
    assert Config.load() == Config()
    assert [r.getMessage() for r in caplog.records] == [
        "meterware: config: none, the defaults (METERWARE_CONFIG=defaults); storage: memory://"
    ]
    monkeypatch.delenv("METERWARE_CONFIG")
    assert resolve_config({}, {}) == Config()


@pytest.mark.parametrize(
    ("given", "environment", "expected"),
    [
        pytest.param("file", {}, "file {path}", id="path"),
        pytest.param(None, {"METERWARE_CONFIG": "{path}"}, "file {path} (METERWARE_CONFIG)", id="env"),
        pytest.param(None, {}, "file {path} (the working directory)", id="working-directory"),
        pytest.param("dict", {}, "a dict (config=)", id="dict"),
        pytest.param("instance", {}, "a Config instance (config=)", id="instance"),
    ],
)
def test_start_up_logs_the_configuration_and_storage_in_use(
    given: str | None,
    environment: dict[str, str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One INFO line at start-up: where the configuration came from, and the storage (no password)."""
    url = "redis://app:s3cret@redis.internal:6379/0"
    path = write(tmp_path / "meterware.toml", f'[storage]\nurl = "{url}"\n')
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(path=path))
    config = {
        "file": str(path),
        "dict": {"storage": url},
        "instance": Config(storage=url),
        None: None,
    }[given]
    caplog.set_level(logging.INFO, logger="meterware")
    MeteringMiddleware(app_ok, config, registry=CollectorRegistry())
    (line,) = [r.getMessage() for r in caplog.records]
    assert (
        line == f"meterware: config: {expected.format(path=path)}; storage: redis://***@redis.internal:6379/0"
    )
    assert "s3cret" not in caplog.text


def test_the_django_setting_is_named_as_the_configuration(caplog: pytest.LogCaptureFixture) -> None:
    """Django's METERWARE setting is named in the start-up line and among the places searched."""
    caplog.set_level(logging.INFO, logger="meterware")
    resolve_config({"storage": "memory://"}, {}, given_as="the METERWARE setting")
    assert caplog.messages == ["meterware: config: the METERWARE setting; storage: memory://"]
    with pytest.raises(ConfigError, match=r"^no configuration found \(searched: the METERWARE setting, "):
        resolve_config(None, {}, given_as="the METERWARE setting")


def test_errors_from_keyword_arguments_name_arguments_as_source() -> None:
    """Without a file, errors are reported against 'arguments'."""
    with pytest.raises(ConfigError) as caught:
        Config.load(shards=3)
    assert str(caught.value) == "arguments: shards: is not a known setting"


# -- invalid configurations ----------------------------------------------------------------------------

TOKENS = {"tokens": {"aggregation": "sum", "source": "handler"}}
PEAK = {"peak": {"aggregation": "max", "source": "handler"}}
LAST = {"latest": {"aggregation": "last", "source": "handler"}}
UNIQUE = {"users": {"aggregation": "unique", "source": "handler"}}


def plan_meter(
    terms: dict[str, Any], meters: dict[str, Any] | None = None, meter: str = "tokens"
) -> dict[str, Any]:
    """A config whose plan 'p' has ``terms`` for ``meter``."""
    return {"meters": meters or TOKENS, "plans": {"p": {"meters": {meter: terms}}}}


INVALID = [
    # unknown keys, at every level
    pytest.param({"colour": "red"}, "colour", "is not a known setting", id="unknown-root"),
    pytest.param({"storage": {"host": "x"}}, "storage.host", "is not a known setting", id="unknown-storage"),
    pytest.param(
        {"meters": {"calls": {"agg": "sum"}}},
        "meters.calls.agg",
        "is not a known setting",
        id="unknown-meter",
    ),
    pytest.param(
        {"plans": {"p": {"limits": []}}}, "plans.p.limits", "is not a known setting", id="unknown-plan"
    ),
    pytest.param(
        plan_meter({"qouta": 5}),
        "plans.p.meters.tokens.qouta",
        "is not a known setting",
        id="unknown-plan-meter",
    ),
    pytest.param(
        {"routes": {"include": []}}, "routes.include", "is not a known setting", id="unknown-routes"
    ),
    pytest.param(
        {"policy": {"timeout_ms": 5}}, "policy.timeout_ms", "is not a known setting", id="unknown-policy"
    ),
    pytest.param({"pipeline": {"size": 5}}, "pipeline.size", "is not a known setting", id="unknown-pipeline"),
    pytest.param({"rollup": {"workers": 2}}, "rollup.workers", "is not a known setting", id="unknown-rollup"),
    # wrong types
    pytest.param([], "config", "must be a table, got a list", id="root-not-table"),
    pytest.param({"storage": 5}, "storage", "must be a string or a table, got an integer", id="storage-int"),
    pytest.param({"storage": {"url": 5}}, "storage.url", "must be a string, got an integer", id="url-int"),
    pytest.param(
        {"storage": {"shards": True}}, "storage.shards", "must be an integer, got a boolean", id="shards-bool"
    ),
    pytest.param(
        {"storage": {"shards": "16"}}, "storage.shards", "must be an integer, got a string", id="shards-str"
    ),
    pytest.param(
        {"storage": {"shards": 1.5}}, "storage.shards", "must be an integer, got a number", id="shards-float"
    ),
    pytest.param({"meters": []}, "meters", "must be a table, got a list", id="meters-list"),
    pytest.param(
        {"meters": {"calls": "count"}}, "meters.calls", "must be a table, got a string", id="meter-str"
    ),
    pytest.param(
        {"meters": {"t": {"source": "handler", "reserve": True}}},
        "meters.t.reserve",
        "must be an integer, got a boolean",
        id="reserve-bool",
    ),
    pytest.param({"plans": []}, "plans", "must be a table, got a list", id="plans-list"),
    pytest.param({"plans": {"p": 1}}, "plans.p", "must be a table, got an integer", id="plan-int"),
    pytest.param(
        {"plans": {"p": {"prepaid": "yes"}}},
        "plans.p.prepaid",
        "must be true or false, got a string",
        id="prepaid-str",
    ),
    pytest.param(
        {"plans": {"p": {"prepaid": 1}}},
        "plans.p.prepaid",
        "must be true or false, got an integer",
        id="prepaid-int",
    ),
    pytest.param(
        {"plans": {"p": {"rate_limits": "5/second"}}},
        "plans.p.rate_limits",
        "must be a list, got a string",
        id="rate-limits-str",
    ),
    pytest.param(
        {"plans": {"p": {"rate_limits": [5]}}},
        "plans.p.rate_limits[0]",
        "must be a non-empty string, got 5",
        id="rate-limit-int",
    ),
    pytest.param(
        {"plans": {"p": {"rate_limits": ["\u0663/second"]}}},
        "plans.p.rate_limits[0]",
        "expected a rate like",
        id="rate-limit-arabic-digit",
    ),
    pytest.param(
        {"plans": {"p": {"meters": {"calls": {"price": "9007199255"}}}}},
        "plans.p.meters.calls.price",
        "must be at most 9007199254 credits",
        id="price-beyond-exact-doubles",
    ),
    pytest.param(
        {"plans": {"p": {"meters": []}}},
        "plans.p.meters",
        "must be a table, got a list",
        id="plan-meters-list",
    ),
    pytest.param(
        plan_meter({"quota": True}),
        "plans.p.meters.tokens.quota",
        "must be an integer, got a boolean",
        id="quota-bool",
    ),
    pytest.param(
        plan_meter({"quota": 10.0}),
        "plans.p.meters.tokens.quota",
        "must be an integer, got a number",
        id="quota-float",
    ),
    pytest.param(
        plan_meter({"quota": -1}), "plans.p.meters.tokens.quota", "must be at least 0", id="quota-negative"
    ),
    pytest.param(
        plan_meter({"included": -1}),
        "plans.p.meters.tokens.included",
        "must be at least 0",
        id="included-negative",
    ),
    pytest.param(
        plan_meter({"included": False}),
        "plans.p.meters.tokens.included",
        "must be an integer, got a boolean",
        id="included-bool",
    ),
    pytest.param(
        plan_meter({"included": 2**53}),
        "plans.p.meters.tokens.included",
        "must be at most 9007199254740991",
        id="included-past-2-53",
    ),
    pytest.param(
        plan_meter({"quota_mode": "strict"}),
        "plans.p.meters.tokens.quota_mode",
        "must be one of 'hard', 'soft', got 'strict'",
        id="quota-mode",
    ),
    pytest.param(
        {"plans": {"p": {"period": "year"}}},
        "plans.p.period",
        "must be one of 'month', 'week', 'day', got 'year'",
        id="period",
    ),
    pytest.param(
        {"default_plan": 1}, "default_plan", "must be a string, got an integer", id="default-plan-int"
    ),
    pytest.param(
        {"routes": {"exclude": ["/health", ""]}},
        "routes.exclude[1]",
        "must be a non-empty string",
        id="exclude-empty",
    ),
    pytest.param({"routes": {"exclude": "/health"}}, "routes.exclude", "must be a list", id="exclude-str"),
    pytest.param(
        {"routes": {"weights": {"/x": True}}},
        'routes.weights."/x"',
        "must be an integer, got a boolean",
        id="weight-bool",
    ),
    pytest.param(
        {"routes": {"weights": {"/x": -1}}}, 'routes.weights."/x"', "must be at least 0", id="weight-negative"
    ),
    pytest.param({"routes": {"weights": []}}, "routes.weights", "must be a table", id="weights-list"),
    pytest.param(
        {"policy": {"bill_client_errors": 1}},
        "policy.bill_client_errors",
        "must be true or false, got an integer",
        id="bill-int",
    ),
    pytest.param(
        {"policy": {"on_backend_error": "fail"}},
        "policy.on_backend_error",
        "must be one of 'open', 'closed', got 'fail'",
        id="failure-mode",
    ),
    pytest.param({"policy": {"key_query": 1}}, "policy.key_query", "must be a string", id="key-query-int"),
    pytest.param(
        {"policy": {"timeout": "1s"}},
        "policy.timeout",
        "must be an integer or a number, got a string",
        id="timeout-str",
    ),
    pytest.param(
        {"policy": {"timeout": True}},
        "policy.timeout",
        "must be an integer or a number, got a boolean",
        id="timeout-bool",
    ),
    pytest.param(
        {"policy": {"refund_aborted_streams": "yes"}},
        "policy.refund_aborted_streams",
        "must be true or false, got a string",
        id="refund-aborted-str",
    ),
    pytest.param(
        {"policy": {"strip_usage_headers": "no"}},
        "policy.strip_usage_headers",
        "must be true or false",
        id="strip-str",
    ),
    pytest.param(
        {"pipeline": {"batch_size": 0}}, "pipeline.batch_size", "must be at least 1, got 0", id="batch-0"
    ),
    pytest.param(
        {"pipeline": {"buffer_size": True}},
        "pipeline.buffer_size",
        "must be an integer, got a boolean",
        id="buf-bool",
    ),
    pytest.param(
        {"pipeline": {"spool_dir": 1}}, "pipeline.spool_dir", "must be a string", id="spool-dir-int"
    ),
    pytest.param(
        {"pipeline": {"spool_max_bytes": -1}},
        "pipeline.spool_max_bytes",
        "must be at least 0",
        id="spool-negative",
    ),
    pytest.param(
        {"rollup": {"batch_size": 0}}, "rollup.batch_size", "must be at least 1", id="rollup-batch-0"
    ),
    # rate strings
    *(
        pytest.param(
            {"plans": {"p": {"rate_limits": ["1/second", text]}}},
            "plans.p.rate_limits[1]",
            problem,
            id=f"rate-{name}",
        )
        for name, text, problem in [
            ("no-unit", "5", "expected a rate like '10/second'"),
            ("fortnight", "5/fortnight", "expected a rate like"),
            ("double-slash", "5//second", "expected a rate like"),
            ("words", "five/second", "expected a rate like"),
            ("negative", "-1/second", "expected a rate like"),
            ("fraction", "0.5/second", "expected a rate like"),
            ("empty", " ", "expected a rate like"),
            ("zero", "0/second", "rate must be positive, got '0/second'"),
            ("zero-window", "5/0 seconds", "rate must be positive"),
        ]
    ),
    # meters
    pytest.param(
        {"meters": {"calls": {"aggregation": "avg"}}},
        "meters.calls.aggregation",
        "must be one of 'count', 'sum', 'max', 'last', 'unique', got 'avg'",
        id="aggregation",
    ),
    pytest.param(
        {"meters": {"calls": {"source": "body"}}},
        "meters.calls.source",
        "must be one of 'call', 'handler', 'response_bytes', 'request_bytes', 'duration_ms', 'header:<Name>'",
        id="source",
    ),
    pytest.param(
        {"meters": {"calls": {"source": "header:"}}},
        "meters.calls.source",
        "'header:' does not name a valid header",
        id="source-empty-header",
    ),
    pytest.param(
        {"meters": {"calls": {"source": "header:X Usage"}}},
        "meters.calls.source",
        "does not name a valid header",
        id="source-header-space",
    ),
    pytest.param(
        {"meters": {"calls": {"source": "header:X-Usage\n"}}},
        "meters.calls.source",
        "does not name a valid header",
        id="source-header-newline",
    ),
    pytest.param(
        {"meters": {"u": {"aggregation": "unique"}}},
        "meters.u.source",
        "a 'unique' meter counts values reported by the handler",
        id="unique-from-call",
    ),
    pytest.param(
        {"meters": {"u": {"aggregation": "unique", "source": "header:X-User"}}},
        "meters.u.source",
        "a 'unique' meter counts values reported by the handler",
        id="unique-from-header",
    ),
    pytest.param(
        {"meters": {"calls": {"reserve": 5}}},
        "meters.calls.reserve",
        "only value meters hold an estimate",
        id="reserve-on-call-meter",
    ),
    pytest.param(
        {"meters": {"t": {"source": "handler", "reserve": -1}}},
        "meters.t.reserve",
        "must be at least 0",
        id="reserve-neg",
    ),
    pytest.param(
        {"meters": {"bad name": {}}}, 'meters."bad name"', "is not a valid name", id="meter-name-space"
    ),
    pytest.param({"meters": {"x" * 65: {}}}, f"meters.{'x' * 65}", "at most 64", id="meter-name-long"),
    pytest.param({"plans": {"_p": {}}}, "plans._p", "is not a valid name", id="plan-name-underscore-first"),
    pytest.param({"": 1}, '""', "is not a known setting", id="empty-key-quoted"),
    pytest.param(
        {"plans": {"pro.v2": {"prepaid": 1}}},
        'plans."pro.v2".prepaid',
        "must be true or false",
        id="dotted-plan-name-quoted",
    ),
    pytest.param({"plans": {"free\n": {}}}, 'plans."free\\n"', "is not a valid name", id="plan-name-newline"),
    # quotas on meters that do not add up; prices on those priced only on invoices, or not at all
    *(
        pytest.param(
            plan_meter({"quota": 10}, meters, meter),
            f"plans.p.meters.{meter}.quota",
            f"a '{kind}' meter cannot carry a quota",
            id=f"{kind}-quota",
        )
        for meters, meter, kind in [(PEAK, "peak", "max"), (LAST, "latest", "last")]
    ),
    pytest.param(
        {"meters": PEAK, "plans": {"p": {"prepaid": True, "meters": {"peak": {"price": "0.1"}}}}},
        "plans.p.meters.peak.price",
        "a 'max' meter is priced on invoices",
        id="max-price-prepaid",
    ),
    *(
        pytest.param(
            plan_meter(terms, UNIQUE, "users"),
            f"plans.p.meters.users.{next(iter(terms))}",
            f"a 'unique' meter cannot carry a {next(iter(terms))}",
            id=f"unique-{next(iter(terms))}",
        )
        for terms in ({"quota": 10}, {"price": "0.1"}, {"included": 5})
    ),
    # prices
    pytest.param(
        plan_meter({"price": "0.0000001"}),
        "plans.p.meters.tokens.price",
        "must be a number of credits with at most 6 decimals, got '0.0000001'",
        id="price-7-decimals",
    ),
    pytest.param(
        plan_meter({"price": "-0.5"}),
        "plans.p.meters.tokens.price",
        "must not be negative, got '-0.5'",
        id="price-neg",
    ),
    pytest.param(
        plan_meter({"price": -1}), "plans.p.meters.tokens.price", "must not be negative", id="price-neg-int"
    ),
    pytest.param(
        plan_meter({"price": "cheap"}),
        "plans.p.meters.tokens.price",
        "must be a number of credits, got 'cheap'",
        id="price-words",
    ),
    pytest.param(
        plan_meter({"price": 0.5}),
        "plans.p.meters.tokens.price",
        'must be a decimal string like "0.002" or an integer, got a number',
        id="price-float",
    ),
    pytest.param(
        plan_meter({"price": True}),
        "plans.p.meters.tokens.price",
        'must be a decimal string like "0.002" or an integer, got a boolean',
        id="price-bool",
    ),
    *(
        pytest.param(
            plan_meter({"price": text}), "plans.p.meters.tokens.price", "must be a number of credits", id=name
        )
        for name, text in [
            ("price-inf", "Infinity"),
            ("price-nan", "NaN"),
            ("price-snan", "sNaN"),
            ("price-huge-exponent", "1e999999"),
            ("price-tiny-exponent", "1e-9999999"),
        ]
    ),
    pytest.param(
        plan_meter({"price": "12345678901234567890123456789"}),
        "plans.p.meters.tokens.price",
        "must be at most 9007199254 credits",
        id="price-29-digits",
    ),
    # plans referring to what does not exist
    pytest.param(
        {"plans": {"p": {"meters": {"tokens": {"price": "1"}}}}},
        "plans.p.meters.tokens",
        "names no meter defined under [meters] (known: calls)",
        id="unknown-meter-in-plan",
    ),
    pytest.param(
        {"plans": {"free": {}}, "default_plan": "gold"},
        "default_plan",
        "names no plan defined under [plans] (known: free)",
        id="unknown-default-plan",
    ),
    # headers
    pytest.param(
        {"policy": {"key_headers": ["authorization", "x api key"]}},
        "policy.key_headers[1]",
        "'x api key' is not a valid header name",
        id="key-header-space",
    ),
    pytest.param(
        {"policy": {"key_headers": ["x-key:"]}},
        "policy.key_headers[0]",
        "is not a valid header name",
        id="key-header-colon",
    ),
    pytest.param(
        {"policy": {"key_headers": ["x-key\n"]}},
        "policy.key_headers[0]",
        "is not a valid header name",
        id="key-header-newline",
    ),
    pytest.param(
        {"policy": {"balance_header": "X-Credits Left"}},
        "policy.balance_header",
        "'X-Credits Left' is not a valid header name",
        id="balance-header-space",
    ),
    pytest.param(
        {"policy": {"admission": "optimistic"}},
        "policy.admission",
        "must be one of 'strict', 'lease'",
        id="admission-unknown",
    ),
    pytest.param(
        {"policy": {"lease_calls": 0}},
        "policy.lease_calls",
        "at least 1",
        id="lease-calls-zero",
    ),
    pytest.param(
        {"policy": {"key_headers": [""]}},
        "policy.key_headers[0]",
        "must be a non-empty string",
        id="kh-empty",
    ),
    pytest.param(
        {"policy": {"key_headers": "authorization"}}, "policy.key_headers", "must be a list", id="kh-str"
    ),
    # storage
    pytest.param(
        {"storage": "localhost:6379"}, "storage.url", "must be a URL like 'memory://'", id="url-no-scheme"
    ),
    pytest.param({"storage": {"url": ""}}, "storage.url", "must be a URL like", id="url-empty"),
    pytest.param({"storage": "http://localhost"}, "storage.url", "unknown scheme 'http'", id="url-http"),
    pytest.param({"storage": "mongodb://x"}, "storage.url", "unknown scheme 'mongodb'", id="url-mongodb"),
    pytest.param({"storage": "redis://h:port/0"}, "storage.url", "Port could not be cast", id="url-bad-port"),
    pytest.param({"storage": "redis://h:70000/0"}, "storage.url", "Port out of range", id="url-port-range"),
    pytest.param(
        {"storage": "redis://h:1/0?socket_timeout=x"}, "storage.url", "'socket_timeout'", id="url-bad-option"
    ),
    pytest.param({"storage": "redis+cluster://h:x"}, "storage.url", "'h:x' has a bad port", id="url-cluster"),
    pytest.param(
        {"storage": "redis+sentinel://h:1"}, "storage.url", "must name the service", id="url-sentinel"
    ),
    pytest.param(
        {"plans": {"pro": {"meters": {"calls": {"price": "1000000000"}}}}},
        "plans.pro.meters.calls.price",
        "a call may cost at most 999999999.999999 credits, one would cost 1000000000.000000 here",
        id="call-costs-too-much",
    ),
    pytest.param(
        {
            "meters": {"units": {"aggregation": "sum"}},
            "plans": {"pro": {"meters": {"units": {"price": "1000"}}}},
            "routes": {"weights": {"/v1/batch": 1_000_000}},
        },
        "plans.pro.meters.units.price",
        "(at route weight 1000000)",
        id="weighted-call-costs-too-much",
    ),
    pytest.param({"storage": {"shards": 0}}, "storage.shards", "must be at least 1, got 0", id="shards-0"),
    pytest.param(
        {"storage": {"shards": -4}}, "storage.shards", "must be at least 1, got -4", id="shards-negative"
    ),
    pytest.param(
        {"storage": {"shards": 1025}}, "storage.shards", "must be at most 1024, got 1025", id="shards-1025"
    ),
    # durations
    *(
        pytest.param(
            {section: {key: value}}, f"{section}.{key}", "must be a positive number of seconds", id=name
        )
        for name, section, key, value in [
            ("timeout-0", "policy", "timeout", 0),
            ("timeout-negative", "policy", "timeout", -0.5),
            ("timeout-nan", "policy", "timeout", float("nan")),
            ("timeout-inf", "policy", "timeout", float("inf")),
            ("timeout-huge-int", "policy", "timeout", 10**400),
            ("reservation-timeout-0", "policy", "reservation_timeout", 0),
            ("flush-interval-0", "pipeline", "flush_interval", 0),
            ("lease-negative", "rollup", "lease_seconds", -5),
            ("retention-0", "rollup", "retention_seconds", 0.0),
        ]
    ),
    pytest.param(
        {"policy": {"key_cache_ttl": -1}}, "policy.key_cache_ttl", "must not be negative", id="cache-ttl-neg"
    ),
]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis//:s3cret@h:6379/0", id="no-scheme"),
        pytest.param("redis://:s3cret@h:port/0", id="bad-port"),
        pytest.param("redis://u:s3cret@h:1/0?socket_timeout=s3cret", id="bad-option"),
        pytest.param("redis+cluster://:s3cret@h:x", id="cluster-bad-port"),
        pytest.param("redis+sentinel://:s3cret@h:1", id="sentinel-no-service"),
    ],
)
def test_storage_url_errors_never_show_the_password(url: str) -> None:
    """A mistake in a storage URL is named without repeating its credentials (logs are widely read)."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"storage": url})
    assert caught.value.field == "storage.url"
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("data", "field", "problem"), INVALID)
def test_invalid_config_names_field_and_problem_in_one_line(data: Any, field: str, problem: str) -> None:
    """Every mistake raises one ConfigError '<source>: <field>: <problem>' naming the dotted field."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(data, source="meterware.toml")
    error = caught.value
    assert error.field == field
    assert error.source == "meterware.toml"
    assert problem in error.problem
    assert str(error) == f"meterware.toml: {field}: {error.problem}"
    assert "\n" not in error.problem


def test_key_cache_ttl_zero_disables_the_cache() -> None:
    """key_cache_ttl may be 0 (no caching), unlike the other durations."""
    assert Config.from_dict({"policy": {"key_cache_ttl": 0}}).policy.key_cache_ttl == 0.0


def test_zero_priced_max_meter_is_allowed() -> None:
    """A max meter may appear in a plan as long as it carries no quota, included units or price."""
    config = Config.from_dict(plan_meter({"price": "0"}, PEAK, "peak"))
    assert config.plans["p"].meters["peak"] == MeterTerms()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(
            "shards = \n", "is not valid TOML (Invalid value (at line 1, column 10))", id="no-value"
        ),
        pytest.param(
            "[storage\n", "is not valid TOML (Expected ']' at the end of a table declaration", id="table"
        ),
        pytest.param("a = 1\na = 2\n", "is not valid TOML (Cannot overwrite a value", id="duplicate-key"),
        pytest.param(
            "a = " + "1" * 5000, "is not valid TOML (Exceeds the limit (4300 digits)", id="long-int"
        ),
    ],
)
def test_invalid_toml_is_one_line_error(text: str, problem: str, tmp_path: Path) -> None:
    """A file that is not TOML is reported as '<file>: file: is not valid TOML (...)' on one line."""
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        Config.from_file(path)
    assert caught.value.field == "file"
    assert str(caught.value).startswith(f"{path}: file: {problem}")
    assert "\n" not in str(caught.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """Config.from_file on a missing path names the file and says it does not exist."""
    with pytest.raises(ConfigError) as caught:
        Config.from_file(tmp_path / "missing.toml")
    assert str(caught.value) == f"{tmp_path / 'missing.toml'}: file: does not exist"


def test_directory_instead_of_file_is_an_error(tmp_path: Path) -> None:
    """A path that cannot be read as a file is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError) as caught:
        Config.from_file(tmp_path)
    assert caught.value.field == "file"
    assert "cannot be read" in caught.value.problem


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    """Validation errors found in a file name that file as their source."""
    path = write(tmp_path / "meterware.toml", '[plans.tokens.meters.tokens]\nprice = "0.0000001"\n')
    with pytest.raises(ConfigError) as caught:
        Config.load(path)
    assert caught.value.field == "plans.tokens.meters.tokens"
    assert str(caught.value).startswith(f"{path}: plans.tokens.meters.tokens: names no meter")


def test_readme_error_example_is_what_meterware_says(tmp_path: Path) -> None:
    """The README's sample error is the message meterware gives for a price with 7 decimals."""
    text = EXAMPLE.read_text(encoding="utf-8").replace('price = "0.00002"', 'price = "0.0000001"')
    path = write(tmp_path / "meterware.toml", text)
    with pytest.raises(ConfigError) as caught:
        Config.from_file(path.name)
    expected = (
        "meterware.toml: plans.tokens.meters.tokens.price: "
        "must be a number of credits with at most 6 decimals, got '0.0000001'"
    )
    assert str(caught.value) == expected
    assert f"meterware: error: {expected}" in (ROOT / "README.md").read_text(encoding="utf-8")


# -- property: nothing but a Config or a ConfigError ---------------------------------------------------

_KNOWN_KEYS = [
    *(
        "storage",
        "url",
        "shards",
        "meters",
        "plans",
        "default_plan",
        "routes",
        "policy",
        "pipeline",
        "rollup",
    ),
    *("aggregation", "source", "reserve", "rate_limits", "period", "prepaid", "quota", "quota_mode"),
    *("included", "price", "exclude", "weights", "on_backend_error", "bill_client_errors", "key_headers"),
    *("key_query", "timeout", "reservation_timeout", "key_cache_ttl", "batch_size", "flush_interval"),
    *("buffer_size", "spool_dir", "spool_max_bytes", "lease_seconds", "retention_seconds", "calls", "free"),
]
_INTERESTING_TEXT = [
    *("memory://", "redis://h:1/0", "count", "sum", "max", "unique", "handler", "call", "header:X-T"),
    *("5/second", "1 per 5 minutes", "0.002", "-1", "1e999999", "sNaN", "month", "soft", "closed", "/x*"),
]
_keys = st.sampled_from(_KNOWN_KEYS) | st.text(max_size=6)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(_INTERESTING_TEXT)
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200)
@given(st.dictionaries(_keys, _json, max_size=6))
def test_from_dict_returns_config_or_raises_config_error(data: dict[str, Any]) -> None:
    """Any JSON-like dict gives a Config or a ConfigError naming a field, never another exception."""
    result = parse_or_error(data)
    if isinstance(result, ConfigError):
        assert result.field
        assert str(result) == f"{result.field}: {result.problem}"
        assert "\n" not in str(result)
    else:
        assert result.default_plan in result.plans


def parse_or_error(data: dict[str, Any]) -> Config | ConfigError:
    try:
        return Config.from_dict(data)
    except ConfigError as error:
        return error


# -- fuzz: TOML files, and configurations that parse must serve (pytest -m faults) --------------------------


def toml_value(value: Any) -> str | None:
    """``value`` written as TOML (inline tables and arrays), or None for what TOML cannot hold."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's; a lone surrogate's is not (a TOML error)
    if isinstance(value, list):
        return "[" + ", ".join(v for v in map(toml_value, value) if v is not None) + "]"
    pairs = ((json.dumps(k), toml_value(v)) for k, v in value.items())
    return "{" + ", ".join(f"{k} = {v}" for k, v in pairs if v is not None) + "}"


def toml_document(data: dict[str, Any]) -> bytes:
    lines = [f"{json.dumps(key)} = {text}" for key, value in data.items() if (text := toml_value(value))]
    return "\n".join(lines).encode()


@st.composite
def mangled(draw: st.DrawFn, document: bytes) -> bytes:
    """``document`` with a few bytes deleted, replaced or inserted (often none)."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(document)))
        cut = draw(st.integers(0, 8))
        document = document[:at] + draw(st.binary(max_size=4)) + document[at + cut :]
    return document


@pytest.mark.faults
@settings(max_examples=300)
@given(st.dictionaries(_keys, _json, max_size=6).map(toml_document).flatmap(mangled))
def test_any_toml_file_gives_a_config_or_one_line_error(document: bytes) -> None:
    """Any file, valid TOML or not, gives a Config or a one-line ConfigError naming the file; never a
    traceback."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "meterware.toml"
        path.write_bytes(document)
        result = load_or_error(path)
    if isinstance(result, ConfigError):
        assert result.source == str(path)
        assert "\n" not in str(result)
        assert str(result) == f"{path}: {result.field}: {result.problem}"
    else:
        assert result.default_plan in result.plans


def load_or_error(path: Path) -> Config | ConfigError:
    try:
        return Config.from_file(path)
    except ConfigError as error:
        return error


_METER_NAMES = ("calls", "tokens", "bytes", "peak", "users")


@st.composite
def plausible_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Configurations shaped like real ones, with values anywhere in their ranges (and some beyond)."""
    meters: dict[str, dict[str, Any]] = {}
    for name in draw(st.lists(st.sampled_from(_METER_NAMES), min_size=1, max_size=4, unique=True)):
        source = draw(
            st.sampled_from(
                ["call", "handler", "response_bytes", "request_bytes", "duration_ms", "header:X-U"]
            )
        )
        aggregation = "unique" if source == "handler" and draw(st.booleans()) else "count"
        if aggregation != "unique" and source != "call":
            aggregation = draw(st.sampled_from(["sum", "max", "last"]))
        meters[name] = {"aggregation": aggregation, "source": source}
        if source != "call" and draw(st.booleans()):
            meters[name]["reserve"] = draw(st.integers(0, 10**6))
    plans = {}
    for plan in draw(st.lists(st.sampled_from(["free", "payg", "pro"]), min_size=1, max_size=3, unique=True)):
        terms = {}
        for name in draw(st.lists(st.sampled_from(sorted(meters)), max_size=3, unique=True)):
            terms[name] = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "quota": st.integers(0, 10**9),
                        "quota_mode": st.sampled_from(["hard", "soft"]),
                        "included": st.integers(0, 10**9),
                        "price": st.sampled_from(
                            ["0", "0.000001", "0.002", "1", "999999.999999", "9007199254"]
                        ),
                    },
                )
            )
        rates = draw(
            st.lists(st.sampled_from(["1/second", "5/second", "100/minute", "3 per 2 hours"]), max_size=2)
        )
        plans[plan] = {
            "rate_limits": rates,
            "prepaid": draw(st.booleans()),
            "period": draw(st.sampled_from(["month", "week", "day"])),
            "meters": terms,
        }
    globs = st.lists(st.sampled_from(["/v1/*", "/health", "/v1/a*", "*", "/v1/b/?"]), max_size=2)
    return {
        "storage": {"url": f"memory://fuzz-{uuid.uuid4().hex}", "shards": draw(st.integers(1, 8))},
        "meters": meters,
        "plans": plans,
        "routes": {
            "exclude": draw(globs),
            "live_only": draw(globs),
            "weights": draw(st.dictionaries(st.sampled_from(["/v1/*", "/v1/b*"]), st.integers(0, 10**6))),
        },
        "policy": {
            "on_backend_error": draw(st.sampled_from(["open", "closed"])),
            "bill_client_errors": draw(st.booleans()),
            "key_cache_ttl": draw(st.sampled_from([0, 0.5, 10])),
        },
        "pipeline": {"batch_size": draw(st.integers(1, 5)), "buffer_size": draw(st.integers(1, 5))},
    }


@pytest.mark.faults
@settings(max_examples=100)
@example(  # found by reasoning, then by this test: a valid price whose call cost the rollup refused
    {"storage": "memory://fuzz-price", "plans": {"pro": {"meters": {"calls": {"price": "9007199254"}}}}},
    "/v1/a",
    [],
    True,
)
@given(
    plausible_configs(),
    st.sampled_from(["/v1/a", "/v1/b/1", "/health", "/v1/../health", "/other"]),
    st.lists(
        st.tuples(
            st.sampled_from([*_METER_NAMES, "nope"]),
            st.one_of(st.integers(-5, 2**60), st.floats(), st.text(max_size=5), st.none()),
        ),
        max_size=3,
    ),
    st.booleans(),
)
def test_a_config_that_parses_never_fails_a_request(
    data: dict[str, Any], path: str, units: list[tuple[str, Any]], live: bool
) -> None:
    """Whatever a valid configuration says, calls get an answer and their events settle and roll up: the
    configuration fails at start-up or not at all."""
    try:
        config = Config.from_dict(data)
    except ConfigError:
        return
    accounts = Accounts.open(config)
    accounts.create_customer("fuzz")
    accounts.grant_credits("fuzz", "1000")
    key = accounts.create_key("fuzz", live=live).plaintext

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for meter, value in units:
            meterware.usage.add(meter, value)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-u", b"7")]})
        await send({"type": "http.response.body", "body": b"ok"})

    registry = CollectorRegistry()
    middleware = MeteringMiddleware(app, config=config, registry=registry)

    async def serve() -> list[int]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            statuses = [
                (await client.get(path, headers={"Authorization": f"Bearer {key}"})).status_code
                for _ in range(3)
            ]
        await middleware.drain()
        return statuses

    statuses = asyncio.run(serve())
    assert set(statuses) <= {200, 402, 403, 429}, statuses
    # Every call of a known customer is an event (or a counted drop, past a tiny buffer), rolled up:
    # none became a dead letter.
    usage = accounts.usage("fuzz", live=live)
    dropped = int(registry.get_sample_value("meterware_events_dropped_total") or 0)
    excluded = config.routes.is_excluded(httpx.URL(f"http://test{path}").path)  # as httpx sends it
    assert sum(usage.calls.values()) + dropped == (0 if excluded else 3)
    if not dropped:
        assert usage.calls["success"] == (0 if excluded else statuses.count(200))
    assert usage.spend >= 0

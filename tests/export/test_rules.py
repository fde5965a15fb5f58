"""The pure parts of the export (ids, backoff, the [export.*] section) and its CLI."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from meterware.billing.export import backoff_delay, event_id
from meterware.cli import main
from meterware.config import Config
from meterware.errors import ConfigError

LONG = "a" * 100
HASHED = "mw:" + hashlib.sha256(f"mw:{LONG}:calls:hour:3600".encode()).hexdigest()[:40]


@pytest.mark.parametrize(
    ("customer", "revision", "limit", "expected"),
    [
        pytest.param("acme", 1, None, "mw:acme:calls:hour:3600", id="first"),
        pytest.param("acme", 2, None, "mw:acme:calls:hour:3600:r2", id="revision"),
        pytest.param("acme", 1, 100, "mw:acme:calls:hour:3600", id="within-limit"),
        pytest.param(LONG, 1, 100, HASHED, id="hashed-past-limit"),
        pytest.param(LONG, 1, None, f"mw:{LONG}:calls:hour:3600", id="no-limit"),
    ],
)
def test_event_ids_are_deterministic(customer: str, revision: int, limit: int | None, expected: str) -> None:
    """Ids name customer, meter, window and start; revisions add ``:r<n>``; ids past the limit are hashed."""
    assert event_id(customer, "calls", "hour", 3600, revision, limit) == expected


def test_backoff_prefers_retry_after_else_full_jitter_capped() -> None:
    """Retry-After wins; otherwise a random share of 0.5 s doubling per attempt, never past 30 s."""
    assert backoff_delay(3, 7.0) == 7.0
    assert [backoff_delay(attempt, None, lambda: 1.0) for attempt in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert backoff_delay(4, None, lambda: 0.0) == 0.0


METERS = {"calls": {}, "peak": {"aggregation": "max", "source": "handler"}}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        pytest.param({"nope": {}}, "export.nope: is not a known provider", id="unknown-provider"),
        pytest.param({"stripe": {}}, "export.stripe.meters: must map at least one meter", id="no-meters"),
        pytest.param(
            {"stripe": {"meters": {"tokens": "t"}}},
            "export.stripe.meters.tokens: names no meter",
            id="unknown-meter",
        ),
        pytest.param(
            {"stripe": {"meters": {"peak": "p"}}},
            "export.stripe.meters.peak: a 'max' meter cannot be exported",
            id="max-meter",
        ),
        pytest.param(
            {"dodo": {"meters": {"calls": ""}}},
            "export.dodo.meters.calls: must be the provider's event name",
            id="empty-name",
        ),
        pytest.param(
            {"lago": {"meters": {"calls": "c"}, "api_key_env": "MY KEY"}},
            "export.lago.api_key_env: must name an environment variable",
            id="bad-env",
        ),
        pytest.param(
            {"openmeter": {"meters": {"calls": "c"}, "base_url": "ftp://x"}},
            "export.openmeter.base_url: must be an http:// or https:// URL",
            id="bad-url",
        ),
        pytest.param(
            {"stripe": {"meters": {"calls": "c"}, "window": "period"}},
            "export.stripe.window: must be one of 'minute', 'hour', 'day'",
            id="period-window",
        ),
        pytest.param(
            {"stripe": {"meters": {"calls": "c"}, "max_attempts": 50}},
            "export.stripe.max_attempts: must be at most 20",
            id="attempts",
        ),
        pytest.param(
            {"stripe": {"meters": {"calls": "c"}, "api_key": "sk_live"}},
            "export.stripe.api_key: is not a known setting",
            id="key-in-file",
        ),
    ],
)
def test_export_section_errors_name_the_field(section: dict[str, Any], message: str) -> None:
    """Each mistake in [export.<provider>] is one line naming the field."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Config.from_dict({"meters": METERS, "export": section})


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "meterware.toml"
    path.write_text(
        f'storage = "memory://cli-export-{uuid.uuid4().hex}"\n'
        "[meters.calls]\n"
        "[export.openmeter]\n"
        'meters = { calls = "api_calls" }\n'
        'api_key_env = "METERWARE_TEST_OPENMETER_KEY"\n'
        'base_url = "http://127.0.0.1:9"\n'
    )
    return str(path)


def test_cli_external_ids_and_export_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """customers set --external-id stores the id (shown by customers show); export --dry-run sends nothing."""
    config = write_config(tmp_path)
    assert main(["customers", "create", "acme", "--config", config]) == 0
    assert (
        main(["customers", "set", "acme", "--external-id", "openmeter=subject-acme", "--config", config]) == 0
    )
    capsys.readouterr()
    assert main(["customers", "show", "acme", "--json", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["external_ids"] == {"openmeter": "subject-acme"}
    assert main(["customers", "set", "acme", "--external-id", "openmeter", "--config", config]) == 1
    assert "--external-id must be PROVIDER=ID" in capsys.readouterr().err
    assert main(["customers", "set", "acme", "--external-id", "paypal=x", "--config", config]) == 1
    assert "provider must be one of stripe, dodo, openmeter, lago" in capsys.readouterr().err

    assert main(["export", "openmeter", "--dry-run", "--json", "--config", config]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["provider"], report["dry_run"], report["sent"], report["requests"]) == (
        "openmeter",
        True,
        [],
        0,
    )

    monkeypatch.delenv("METERWARE_TEST_OPENMETER_KEY", raising=False)
    assert main(["export", "openmeter", "--config", config]) == 1
    assert "set the API key in $METERWARE_TEST_OPENMETER_KEY" in capsys.readouterr().err
    assert main(["export", "stripe", "--config", config]) == 1
    assert "no [export.stripe] section" in capsys.readouterr().err

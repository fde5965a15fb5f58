"""CI runs what the README tells a new user to run, with exact versions."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """The command under "Run the test suite" is the last line of .ci/run, character for character."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Run the test suite**") :]
    command = re.search(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert command is not None
    assert (ROOT / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1] == command.group(1)


def test_the_constraints_pin_every_package_exactly() -> None:
    """ci/constraints.txt holds only exact pins (name==version), the test tools among them."""
    lines = [
        line for line in (ROOT / "ci" / "constraints.txt").read_text().splitlines() if line[:1] not in "#"
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line) for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    tools = {"pytest", "pytest-cov", "mypy", "ruff"}
    assert tools | {"redis", "starlette", "werkzeug", "django", "gunicorn"} <= names


def test_pre_commit_runs_the_ruff_ci_runs() -> None:
    """The ruff hooks of .pre-commit-config.yaml pin the ruff of ci/constraints.txt."""
    pinned = re.search(r"^ruff==(\S+)$", (ROOT / "ci" / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    hooks = re.findall(r'"ruff==([^"]+)"', (ROOT / ".pre-commit-config.yaml").read_text())
    assert hooks == [pinned.group(1)] * 2

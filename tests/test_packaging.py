"""The built artifacts: `python -m build` makes a wheel and an sdist that pass `twine check`, the wheel holds
every file of the package (the Lua scripts and the portal's static files too), and the wheel installed in a
fresh venv, not editable, runs the demo."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_cli import checked_demo_output

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "meterware"
# What a clone accumulates (virtualenvs, caches, test output, earlier builds) and no artifact may carry.
JUNK = {
    "__pycache__",
    ".venv",
    ".tox",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".meterware-spool",
    ".benchmarks",
    "test-artifacts",
    "htmlcov",
    "dist",
}


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


def run(*command: str | Path, what: str, cwd: Path | None = None, timeout: float = 240) -> str:
    """Run a command; fail the test with its output and what it needed if it exits non-zero."""
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{output}")
    return result.stdout


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel `python -m build` builds from it (not from the tree), built once."""
    outdir = tmp_path_factory.mktemp("dist")
    run(
        sys.executable,
        "-m",
        "build",
        "--outdir",
        outdir,
        ROOT,
        what="python -m build (the [test] extra has it; it fetches hatchling from the package index)",
    )
    (wheel,) = outdir.glob("meterware-*-py3-none-any.whl")
    (sdist,) = outdir.glob("meterware-*.tar.gz")
    return Dist(wheel, sdist)


def package_files() -> set[str]:
    """Every file of src/meterware, as a path inside the package's parent (``meterware/...``)."""
    return {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and not JUNK & set(path.parts) and path.suffix != ".pyc"
    }


def test_twine_check_passes(dist: Dist) -> None:
    """The wheel's and the sdist's metadata (the README as the long description) render as PyPI needs."""
    out = run(sys.executable, "-m", "twine", "check", "--strict", dist.wheel, dist.sdist, what="twine check")
    assert out.count("PASSED") == 2, out


def test_the_wheel_holds_the_package_data(dist: Dist) -> None:
    """The wheel holds exactly the source tree's files of the package: every .py module and every data file
    (the Lua scripts, the portal's stylesheet, py.typed), so a new data file cannot be left out."""
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = wheel.namelist()
    packaged = {name for name in names if name.startswith("meterware/")}
    assert {name for name in names if ".dist-info/" not in name} == packaged
    data = {name for name in package_files() if not name.endswith(".py")}
    lua = {f"meterware/storage/lua/{path.name}" for path in (PACKAGE / "storage" / "lua").glob("*.lua")}
    assert len(lua) >= 18
    assert lua | {"meterware/portal/static/portal.css", "meterware/py.typed"} <= data
    assert data <= packaged, data - packaged
    assert packaged == package_files()


def test_the_sdist_holds_the_sources_and_tests_and_no_junk(dist: Dist) -> None:
    """The sdist carries what a build and a run of the suite need, and none of a clone's local state."""
    with tarfile.open(dist.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    top = {name.split("/")[0] for name in names}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "PKG-INFO", "src", "tests"} <= top
    assert {"examples", "ci", ".ci", "tox.ini"} <= top  # read by the tests
    assert {"compose.yaml", "Dockerfile", ".dockerignore", "deploy"} <= top  # tests/test_deploy.py
    assert {f"src/{name}" for name in package_files()} <= names
    assert "tests/conftest.py" in names
    junk = sorted(name for name in names if JUNK & set(name.split("/")) or name.endswith(".pyc"))
    assert not junk


@pytest.mark.timeout(600)
def test_the_wheel_installed_in_a_fresh_venv_runs_the_demo(dist: Dist, tmp_path: Path) -> None:
    """`pip install "meterware-*.whl[demo]"` into a new venv (its dependencies from the package index, at
    CI's versions), then that venv's `meterware demo`, away from the source tree, prints the usage table."""
    venv = tmp_path / "venv"
    # This pytest's pip installs into the new venv (`--python`): the same install, without the seconds
    # ensurepip and bytecode compilation take.
    run(sys.executable, "-m", "venv", "--without-pip", venv, what="python -m venv")
    python = venv / "bin" / "python"
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-compile",
        "--constraint",
        ROOT / "ci" / "constraints.txt",
        f"{dist.wheel}[demo]",
        what="pip install of the wheel with its [demo] extra (its dependencies come from the package index: "
        "is the network reachable?)",
    )
    where = run(python, "-c", "import meterware; print(meterware.__file__)", cwd=tmp_path, what="import")
    assert Path(where.strip()).is_relative_to(venv)  # the installed copy, not the source tree

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [venv / "bin" / "meterware", "demo"],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    lines = checked_demo_output(result)
    assert lines[-1].split() == ["total", "0.03"]  # the invoice preview, the summary's last line

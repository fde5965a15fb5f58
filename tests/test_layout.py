"""The package's shape: modules import one way, stay small, and ``import meterware`` stays cheap."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

import meterware

PACKAGE = Path(meterware.__file__).parent
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too (a local import still runs), but not the ones under
    ``if TYPE_CHECKING:``, which never run."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def with_parents(name: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = name.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts) + 1)} & MODULES.keys()


def dependencies(name: str) -> set[str]:
    found: set[str] = set()
    for node in runtime_imports(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert node.level == 0, f"{name}: relative import"
            base = node.module or ""
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            found |= with_parents(target)
    return found - {name} - with_parents(name)


def test_no_module_imports_one_that_imports_it_back() -> None:
    """An import cycle, even one dodged by a function-local import, is a layering to fix."""
    graph = {name: dependencies(name) for name in MODULES}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_classes_stay_small(name: str) -> None:
    source = MODULES[name].read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name} has {size} lines"


def test_import_meterware_loads_only_what_it_names() -> None:
    """The rollup worker, billing and the storage drivers load when used, not with the package."""
    script = "import json, sys; import meterware; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    loaded = json.loads(run.stdout)
    ours = [name for name in loaded if name.startswith("meterware")]
    assert ours == ["meterware", "meterware.__about__"]
    assert "redis" not in loaded
    assert "starlette" not in loaded

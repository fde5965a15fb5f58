"""The public API: ``meterware.__all__`` is sorted, complete and importable (as httpx tests it)."""

from __future__ import annotations

import importlib
import types

import pytest

import meterware


def test_all_is_sorted_without_duplicates() -> None:
    """__all__ is kept in sorted order, each name once."""
    assert meterware.__all__ == sorted(set(meterware.__all__))


def test_every_name_in_all_is_importable() -> None:
    """`from meterware import <name>` works for every name in __all__."""
    module = importlib.import_module("meterware")
    for name in meterware.__all__:
        assert getattr(module, name) is not None, name
        namespace: dict[str, object] = {}
        exec(f"from meterware import {name}", namespace)
        assert namespace[name] is getattr(module, name)


def test_every_public_object_is_exported() -> None:
    """Every public class, function or constant of the package namespace is listed in __all__."""
    public = {
        name
        for name, value in vars(meterware).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(meterware.__all__)


def test_usage_module_is_exported() -> None:
    """`meterware.usage.add`, the handler-side API of the README, is part of the public API."""
    assert "usage" in meterware.__all__
    assert callable(meterware.usage.add)


def test_version_is_a_string() -> None:
    """__version__ is exported as a non-empty string."""
    assert isinstance(meterware.__version__, str)
    assert meterware.__version__


def test_public_names_load_on_first_use_and_unknown_names_fail() -> None:
    """``meterware.__getattr__`` knows exactly the names of __all__; any other name is an AttributeError."""
    assert set(meterware.__all__) == {*meterware._EXPORTS, "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = meterware.Nope  # type: ignore[attr-defined]

"""Records as JSON-ready dicts: their fields in order, some keys renamed."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def fields_dict(record: DataclassInstance, **rename: str) -> dict[str, Any]:
    """``record``'s fields in their order (nested records as dicts), the keys in ``rename`` renamed."""
    return {rename.get(key, key): value for key, value in asdict(record).items()}

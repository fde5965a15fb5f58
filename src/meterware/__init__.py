"""meterware: sell access to your API with one line of middleware.

The names below are imported on first use (PEP 562), so ``import meterware`` stays cheap: an app that
mounts the ASGI middleware never loads the rollup worker, alerts or invoices.
"""

# Aliased: the package's namespace holds only its public names (tests/test_exports.py).
import importlib as _importlib
import typing as _typing

from meterware.__about__ import __version__

if _typing.TYPE_CHECKING:
    from meterware import usage
    from meterware.asgi import MeteringMiddleware
    from meterware.billing.accounts import Accounts, UsageReport
    from meterware.billing.alerts import Alert
    from meterware.billing.corrections import CorrectionResult, ImportResult
    from meterware.billing.export import ExportReport
    from meterware.billing.invoices import Invoice
    from meterware.billing.ledger import Lot
    from meterware.billing.pricing import Price, Tier
    from meterware.config import AlertRules, Config
    from meterware.errors import ConfigError, MeterwareError, NotFoundError, StorageError, UsageError
    from meterware.keys import NewKey
    from meterware.metering.records import Customer, KeyRecord
    from meterware.storage.base import Balance, LedgerEntry
    from meterware.usage import CurrentCall, current_call
    from meterware.wsgi import WSGIMeteringMiddleware

#: Where each public name lives: the entry points, then the types their methods return.
_EXPORTS: dict[str, str] = {
    "MeteringMiddleware": "meterware.asgi",
    "WSGIMeteringMiddleware": "meterware.wsgi",
    "Config": "meterware.config",
    "Accounts": "meterware.billing.accounts",
    "usage": "meterware.usage",
    "current_call": "meterware.usage",
    "CurrentCall": "meterware.usage",
    "MeterwareError": "meterware.errors",
    "ConfigError": "meterware.errors",
    "NotFoundError": "meterware.errors",
    "StorageError": "meterware.errors",
    "UsageError": "meterware.errors",
    "Price": "meterware.billing.pricing",
    "Tier": "meterware.billing.pricing",
    "Alert": "meterware.billing.alerts",
    "AlertRules": "meterware.config",
    "Balance": "meterware.storage.base",
    "CorrectionResult": "meterware.billing.corrections",
    "Customer": "meterware.metering.records",
    "ExportReport": "meterware.billing.export",
    "ImportResult": "meterware.billing.corrections",
    "Invoice": "meterware.billing.invoices",
    "KeyRecord": "meterware.metering.records",
    "LedgerEntry": "meterware.storage.base",
    "Lot": "meterware.billing.ledger",
    "NewKey": "meterware.keys",
    "UsageReport": "meterware.billing.accounts",
}

__all__ = [
    "Accounts",
    "Alert",
    "AlertRules",
    "Balance",
    "Config",
    "ConfigError",
    "CorrectionResult",
    "CurrentCall",
    "Customer",
    "ExportReport",
    "ImportResult",
    "Invoice",
    "KeyRecord",
    "LedgerEntry",
    "Lot",
    "MeteringMiddleware",
    "MeterwareError",
    "NewKey",
    "NotFoundError",
    "Price",
    "StorageError",
    "Tier",
    "UsageError",
    "UsageReport",
    "WSGIMeteringMiddleware",
    "__version__",
    "current_call",
    "usage",
]


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meterware' has no attribute {name!r}")
    if name == module.rpartition(".")[2]:
        value: _typing.Any = _importlib.import_module(module)
    else:
        value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__

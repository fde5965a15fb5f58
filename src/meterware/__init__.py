"""meterware: sell access to your API with one line of middleware."""

from meterware import usage
from meterware.__about__ import __version__
from meterware.accounts import Accounts, UsageReport
from meterware.asgi import MeteringMiddleware
from meterware.config import Config
from meterware.errors import ConfigError, MeterwareError, NotFoundError, StorageError, UsageError
from meterware.invoices import Invoice
from meterware.pricing import Price, Tier
from meterware.wsgi import WSGIMeteringMiddleware

__all__ = [
    "Accounts",
    "Config",
    "ConfigError",
    "Invoice",
    "MeteringMiddleware",
    "MeterwareError",
    "NotFoundError",
    "Price",
    "StorageError",
    "Tier",
    "UsageError",
    "UsageReport",
    "WSGIMeteringMiddleware",
    "__version__",
    "usage",
]

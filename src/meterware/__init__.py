"""meterware: sell access to your API with one line of middleware."""

from meterware import usage
from meterware.__about__ import __version__
from meterware.asgi import MeteringMiddleware
from meterware.billing.accounts import Accounts, UsageReport
from meterware.billing.invoices import Invoice
from meterware.billing.pricing import Price, Tier
from meterware.config import Config
from meterware.errors import ConfigError, MeterwareError, NotFoundError, StorageError, UsageError
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

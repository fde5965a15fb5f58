"""meterware: sell access to your API with one line of middleware."""

from meterware import usage
from meterware.__about__ import __version__
from meterware.accounts import Accounts, UsageReport
from meterware.asgi import MeteringMiddleware
from meterware.config import Config
from meterware.errors import ConfigError, MeterwareError, NotFoundError, StorageError, UsageError
from meterware.wsgi import WSGIMeteringMiddleware

__all__ = [
    "Accounts",
    "Config",
    "ConfigError",
    "MeteringMiddleware",
    "MeterwareError",
    "NotFoundError",
    "StorageError",
    "UsageError",
    "UsageReport",
    "WSGIMeteringMiddleware",
    "__version__",
    "usage",
]

"""Moved to :mod:`meterware.billing.export`; this import path keeps working."""

from meterware.billing.export import *  # noqa: F403
from meterware.billing.export import __all__ as __all__

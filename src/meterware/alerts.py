"""Moved to :mod:`meterware.billing.alerts`; this import path keeps working."""

from meterware.billing.alerts import *  # noqa: F403
from meterware.billing.alerts import __all__ as __all__

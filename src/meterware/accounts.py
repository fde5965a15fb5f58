"""Moved to :mod:`meterware.billing.accounts`; this import path keeps working."""

from meterware.billing.accounts import *  # noqa: F403
from meterware.billing.accounts import __all__ as __all__

"""Moved to :mod:`meterware.billing.selfservice`; this import path keeps working."""

from meterware.billing.selfservice import *  # noqa: F403
from meterware.billing.selfservice import __all__ as __all__

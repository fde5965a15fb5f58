#!/usr/bin/env python
"""Django's command-line utility for the example project.

METERWARE_CONFIG=examples/meterware.toml python examples/django_project/manage.py runserver
"""

import os
import sys
from pathlib import Path

# The project's modules are named from the repository root, as uvicorn and gunicorn import them.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)

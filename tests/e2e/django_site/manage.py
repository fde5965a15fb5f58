"""``python manage.py runserver``: the end-to-end Django site under Django's development server."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.e2e.django_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)

"""ASGI entry point of the example Django project (uvicorn examples.django_project.asgi:application).

meterware's ``get_asgi_application`` is Django's plus the ASGI lifespan, whose shutdown flushes the events
still buffered (Django answers no lifespan, and uvicorn's SIGTERM skips exit hooks).
"""

import os

from meterware.django import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
application = get_asgi_application()

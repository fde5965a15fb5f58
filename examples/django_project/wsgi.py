"""WSGI entry point of the example Django project (gunicorn examples.django_project.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
application = get_wsgi_application()

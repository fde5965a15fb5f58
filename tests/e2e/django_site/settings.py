"""A Django site metered with one line in ``MIDDLEWARE``, served by real servers in the end-to-end tests.

Configured like a deployment: ``METERWARE_CONFIG`` and ``METERWARE_STORAGE`` in the environment.
"""

SECRET_KEY = "meterware-e2e-tests"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "tests.e2e.django_site.urls"
MIDDLEWARE = ["meterware.django.MeteringMiddleware"]
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
TIME_ZONE = "UTC"

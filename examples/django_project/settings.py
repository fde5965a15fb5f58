"""Settings of the example Django project: an API sold by the token, metered by one line in MIDDLEWARE."""

SECRET_KEY = "example-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
ROOT_URLCONF = "examples.django_project.urls"

MIDDLEWARE = [
    "meterware.django.MeteringMiddleware",  # reads $METERWARE_CONFIG (or a METERWARE = {...} setting)
]

USE_TZ = True
TIME_ZONE = "UTC"

"""URLconf of the behaviour suite's Django site with async views (served by the ASGI handler)."""

from tests.behaviour.apps import django_urlpatterns

urlpatterns = django_urlpatterns("async")

"""URLconf of the behaviour suite's Django site with sync views (served by the WSGI handler)."""

from tests.behaviour.apps import django_urlpatterns

urlpatterns = django_urlpatterns("sync")

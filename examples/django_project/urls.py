"""URLs of the example Django project."""

from django.urls import path
from examples.django_project import views

urlpatterns = [
    path("health", views.health),
    path("v1/chat", views.chat),
    path("v1/stream", views.stream),
]

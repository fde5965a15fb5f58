"""``customer_getter``: an app that authenticates its callers itself (JWT, session) is metered without
meterware's keys, on every framework and backend."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.behaviour.apps import CALLS

Api = Any


def user_of(request: Any) -> str | None:
    """The caller the app authenticated: here an ``X-User`` header (an ASGI scope, a WSGI environ, or
    Django's ``HttpRequest``), where a real app would read its verified JWT or session."""
    if isinstance(request, dict) and "headers" in request:
        found = dict(request["headers"]).get(b"x-user")
        return found.decode() if found is not None else None
    if isinstance(request, dict):
        user: str | None = request.get("HTTP_X_USER")
        return user
    return request.headers.get("X-User")  # type: ignore[no-any-return]


@pytest.fixture
def api(make_api: Any) -> Api:
    return make_api(options={"customer_getter": user_of})


def customer(api: Api, plan: str, credits: str | None = None) -> str:
    customer_id = f"{plan}-{uuid.uuid4().hex[:8]}"
    api.accounts.create_customer(customer_id, plan=plan)
    if credits:
        api.accounts.grant_credits(customer_id, credits)
    return customer_id


def test_a_customer_the_app_authenticated_is_metered_without_a_key(api: Api) -> None:
    """The getter's customer is admitted on its plan (the free plan's quota of 5 holds), the handler reads
    it from current_call() (no key id), and its calls are counted in its usage."""
    user = customer(api, "free")
    headers = {"X-User": user}
    assert api.call("GET", "/v1/whoami", headers=headers).json() == {
        "customer": user,
        "plan": "free",
        "key_id": "",
        "scopes": [],
        "live": True,
    }
    statuses = [api.call("GET", "/v1/hello", headers=headers).status_code for _ in range(5)]
    assert statuses == [200] * 4 + [429]
    assert CALLS == ["whoami"] + ["hello"] * 4
    api.settle()
    usage = api.accounts.usage(user)
    assert (usage.meters["calls"], usage.calls["success"], usage.calls["rejected"]) == (5, 5, 1)


def test_credits_are_charged_and_refused_as_for_a_key(api: Api) -> None:
    """A prepaid customer without a key pays per call and is refused with 402 when the credits run out."""
    user = customer(api, "percall", credits="0.02")
    statuses = [api.call("GET", "/v1/hello", headers={"X-User": user}).status_code for _ in range(3)]
    assert statuses == [200, 200, 402]
    api.settle()
    assert api.accounts.balance(user).balance == 0


def test_no_customer_falls_back_to_the_key_and_an_unknown_one_is_refused(api: Api) -> None:
    """None from the getter: the call needs a key as usual (401 without one); a customer id meterware
    does not know, or cannot be one, gets 403 unknown_customer; the app never runs for either."""
    response = api.call("GET", "/v1/hello")
    assert (response.status_code, response.json()["reason"]) == (401, "missing_key")
    key = api.customer("open")
    assert api.call("GET", "/v1/hello", key).status_code == 200
    for unknown in ("nobody-here", "not a customer id"):
        response = api.call("GET", "/v1/hello", headers={"X-User": unknown})
        assert (response.status_code, response.json()["reason"]) == (403, "unknown_customer")
    assert CALLS == ["hello"]


def test_a_suspended_customer_is_refused_at_once(api: Api) -> None:
    """Suspension is checked in the atomic admission, whatever the process has cached of the customer."""
    user = customer(api, "open")
    assert api.call("GET", "/v1/hello", headers={"X-User": user}).status_code == 200
    api.accounts.set_status(user, "suspended")
    response = api.call("GET", "/v1/hello", headers={"X-User": user})
    assert (response.status_code, response.json()["reason"]) == (403, "suspended")


@pytest.mark.parametrize("framework", ["django-sync", "django-async"])
def test_django_takes_the_getter_by_its_dotted_path(make_api: Any, framework: str) -> None:
    """``METERWARE_CUSTOMER_GETTER`` may name the getter by its dotted path (a Django setting)."""
    api = make_api(options={"customer_getter": f"{__name__}.user_of"})
    user = customer(api, "open")
    assert api.call("GET", "/v1/whoami", headers={"X-User": user}).json()["customer"] == user

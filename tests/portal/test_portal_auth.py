"""Who may see what in the portal: links work once and briefly, sessions are cookies that expire, every form
needs its session's token, and no request reaches another customer's data (memory:// and real Redis)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from werkzeug.test import Client

import meterware.portal
from meterware.asgi import MeteringMiddleware
from meterware.billing.accounts import Accounts
from meterware.config import Config
from meterware.errors import ConfigError, UsageError
from meterware.portal.tokens import Session, Signer, portal_secret

SECRET = "portal-secret-for-tests-0123456789abcdef"
ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"


@pytest.fixture(autouse=True)
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", SECRET)
    monkeypatch.setenv("METERWARE_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture
def config(storage_url: str) -> Config:
    return Config.from_dict(
        {
            "storage": {"url": storage_url, "shards": 4},
            "plans": {"pro": {"prepaid": True, "meters": {"calls": {"price": "0.01"}}}},
            "portal": {"base_url": "http://testserver/portal", "secure_cookies": False},
        }
    )


@pytest.fixture
def accounts(config: Config) -> Iterator[Accounts]:
    accounts = Accounts.open(config)
    for customer in ("acme", "globex"):
        accounts.create_customer(customer, plan="pro")
        accounts.grant_credits(customer, "5.00")
    yield accounts
    accounts.close()


def link_path(link: str) -> str:
    """The link as a path under the mount (the apps are served at the root in these tests)."""
    parts = urlsplit(link)
    return f"{parts.path.removeprefix('/portal')}?{parts.query}"


def follow_link(client: Any, target: str, **post_options: Any) -> Any:
    """Open a sign-in link as a person does: GET its page, then press Continue (a post of the link's
    token); the post's response is returned."""
    page = client.get(target)
    assert page.status_code == 200, page.text
    path, _, query = target.partition("?")
    return client.post(path, data={"token": parse_qs(query)["token"][0]}, **post_options)


def signed_in(config: Config, customer: str = "acme") -> Client:
    client = Client(meterware.portal.wsgi_app(config))
    response = follow_link(client, link_path(meterware.portal.sign_in_link(customer, config=config)))
    assert response.status_code == 303, response.text
    return client


def form_token(client: Client, path: str = "/keys/new") -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert match is not None
    return match[1]


def test_a_link_opens_a_session_once(config: Config, accounts: Accounts) -> None:
    link = link_path(meterware.portal.sign_in_link("acme", config=config))
    first = Client(meterware.portal.wsgi_app(config))
    # A preview, a mail scanner or the person fetches the link: a page to continue from, no session yet.
    for method in ("HEAD", "GET", "GET"):
        page = first.open(link, method=method)
        assert page.status_code == 200
        assert "Set-Cookie" not in page.headers
    assert 'data-form="sign-in"' in first.get(link).text
    response = follow_link(first, link)
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # secure_cookies = false, for local http
    assert 'data-field="customer"' in first.get("/").text

    token = parse_qs(link.partition("?")[2])["token"][0]
    other = Client(meterware.portal.wsgi_app(config))  # another process, the same backend
    for again in (other.get(link), other.post("/login", data={"token": token})):
        assert again.status_code == 403
        assert "used already" in again.text
        assert "Set-Cookie" not in again.headers


def test_a_link_posted_from_another_site_signs_nobody_in(config: Config, accounts: Accounts) -> None:
    """Login CSRF: a page elsewhere posting its own link would sign the visitor in to that account."""
    token = Signer(SECRET.encode()).link_token("acme", 60)
    client = Client(meterware.portal.wsgi_app(config))
    refused = client.post("/login", data={"token": token}, headers={"Origin": "https://evil.test"})
    assert refused.status_code == 403
    assert "Set-Cookie" not in refused.headers
    assert follow_link(client, f"/login?token={token}").status_code == 303  # the link still works once


def test_cookies_are_secure_by_default_and_scoped_to_the_mount(accounts: Accounts, config: Config) -> None:
    strict = Config.from_dict(
        {
            "storage": {"url": config.storage, "shards": 4},
            "plans": {"pro": {}},
            "portal": {"base_url": "http://x"},
        }
    )
    app = meterware.portal.wsgi_app(strict)
    token = Signer(SECRET.encode()).link_token("acme", 60)
    response = Client(app).post("/login", data={"token": token}, environ_overrides={"SCRIPT_NAME": "/portal"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/portal/"
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie
    assert "Path=/portal/" in cookie
    assert "HttpOnly" in cookie


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda s: "", id="missing"),
        pytest.param(lambda s: "not-a-token", id="garbage"),
        pytest.param(lambda s: "x" * 5000, id="huge"),
        pytest.param(
            lambda s: Signer(b"another-secret-0123456789abcdef-xyz").link_token("acme", 60), id="forged"
        ),
        pytest.param(
            lambda s: s.sign("link", {"c": "acme", "x": int(time.time()) - 1, "n": "n"}), id="expired"
        ),
        pytest.param(
            lambda s: s.sign("session", {"c": "acme", "x": int(time.time()) + 60, "n": "n"}),
            id="other-purpose",
        ),
        pytest.param(lambda s: s.link_token("nobody", 60), id="unknown-customer"),
        pytest.param(lambda s: s.link_token("acme", 60)[:-2] + "AA", id="tampered-signature"),
    ],
)
def test_a_bad_link_opens_nothing(config: Config, accounts: Accounts, token: Any) -> None:
    client = Client(meterware.portal.wsgi_app(config))
    signed = token(Signer(SECRET.encode()))
    for response in (
        client.get("/login", query_string={"token": signed}),
        client.post("/login", data={"token": signed}),
    ):
        assert response.status_code == 403
        assert "Set-Cookie" not in response.headers
    assert client.get("/").status_code == 401


def test_a_changed_payload_does_not_pass_for_another_customer(config: Config, accounts: Accounts) -> None:
    signer = Signer(SECRET.encode())
    _body, _, mac = signer.link_token("acme", 60).partition(".")
    other_body = signer.link_token("globex", 60).partition(".")[0]
    response = Client(meterware.portal.wsgi_app(config)).get(
        "/login", query_string={"token": f"{other_body}.{mac}"}
    )
    assert response.status_code == 403


def test_an_expired_session_is_signed_out(config: Config, accounts: Accounts) -> None:
    client = Client(meterware.portal.wsgi_app(config))
    old = Signer(SECRET.encode()).session_cookie(Session("acme", int(time.time()) - 1, "sid"), "customer")
    client.set_cookie("meterware_portal", old)
    response = client.get("/")
    assert response.status_code == 401
    assert "Signed out" in response.text


def test_every_form_needs_its_sessions_token_and_origin(config: Config, accounts: Accounts) -> None:
    client = signed_in(config)
    keys_before = len(accounts.list_keys("acme"))
    assert client.post("/keys/new", data={"mode": "live"}).status_code == 403
    other = signed_in(config, "acme")
    assert client.post("/keys/new", data={"mode": "live", "csrf": form_token(other)}).status_code == 403
    token = form_token(client)
    cross_site = client.post(
        "/keys/new", data={"mode": "live", "csrf": token}, headers={"Origin": "https://evil.test"}
    )
    assert cross_site.status_code == 403
    assert len(accounts.list_keys("acme")) == keys_before
    created = client.post(
        "/keys/new", data={"mode": "live", "csrf": token}, headers={"Origin": "http://localhost"}
    )
    assert created.status_code == 200
    assert 'data-field="new-key"' in created.text
    assert len(accounts.list_keys("acme")) == keys_before + 1


def test_behind_a_proxy_the_base_urls_origin_is_the_portals_own(config: Config, accounts: Accounts) -> None:
    """A TLS proxy that rewrites Host: the browser's Origin is the public base URL's."""
    client = signed_in(config)
    token = form_token(client)
    cookie = client.get_cookie("meterware_portal")
    assert cookie is not None
    proxied = Client(meterware.portal.wsgi_app(config), use_cookies=False)

    def post(origin: str) -> int:
        data = {"mode": "test", "csrf": token}
        # base_url is http://testserver/portal; the proxy sends Host: 10.0.0.7:8000.
        headers = {"Origin": origin, "Host": "10.0.0.7:8000", "Cookie": f"meterware_portal={cookie.value}"}
        return proxied.post("/keys/new", data=data, headers=headers).status_code

    assert post("https://testserver") == 200
    assert post("https://testserver.evil.test") == 403
    assert post("https://10.0.0.7:8000") == 200


def test_a_session_cannot_grow_the_keys_without_bound(
    config: Config, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meterware.portal.pages import keys

    monkeypatch.setattr(keys, "MAX_ACTIVE_KEYS", 3)
    monkeypatch.setattr(keys, "MAX_KEYS", 5)
    client = signed_in(config)
    token = form_token(client)

    def create() -> str:
        return client.post("/keys/new", data={"mode": "live", "csrf": token}).text

    for _ in range(3):
        assert 'data-field="new-key"' in create()
    assert "You have 3 working keys: revoke one first." in create()
    first = accounts.list_keys("acme")[0].key_id
    client.post(f"/keys/{first}/revoke", data={"csrf": token})
    assert 'data-field="new-key"' in create()  # 3 working, 4 in all
    second = next(r.key_id for r in accounts.list_keys("acme") if r.status == "active")
    # With a grace period the old key keeps working: that would be a 4th working key.
    graced = client.post(f"/keys/{second}/rotate", data={"csrf": token, "grace": "3600"}).text
    assert "You have 3 working keys: revoke one first." in graced
    rotated = client.post(f"/keys/{second}/rotate", data={"csrf": token, "grace": "0"}).text
    assert 'data-field="new-key"' in rotated  # a replacement: 5 in all
    assert "This account has 5 keys: ask us to remove old ones." in create()
    assert len(accounts.list_keys("acme")) == 5


def test_a_key_counting_uses_is_rotated_without_grace_in_the_portal(
    config: Config, accounts: Accounts
) -> None:
    """Its rotation page offers no grace period, and a grace posted anyway is a notice, not a 500."""
    key = accounts.create_key("acme", remaining=5)
    client = signed_in(config)
    page = client.get(f"/keys/{key.key_id}/rotate").text
    assert '<option value="0" selected>' in page
    assert 'value="3600"' not in page
    token = form_token(client)
    graced = client.post(f"/keys/{key.key_id}/rotate", data={"csrf": token, "grace": "3600"})
    assert graced.status_code == 200
    assert "it is rotated without a grace period" in graced.text
    rotated = client.post(f"/keys/{key.key_id}/rotate", data={"csrf": token, "grace": "0"}).text
    assert 'data-field="new-key"' in rotated


def test_no_request_reaches_another_customers_keys(config: Config, accounts: Accounts) -> None:
    theirs = accounts.create_key("globex")
    client = signed_in(config, "acme")
    token = form_token(client)
    for path in (f"/keys/{theirs.key_id}/revoke", f"/keys/{theirs.key_id}/rotate"):
        assert client.get(path).status_code == 404
        assert client.post(path, data={"csrf": token, "grace": "0"}).status_code == 404
    assert accounts.key(theirs.key_id).status == "active"
    assert theirs.key_id not in client.get("/keys").text
    # Pages take no customer: whatever the query or path says, the session's customer is shown.
    for path in ("/?customer=globex", "/keys?customer=globex", "/../globex/", "/customers/globex/"):
        response = client.get(path)
        assert "globex" not in response.text, path


def test_an_operator_session_does_not_open_the_customer_portal(config: Config, accounts: Accounts) -> None:
    client = Client(meterware.portal.wsgi_app(config))
    operator = Signer(SECRET.encode()).session_cookie(
        Session("acme", int(time.time()) + 60, "sid"), "operator"
    )
    client.set_cookie("meterware_portal", operator)
    assert client.get("/").status_code == 401


def test_sign_out_ends_the_session_everywhere(config: Config, accounts: Accounts) -> None:
    """Signing out clears the cookie, and a copy of it (another device, a thief) stops working too."""
    client = signed_in(config)
    cookie = client.get_cookie("meterware_portal")
    assert cookie is not None
    copy = Client(meterware.portal.wsgi_app(config))
    copy.set_cookie("meterware_portal", cookie.value)
    assert copy.get("/keys").status_code == 200
    response = client.post("/logout", data={"csrf": form_token(client)})
    assert response.status_code == 200
    assert "Max-Age=0" in response.headers["Set-Cookie"]
    assert client.get("/").status_code == 401
    assert copy.get("/keys").status_code == 401
    assert (
        copy.post("/keys/new", data={"mode": "live", "csrf": form_token(signed_in(config))}).status_code
        == 401
    )


def test_the_mount_without_its_slash_leads_to_it(config: Config, accounts: Accounts) -> None:
    """The cookie's path is the mount with a slash: /portal is sent to /portal/ (WSGI as Starlette does)."""
    client = signed_in(config)
    response = client.get("", environ_overrides={"SCRIPT_NAME": "/portal"}, query_string="a=1")
    assert response.status_code == 308
    assert response.headers["Location"] == "/portal/?a=1"


def test_cookies_split_over_several_headers_are_all_read(config: Config, accounts: Accounts) -> None:
    """HTTP/2 servers may pass each cookie as a header of its own (ASGI)."""
    client = signed_in(config)
    cookie = client.get_cookie("meterware_portal")
    assert cookie is not None
    app = meterware.portal.asgi_app(config)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    headers = [
        (b"cookie", f"meterware_portal={cookie.value}".encode()),
        (b"cookie", b"other=1"),
        (b"host", b"x"),
    ]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/keys",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("query", ["page=" + "1" * 5000, "page=99999999999999999999", "page=-1"])
def test_huge_or_odd_page_numbers_are_not_found_not_errors(
    config: Config, accounts: Accounts, query: str
) -> None:
    client = signed_in(config)
    for path in ("/credits", "/invoices"):
        assert client.get(path, query_string=query).status_code == 404


def test_a_huge_threshold_is_a_form_error(config: Config, accounts: Accounts) -> None:
    client = signed_in(config)
    token = form_token(client, "/alerts")
    data = {"csrf": token, "action": "thresholds", "quota_percent": "1" * 5000}
    response = client.post("/alerts", data=data)
    assert response.status_code == 200
    assert "Nothing was saved." in response.text


def test_the_secret_is_required_at_start_up(monkeypatch: pytest.MonkeyPatch, config: Config) -> None:
    monkeypatch.setenv("METERWARE_PORTAL_SECRET", "short")
    with pytest.raises(ConfigError, match="METERWARE_PORTAL_SECRET is shorter than 32"):
        meterware.portal.asgi_app(config)
    monkeypatch.delenv("METERWARE_PORTAL_SECRET")
    with pytest.raises(ConfigError, match="METERWARE_PORTAL_SECRET is not set"):
        portal_secret(config.portal)


def test_links_are_bounded_and_need_a_base(config: Config, accounts: Accounts) -> None:
    bare = Config.from_dict({"storage": {"url": config.storage, "shards": 4}})
    with pytest.raises(UsageError, match="no base URL"):
        meterware.portal.sign_in_link("acme", config=bare)
    with pytest.raises(UsageError, match="from 1 second to 7 days"):
        meterware.portal.sign_in_link("acme", config=config, seconds=30 * 86_400)


# -- the operator view


def admin(config: Config, **kwargs: Any) -> Client:
    return Client(meterware.portal.admin_wsgi_app(config, **kwargs))


def test_the_operator_view_needs_the_token_or_the_hook(config: Config, accounts: Accounts) -> None:
    anonymous = admin(config)
    assert anonymous.get("/").status_code == 303
    assert anonymous.get("/customers/acme/").status_code == 303
    assert anonymous.post("/login", data={"token": "wrong"}).status_code == 403
    # A customer's session is no operator session.
    customer = signed_in(config)
    anonymous.set_cookie("meterware_admin", customer.get_cookie("meterware_portal").value)  # type: ignore[union-attr]
    assert anonymous.get("/").status_code == 303

    signed = admin(config)
    assert signed.post("/login", data={"token": ADMIN_TOKEN}).status_code == 303
    listing = signed.get("/").text
    assert 'data-field="acme.balance" data-value="5000000"' in listing
    assert "globex" in listing

    bearer = admin(config).get("/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert bearer.status_code == 200

    hooked = admin(config, authorize=lambda request: "ops" if request.headers.get("x-ops") == "yes" else None)
    assert hooked.get("/", headers={"x-ops": "no"}).status_code == 403
    assert hooked.get("/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 403
    assert hooked.get("/", headers={"x-ops": "yes"}).status_code == 200


def test_a_hook_that_answers_an_empty_name_lets_nobody_in(config: Config, accounts: Accounts) -> None:
    """A hook reading a header a proxy sets answers "" when the header is missing: that is a refusal."""
    hooked = admin(config, authorize=lambda request: request.headers.get("x-forwarded-user", ""))
    assert hooked.get("/").status_code == 403
    assert hooked.get("/customers/acme/").status_code == 403
    assert hooked.get("/", headers={"X-Forwarded-User": "alice"}).status_code == 200


def test_a_new_admin_token_ends_the_old_tokens_sessions(
    config: Config, accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed = admin(config)
    assert signed.post("/login", data={"token": ADMIN_TOKEN}).status_code == 303
    assert signed.get("/").status_code == 200
    monkeypatch.setenv("METERWARE_ADMIN_TOKEN", "a-brand-new-admin-token-0123456789abcdef")
    moved = Client(meterware.portal.admin_wsgi_app(config))
    cookie = signed.get_cookie("meterware_admin")
    assert cookie is not None
    moved.set_cookie("meterware_admin", cookie.value)
    assert moved.get("/").status_code == 303  # to the sign-in form


def test_scripts_with_the_admin_token_post_without_a_session(config: Config, accounts: Accounts) -> None:
    """A bearer token is no cookie: another site cannot make a browser send it, so forms need no token."""
    script = Client(meterware.portal.admin_wsgi_app(config), use_cookies=False)
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    data = {"action": "grant", "amount": "1.25", "reason": "script"}
    response = script.post("/customers/acme/manage", data=data, headers=bearer)
    assert response.status_code == 303
    assert accounts.balance("acme").balance == 6_250_000


def test_the_operator_view_needs_an_auth_at_start_up(monkeypatch: pytest.MonkeyPatch, config: Config) -> None:
    monkeypatch.delenv("METERWARE_ADMIN_TOKEN")
    with pytest.raises(ConfigError, match="authorize= hook or \\$METERWARE_ADMIN_TOKEN"):
        meterware.portal.admin_asgi_app(config)
    meterware.portal.admin_asgi_app(config, authorize=lambda request: "ops")


def test_operators_grant_and_suspend_with_a_reason_the_ledger_keeps(
    config: Config, accounts: Accounts
) -> None:
    client = admin(config, authorize=lambda request: "alice")
    page = client.get("/customers/acme/manage")
    assert page.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]  # type: ignore[index]
    assert (
        client.post(
            "/customers/acme/manage", data={"action": "grant", "amount": "2.50", "reason": ""}
        ).status_code
        == 403
    )
    data = {"csrf": token, "action": "grant", "amount": "2.50", "reason": "goodwill"}
    granted = client.post("/customers/acme/manage", data=data)
    # Redirected after the post: reloading the page shows the notice and grants nothing more.
    assert granted.status_code == 303
    assert granted.headers["Location"] == "/customers/acme/manage?done=grant"
    assert "The credits were granted." in client.get(granted.headers["Location"]).text
    refused = client.post(
        "/customers/acme/manage", data={"csrf": token, "action": "suspended", "reason": " "}
    )
    assert "a reason is required" in refused.text
    assert accounts.customer("acme").status == "active"
    client.post(
        "/customers/acme/manage", data={"csrf": token, "action": "suspended", "reason": "unpaid invoice"}
    )
    assert accounts.customer("acme").status == "suspended"
    assert accounts.balance("acme").balance == 7_500_000
    last_two = accounts.ledger("acme")[-2:]
    assert [(e.kind, e.amount, e.reason, e.actor) for e in last_two] == [
        ("grant", 2_500_000, "goodwill", "portal:alice"),
        ("status", 0, "suspended: unpaid invoice", "portal:alice"),
    ]
    # The customer's pages, seen by the operator, are those of the customer named.
    assert 'data-field="customer">acme<' in client.get("/customers/acme/").text
    assert client.get("/customers/nobody/").status_code == 404


def test_a_metered_portal_answers_500_with_the_fix(config: Config, accounts: Accounts, tmp_path: Any) -> None:
    key = accounts.create_key("acme")
    metered = Config.from_dict(
        {
            "storage": {"url": config.storage, "shards": 4},
            "plans": {"pro": {"prepaid": True, "meters": {"calls": {"price": "0.01"}}}},
            "pipeline": {"spool_dir": str(tmp_path / "spool")},
        }
    )

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/v1/hello", hello), Mount("/portal", meterware.portal.asgi_app(config))])
    app.add_middleware(MeteringMiddleware, config=metered)
    with TestClient(app) as client:
        response = client.get("/portal/", headers={"Authorization": f"Bearer {key.plaintext}"})
    assert response.status_code == 500
    assert 'routes.portal = "/portal"' in response.text

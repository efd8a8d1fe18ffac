"""Pages that are off by default, the demo token endpoint, and the dashboard login."""

from __future__ import annotations

import orjson
import tornado.httpclient

from server.auth import hash_password, verify_password
from tests.conftest import Running, ServerFactory


async def fetch(server: Running, path: str, **kwargs: object) -> tornado.httpclient.HTTPResponse:
    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(
        f"{server.http_url}{path}", raise_error=False, follow_redirects=False, **kwargs
    )


def test_password_hashes() -> None:
    encoded = hash_password("correct horse", iterations=1000)
    assert encoded.startswith("pbkdf2_sha256$1000$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("wrong horse", encoded)
    assert not verify_password("correct horse", "garbage")
    assert hash_password("x" * 8, iterations=1000) != hash_password("x" * 8, iterations=1000)


async def test_demo_and_dashboard_are_off_by_default(server: Running) -> None:
    assert (await fetch(server, "/demo")).code == 404
    assert (await fetch(server, "/demo/token", method="POST", body="{}")).code == 404
    assert (await fetch(server, "/dashboard")).code == 404
    assert (await fetch(server, "/dashboard/data")).code == 404


async def test_demo_token_endpoint(make_server: ServerFactory) -> None:
    server = await make_server({"server": {"demo": True}})
    reply = await fetch(server, "/demo/token", method="POST", body='{"user": "zoe"}')
    token = orjson.loads(reply.body)["token"]
    assert server.node.auth.verify_connection_token(token).user == "zoe"
    assert (await fetch(server, "/demo/token", method="POST", body="{}")).code == 400
    assert "demo" in server.node.settings.namespaces


async def test_dashboard_needs_the_password(make_server: ServerFactory) -> None:
    server = await make_server(
        {"dashboard": {"password_hash": hash_password("s3cret-pass", iterations=1000)}}
    )
    page = await fetch(server, "/dashboard")
    assert page.code == 302 and page.headers["Location"].startswith("/dashboard/login")
    assert (await fetch(server, "/dashboard/data")).code in (302, 403)
    bad = await fetch(server, "/dashboard/login", method="POST", body="password=nope")
    assert bad.code == 401
    assert "Set-Cookie" not in bad.headers
    good = await fetch(server, "/dashboard/login", method="POST", body="password=s3cret-pass")
    assert good.code == 302
    cookie = good.headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in good.headers["Set-Cookie"]
    data = await fetch(server, "/dashboard/data", headers={"Cookie": cookie})
    assert data.code == 200
    assert (await fetch(server, "/dashboard", headers={"Cookie": cookie})).code == 200

"""Tokens from a real OpenID Connect provider (NAV's mock-oauth2-server, a JVM
started on loopback by tests/services.py), verified with the keys of its JWKS:
connection and subscription tokens, rotation, outages, floods of made-up key
ids, algorithm confusion and wrong issuers or audiences.

The provider signs each issuer with a key of its own whose ``kid`` is the
issuer id, and serves one key per issuer URL. So that a rotation to a new
``kid`` can be seen at one JWKS URL, ``KeySetFront`` serves the union of the
provider's key sets for the issuers it lists, as a provider publishes its next
key beside the current one; the keys and tokens are still the provider's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server import cli
from server.client import Client
from server.jwks import JWKSCache
from tests.conftest import Running, ServerFactory, wait_for
from tests.services import OIDCProvider, free_port, new_rsa_jwk

AUDIENCE = "squall"


def jwks_config(provider: OIDCProvider, jwks_url: str | None = None, **auth: Any) -> dict[str, Any]:
    """Squall trusting the provider's ``squall`` issuer (and nothing else)."""
    return {
        "auth": {
            "token_secret": "",  # no HS tokens beside the key set
            "jwks_url": jwks_url or provider.jwks_url(),
            "token_algorithms": ["RS256"],
            "token_issuer": provider.issuer(),
            "token_audience": AUDIENCE,
            "jwks_timeout": 5.0,
            **auth,
        },
        "namespaces": {"dm": {"private": True}},
    }


def cache(server: Running) -> JWKSCache:
    jwks = server.node.auth.jwks
    assert jwks is not None
    return jwks


async def token(provider: OIDCProvider, sub: str = "alice", **claims: Any) -> str:
    return await asyncio.to_thread(provider.token, sub, **claims)


async def connect(server: Running, token: str) -> dict[str, Any]:
    """The reply to ``connect`` on a new connection."""
    raw = await server.raw()
    return await raw.call("connect", {"token": token})


async def eventually_connects(server: Running, token: str, timeout: float = 30.0) -> None:
    """Connect until the server accepts the token (each try refused with a
    clear 101 until then), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await connect(server, token)
        if "result" in reply:
            return
        assert reply["error"]["code"] == 101, reply
        if time.monotonic() > deadline:
            raise AssertionError(f"still refused after {timeout}s: {reply}")
        await asyncio.sleep(0.05)


def signed_locally(private: Any, kid: str, provider: OIDCProvider, sub: str = "mallory") -> str:
    """An RS256 token with the right issuer and audience, not from the provider."""
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + 600, "iss": provider.issuer(), "aud": AUDIENCE}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


async def jwks_requests(provider: OIDCProvider) -> int:
    return await asyncio.to_thread(provider.jwks_requests)


@pytest.fixture
async def own_provider() -> AsyncIterator[OIDCProvider]:
    """A provider of this test's own, to stop or re-key (started by the test)."""
    provider = OIDCProvider()
    yield provider
    await asyncio.to_thread(provider.stop)


# ---- connecting and subscribing ---------------------------------------------


async def test_a_provider_token_connects_the_squall_client(
    make_server: ServerFactory, oidc_provider: OIDCProvider
) -> None:
    server = await make_server(jwks_config(oidc_provider))
    client = Client(server.ws_url, token=await token(oidc_provider, "alice"))
    server._clients.append(client)
    await client.connect()
    sub = await client.subscribe("news")
    await server.api().publish("news", {"title": "signed by the provider"})
    pub = await asyncio.wait_for(anext(aiter(sub)), 10)
    assert pub.data == {"title": "signed by the provider"}
    assert "alice" in server.node.users  # the user the provider's token names


async def test_a_subscription_token_from_the_provider_opens_a_private_channel(
    make_server: ServerFactory, oidc_provider: OIDCProvider
) -> None:
    server = await make_server(jwks_config(oidc_provider))
    raw = await server.raw()
    reply = await raw.call("connect", {"token": await token(oidc_provider, "alice")})
    assert "result" in reply, reply
    sub_token = await token(oidc_provider, "alice", channel="dm:alice-bob")
    reply = await raw.call("subscribe", {"channel": "dm:alice-bob", "token": sub_token})
    assert "result" in reply, reply
    reply = await raw.call("subscribe", {"channel": "dm:alice-carol", "token": sub_token})
    assert reply["error"]["code"] == 103
    assert "for another channel" in reply["error"]["message"]
    bobs = await token(oidc_provider, "bob", channel="dm:alice-carol")
    reply = await raw.call("subscribe", {"channel": "dm:alice-carol", "token": bobs})
    assert "for another user" in reply["error"]["message"]


async def test_a_wrong_issuer_or_audience_is_refused(
    make_server: ServerFactory, oidc_provider: OIDCProvider
) -> None:
    server = await make_server(jwks_config(oidc_provider))
    wrong_aud = await token(oidc_provider, aud="another-app")
    reply = await connect(server, wrong_aud)
    assert reply["error"]["code"] == 101
    assert "audience" in reply["error"]["message"]
    wrong_iss = await token(oidc_provider, iss=f"{oidc_provider.url}/someone-else")
    reply = await connect(server, wrong_iss)
    assert reply["error"]["code"] == 101
    assert "issuer" in reply["error"]["message"]


async def test_an_hs_token_naming_the_providers_kid_is_refused(
    make_server: ServerFactory, oidc_provider: OIDCProvider
) -> None:
    server = await make_server(jwks_config(oidc_provider, jwks_refetch_interval=0.01))
    before = await jwks_requests(oidc_provider)
    # HS256 keyed with the provider's public key, which anyone can read.
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(oidc_provider.key)).public_key()
    secret = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"sub": "mallory", "exp": int(time.time()) + 600,
              "iss": oidc_provider.issuer(), "aud": AUDIENCE}  # fmt: skip

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = {"alg": "HS256", "typ": "JWT", "kid": "squall"}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    forged = (
        f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"
    )
    reply = await connect(server, forged)
    assert reply["error"] == {"code": 101, "message": "token algorithm not allowed"}
    assert await jwks_requests(oidc_provider) == before  # and it cost no fetch


# ---- refetching -------------------------------------------------------------


async def test_a_flood_of_unknown_kids_costs_the_provider_at_most_one_request(
    make_server: ServerFactory, oidc_provider: OIDCProvider
) -> None:
    server = await make_server(
        jwks_config(oidc_provider, jwks_refetch_interval=3600, jwks_cache_min=3600)
    )
    before = await jwks_requests(oidc_provider)
    fetched = cache(server).fetches
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for _ in range(40):
        reply = await connect(server, signed_locally(private, secrets.token_hex(8), oidc_provider))
        assert reply["error"]["code"] == 101
        assert "names no known signing key" in reply["error"]["message"]
    assert cache(server).fetches - fetched <= 1
    assert await jwks_requests(oidc_provider) - before <= 1
    assert "result" in await connect(server, await token(oidc_provider))


class KeySetFront:
    """One JWKS URL serving the union of the provider's key sets for
    ``issuers`` (fetched from the provider on every request)."""

    def __init__(self, provider: OIDCProvider) -> None:
        self.provider = provider
        self.issuers = ["squall"]
        self.requests = 0
        self.client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        sock, self.port = tornado.testing.bind_unused_port()
        front = self

        class Handler(tornado.web.RequestHandler):
            async def get(self) -> None:
                front.requests += 1
                keys: list[Any] = []
                for issuer in front.issuers:
                    response = await front.client.fetch(front.provider.jwks_url(issuer))
                    keys.extend(json.loads(response.body)["keys"])
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps({"keys": keys}))

        self.http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/keys", Handler)]))
        self.http.add_sockets([sock])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/keys"

    async def close(self) -> None:
        self.http.stop()
        await asyncio.wait_for(self.http.close_all_connections(), 5)
        self.client.close()


@pytest.fixture
async def front(oidc_provider: OIDCProvider) -> AsyncIterator[KeySetFront]:
    made = KeySetFront(oidc_provider)
    yield made
    await made.close()


async def test_a_new_kid_is_picked_up_by_a_refetch(
    make_server: ServerFactory, oidc_provider: OIDCProvider, front: KeySetFront
) -> None:
    server = await make_server(
        jwks_config(oidc_provider, front.url, jwks_refetch_interval=0.2, jwks_cache_min=3600)
    )
    assert "result" in await connect(server, await token(oidc_provider, "alice"))
    assert front.requests == 1
    # The provider publishes its next key and starts signing with it.
    front.issuers = ["squall", "squall-next"]
    rotated = await token(oidc_provider, "bob", issuer_id="squall-next")
    assert jwt.get_unverified_header(rotated)["kid"] == "squall-next"
    await eventually_connects(server, rotated)
    assert 2 <= front.requests <= 3  # one refetch (a second if the first came too soon)
    assert "squall-next" in (cache(server).keys or pytest.fail("no keys")).by_kid
    # Tokens under the previous key still verify.
    assert "result" in await connect(server, await token(oidc_provider, "carol"))


async def test_a_provider_restarted_with_another_key_is_picked_up(
    make_server: ServerFactory, own_provider: OIDCProvider
) -> None:
    await asyncio.to_thread(own_provider.start)
    server = await make_server(
        jwks_config(own_provider, jwks_refetch_interval=0.2, jwks_cache_min=3600)
    )
    old = await token(own_provider, "alice")
    assert "result" in await connect(server, old)
    await asyncio.to_thread(own_provider.restart, key=new_rsa_jwk())
    new = await token(own_provider, "alice")
    assert jwt.get_unverified_header(new)["kid"] == jwt.get_unverified_header(old)["kid"]
    await eventually_connects(server, new)
    # The old key is gone from the provider's set, and so from Squall's.
    reply = await connect(server, old)
    assert reply["error"] == {"code": 101, "message": "token signature is invalid"}


# ---- the provider down ------------------------------------------------------


async def test_the_cached_keys_serve_while_the_provider_is_down(
    make_server: ServerFactory, own_provider: OIDCProvider, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(own_provider.start)
    server = await make_server(
        jwks_config(own_provider, jwks_cache_min=0.5, jwks_cache_max=0.5, jwks_refetch_interval=0.2)
    )
    connect_token = await token(own_provider, "alice")
    sub_token = await token(own_provider, "alice", channel="dm:alice-bob")
    with caplog.at_level(logging.WARNING, logger="squall.jwks"):
        await asyncio.to_thread(own_provider.stop)
        failed = cache(server).failures
        await wait_for(
            lambda: cache(server).failures > failed, timeout=20, message="a failed refresh"
        )
    assert "still using the 1 cached keys" in caplog.text
    raw = await server.raw()
    assert "result" in await raw.call("connect", {"token": connect_token})
    reply = await raw.call("subscribe", {"channel": "dm:alice-bob", "token": sub_token})
    assert "result" in reply, reply


async def test_start_with_the_provider_down_refuses_tokens_then_recovers(
    make_server: ServerFactory, own_provider: OIDCProvider, caplog: pytest.LogCaptureFixture
) -> None:
    own_provider.port = free_port()  # where it will be, once it is up
    with caplog.at_level(logging.ERROR, logger="squall.jwks"):
        server = await make_server(jwks_config(own_provider, jwks_refetch_interval=0.2))
    assert "NO SIGNING KEYS" in caplog.text  # the start went on, loudly
    private = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(own_provider.key))
    early = signed_locally(private, "squall", own_provider, sub="alice")
    reply = await connect(server, early)
    assert reply["error"]["code"] == 101
    assert "signing keys are not available yet" in reply["error"]["message"]
    await asyncio.to_thread(own_provider.start)
    await eventually_connects(server, await token(own_provider, "alice"), timeout=60)


# ---- squall check-config ----------------------------------------------------


async def test_check_config_lists_the_providers_keys(
    oidc_provider: OIDCProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "squall.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path}"\n'
        f'[auth]\njwks_url = "{oidc_provider.jwks_url()}"\ntoken_algorithms = ["RS256"]\n'
    )
    code = await asyncio.to_thread(cli.main, ["check-config", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"jwks OK: {oidc_provider.jwks_url()}: 1 signing keys, kept 60s" in out
    assert "kid squall: RSA, RS256" in out

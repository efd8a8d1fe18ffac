"""Keys from a JWKS URL: cache headers, bad key sets, refetching, rate limits.

The key set is served by a small Tornado server started here on an unused
port, whose answers each test sets (a real provider is in
tests/integration/test_jwks.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import tornado.httpserver
import tornado.httputil
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from server import cli
from server.auth import Authenticator
from server.config import AuthSettings, ConfigError, ensure_secrets, load_settings
from server.errors import TokenExpired, Unauthorized
from server.jwks import JWKSCache, JWKSError, cache_lifetime, parse_jwks, safe_url
from tests.conftest import wait_for

ISSUER = "https://idp.squall.test/realms/app"
AUDIENCE = "squall"


# ---- keys and tokens ---------------------------------------------------------


@dataclass
class Key:
    private: Any
    kid: str
    alg: str

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        jwk: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.pop("key_ops", None)
        jwk.update({"kid": self.kid, "use": "sig", **extra})
        return jwk

    def token(self, sub: str = "alice", *, kid: str | None = "same", **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}
        body.update(claims)
        headers = {} if kid is None else {"kid": self.kid if kid == "same" else kid}
        return jwt.encode(body, self.private, algorithm=self.alg, headers=headers)


def rsa_key(kid: str = "rsa-1") -> Key:
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid, "RS256")


def ec_key(kid: str = "ec-1") -> Key:
    return Key(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")


def ed_key(kid: str = "ed-1") -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate(), kid, "EdDSA")


def jwks_body(*keys: Key) -> bytes:
    return json.dumps({"keys": [k.public_jwk() for k in keys]}).encode()


# ---- a key set server ----------------------------------------------------------


@dataclass
class JWKSServer:
    port: int
    body: bytes = b'{"keys": []}'
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    http: tornado.httpserver.HTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    def serve(self, *keys: Key, **headers: str) -> None:
        self.body = jwks_body(*keys)
        self.status = 200
        self.headers = headers

    def listen(self, sock: socket.socket) -> None:
        outer = self

        class Handler(tornado.web.RequestHandler):
            def get(self) -> None:
                outer.requests += 1
                self.set_status(outer.status)
                self.set_header("Content-Type", "application/json")
                for name, value in outer.headers.items():
                    self.set_header(name.replace("_", "-"), value)
                self.finish(outer.body)

        self.http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/jwks", Handler)]))
        self.http.add_sockets([sock])

    async def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            await asyncio.wait_for(self.http.close_all_connections(), 5)
            self.http = None


@pytest.fixture
async def jwks_server() -> AsyncIterator[JWKSServer]:
    sock, port = tornado.testing.bind_unused_port()
    server = JWKSServer(port)
    server.listen(sock)
    yield server
    await server.stop()


def settings(url: str, **kwargs: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "jwks_url": url,
        "token_algorithms": ["RS256"],
        "token_issuer": ISSUER,
        "token_audience": AUDIENCE,
        "api_key": "k" * 20,
        "jwks_timeout": 5.0,
    }
    values.update(kwargs)
    return AuthSettings(**values)


@pytest.fixture
async def authenticators() -> AsyncIterator[list[Authenticator]]:
    made: list[Authenticator] = []
    yield made
    for auth in made:
        await auth.close()


async def started(made: list[Authenticator], s: AuthSettings) -> Authenticator:
    auth = Authenticator(s)
    made.append(auth)
    await auth.start()
    return auth


def cache_of(auth: Authenticator) -> JWKSCache:
    assert auth.jwks is not None
    return auth.jwks


def has_kid(auth: Authenticator, kid: str) -> bool:
    keys = cache_of(auth).keys
    return keys is not None and kid in keys.by_kid


def key_count(auth: Authenticator) -> int:
    keys = cache_of(auth).keys
    return 0 if keys is None else len(keys.keys)


# ---- cache headers ---------------------------------------------------------------

NOW = 1_800_000_000.0


def http_date(t: float) -> str:
    return tornado.httputil.format_timestamp(t)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Cache-Control": "public, max-age=300"}, 300),
        ({"Cache-Control": "max-age=300", "Age": "100"}, 200),
        ({"Cache-Control": 'max-age="120", must-revalidate'}, 120),
        ({"Cache-Control": "max-age=5"}, 60),  # the floor
        ({"Cache-Control": "max-age=999999"}, 3600),  # the ceiling
        ({"Cache-Control": "no-cache"}, 60),
        ({"Cache-Control": "no-store, max-age=300"}, 60),
        ({"Cache-Control": "max-age=abc"}, 60),
        ({"Expires": http_date(NOW + 900), "Date": http_date(NOW)}, 900),
        ({"Expires": http_date(NOW + 900)}, 900),  # from now, without a Date
        ({"Expires": "0"}, 60),  # already expired
        ({"Expires": http_date(NOW - 10), "Date": http_date(NOW)}, 60),
        ({"Cache-Control": "max-age=200", "Expires": http_date(NOW + 900)}, 200),
        ({}, 60),
    ],
)
def test_cache_lifetime_follows_the_headers_within_floor_and_ceiling(
    headers: dict[str, str], expected: float
) -> None:
    assert cache_lifetime(headers, floor=60, ceiling=3600, now=NOW) == expected


def test_cache_lifetime_reads_repeated_headers() -> None:
    headers = tornado.httputil.HTTPHeaders()
    headers.add("Cache-Control", "public")
    headers.add("Cache-Control", "max-age=700")
    assert cache_lifetime(headers, floor=60, ceiling=3600) == 700


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("https://user:pw@idp.example:8443/certs?key=s3cret#x") == (
        "https://idp.example:8443/certs"
    )


# ---- parsing key sets ---------------------------------------------------------------


def test_a_key_set_keeps_the_keys_that_fit_the_configured_algorithms() -> None:
    r, e, d = rsa_key("r"), ec_key("e"), ed_key("d")
    enc = rsa_key("enc").public_jwk(use="enc", alg="RSA-OAEP")
    doc = {
        "keys": [
            r.public_jwk(),
            e.public_jwk(),
            d.public_jwk(),
            enc,
            {"kty": "oct", "k": "c2VjcmV0"},
        ]
    }
    keys = parse_jwks(json.dumps(doc).encode(), ["RS256", "PS256", "EdDSA"])
    assert set(keys.by_kid) == {"r", "d"}
    assert keys.by_kid["r"].algorithms == {"RS256", "PS256"}
    assert keys.by_kid["d"].algorithms == {"EdDSA"}
    reasons = " | ".join(keys.skipped)
    assert "'e'" in reasons and "fits none of" in reasons
    assert "use is 'enc'" in reasons
    assert "symmetric (oct) key is never used" in reasons


def test_a_keys_own_alg_narrows_what_it_verifies() -> None:
    r = rsa_key("r")
    keys = parse_jwks(
        json.dumps({"keys": [r.public_jwk(alg="PS256")]}).encode(), ["RS256", "PS256"]
    )
    assert keys.by_kid["r"].algorithms == {"PS256"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>Service Unavailable</html>", "not JSON"),
        (b"", "not JSON"),
        (b'["keys"]', "no 'keys' list"),
        (b'{"keys": {"kid": "a"}}', "no 'keys' list"),
        (b'{"keys": []}', "the set is empty"),
        (b'{"keys": [1, "x", null]}', "not an object"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}', "symmetric"),
        (b'{"keys": [{"kty": "RSA", "kid": "r", "n": "!!", "e": 3}]}', "not a valid RSA key"),
        (b'{"keys": [{"kty": "RSA", "kid": "r", "alg": ["RS256"]}]}', "alg"),
        (b'{"keys": [{"kty": "OKP", "crv": ["Ed25519"], "x": "AA"}]}', "fits none of"),
        (b'{"keys": [{"kty": "RSA", "kid": 7}]}', "kid is not a string"),
        (b'{"keys": [{"kty": "RSA", "kid": "r", "key_ops": [{}]}]}', "key_ops"),
        (b'{"keys": [{"kty": "XYZ"}]}', "unsupported key type"),
    ],
)
def test_a_bad_key_set_is_refused_with_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(JWKSError) as err:
        parse_jwks(body, ["RS256", "EdDSA"])
    assert message in str(err.value)


def test_keys_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(JWKSError, match="a EC P-256 key fits none of RS256"):
        parse_jwks(jwks_body(ec_key()), ["RS256"])


# ---- tokens against a served key set -------------------------------------------------


async def test_tokens_are_verified_with_the_key_their_kid_names(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    one, two = rsa_key("one"), rsa_key("two")
    jwks_server.serve(one, two)
    auth = await started(authenticators, settings(jwks_server.url))
    assert (await auth.verify_connection_token_async(one.token("ann"))).user == "ann"
    assert (await auth.verify_connection_token_async(two.token("bob"))).user == "bob"
    # The synchronous form uses the cached keys.
    assert auth.verify_connection_token(one.token("cy")).user == "cy"
    sub = two.token("ann", channel="dm:1")
    exp = await auth.verify_subscription_token_async(sub, user="ann", client="c", channel="dm:1")
    assert exp > time.time()
    with pytest.raises(Unauthorized, match="another user"):
        await auth.verify_subscription_token_async(sub, user="bob", client="c", channel="dm:1")
    # A token signed by one key but naming the other fails its signature.
    forged = jwt.encode({"sub": "x", "exp": time.time() + 60}, one.private, "RS256",
                        headers={"kid": "two"})  # fmt: skip
    with pytest.raises(Unauthorized, match="signature is invalid"):
        await auth.verify_connection_token_async(forged)
    assert jwks_server.requests <= 2  # the start, and at most one refetch for the forgery


@pytest.mark.parametrize("make", [ec_key, ed_key])
async def test_ec_and_eddsa_keys(
    make: Any, jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    key = make()
    jwks_server.serve(key)
    auth = await started(authenticators, settings(jwks_server.url, token_algorithms=[key.alg]))
    assert (await auth.verify_connection_token_async(key.token("eve"))).user == "eve"


async def test_iss_aud_and_exp_are_checked_as_for_static_keys(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    key = rsa_key()
    jwks_server.serve(key)
    auth = await started(authenticators, settings(jwks_server.url))
    with pytest.raises(Unauthorized, match="issuer"):
        await auth.verify_connection_token_async(key.token(iss="https://evil.test/"))
    with pytest.raises(Unauthorized, match="audience"):
        await auth.verify_connection_token_async(key.token(aud="another-app"))
    with pytest.raises(TokenExpired):
        await auth.verify_connection_token_async(key.token(exp=int(time.time()) - 10))
    with pytest.raises(Unauthorized, match="subscription token cannot be used to connect"):
        await auth.verify_connection_token_async(key.token(channel="dm:1"))


async def test_tokens_in_other_algorithms_naming_a_kid_are_refused_without_a_fetch(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    key = rsa_key("prod")
    jwks_server.serve(key)
    auth = await started(authenticators, settings(jwks_server.url, jwks_refetch_interval=0.01))
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"sub": "mallory", "exp": int(time.time()) + 60, "iss": ISSUER, "aud": AUDIENCE}
    # HS256 keyed with the public key (the classic confusion), and alg none.
    hs = hs256({"alg": "HS256", "typ": "JWT", "kid": "prod"}, claims, public_pem)
    for token in (hs, jwt.encode(claims, None, algorithm="none", headers={"kid": "prod"})):
        for verify in (auth.verify_connection_token_async, _sync(auth)):
            with pytest.raises(Unauthorized, match="algorithm not allowed"):
                await verify(token)
    # A public-key algorithm that is not configured is refused the same way.
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        await auth.verify_connection_token_async(ec_key("prod").token())
    assert jwks_server.requests == 1  # none of them cost a fetch


def hs256(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def _sync(auth: Authenticator) -> Any:
    async def verify(token: str) -> Any:
        return auth.verify_connection_token(token)

    return verify


async def test_a_token_without_kid_uses_the_only_key_that_fits(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    one, two = rsa_key("one"), rsa_key("two")
    jwks_server.serve(one)
    auth = await started(
        authenticators, settings(jwks_server.url, jwks_refetch_interval=0.01, jwks_cache_min=0.01)
    )
    assert (await auth.verify_connection_token_async(one.token(kid=None))).user == "alice"
    jwks_server.serve(one, two)
    fetched = jwks_server.requests
    await wait_for(lambda: jwks_server.requests > fetched, message="a scheduled refresh")
    await wait_for(lambda: key_count(auth) == 2, message="both keys")
    with pytest.raises(Unauthorized, match="no 'kid' header and several keys"):
        await auth.verify_connection_token_async(one.token(kid=None))


async def test_an_unknown_kid_is_refetched_once_and_picked_up(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    old, new = rsa_key("2024"), rsa_key("2025")
    jwks_server.serve(old, Cache_Control="max-age=86400")
    auth = await started(authenticators, settings(jwks_server.url, jwks_refetch_interval=0.01))
    cache = cache_of(auth)
    await wait_for(lambda: time.monotonic() > cache._last_fetch + 0.01, message="interval")
    jwks_server.serve(old, new, Cache_Control="max-age=86400")  # the provider rotates
    assert (await auth.verify_connection_token_async(new.token("ann"))).user == "ann"
    assert jwks_server.requests == 2
    assert (await auth.verify_connection_token_async(old.token("bob"))).user == "bob"
    assert jwks_server.requests == 2


async def test_concurrent_unknown_kids_share_one_fetch(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    key = rsa_key()
    jwks_server.serve(key)
    auth = await started(authenticators, settings(jwks_server.url, jwks_refetch_interval=0.01))
    cache = cache_of(auth)
    await wait_for(lambda: time.monotonic() > cache._last_fetch + 0.01, message="interval")
    tokens = [key.token(kid=f"made-up-{i}") for i in range(20)]
    results = await asyncio.gather(
        *(auth.verify_connection_token_async(t) for t in tokens), return_exceptions=True
    )
    assert all(isinstance(r, Unauthorized) for r in results)
    assert "names no known signing key" in str(results[0])
    assert jwks_server.requests == 2


async def test_a_flood_of_unknown_kids_is_rate_limited(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    key = rsa_key()
    jwks_server.serve(key)
    auth = await started(
        authenticators, settings(jwks_server.url, jwks_refetch_interval=3600, jwks_cache_min=3600)
    )
    for _ in range(200):
        with pytest.raises(Unauthorized, match="names no known signing key"):
            await auth.verify_connection_token_async(key.token(kid=secrets.token_hex(8)))
    assert jwks_server.requests == 1
    assert (await auth.verify_connection_token_async(key.token())).user == "alice"


async def test_a_rate_limited_unknown_kid_schedules_one_fetch(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    old, new = rsa_key("old"), rsa_key("new")
    jwks_server.serve(old, Cache_Control="max-age=86400")
    auth = await started(authenticators, settings(jwks_server.url, jwks_refetch_interval=1.0))
    jwks_server.serve(old, new, Cache_Control="max-age=86400")
    try:
        await auth.verify_connection_token_async(new.token())
    except Unauthorized:
        pass  # within the interval: refused now, fetched when it is over
    await wait_for(lambda: has_kid(auth, "new"), timeout=10, message="the scheduled fetch")
    assert (await auth.verify_connection_token_async(new.token("zed"))).user == "zed"
    assert jwks_server.requests == 2


async def test_a_key_replaced_under_the_same_kid_is_refetched(
    jwks_server: JWKSServer, authenticators: list[Authenticator]
) -> None:
    before, after = rsa_key("main"), rsa_key("main")
    jwks_server.serve(before, Cache_Control="max-age=86400")
    auth = await started(authenticators, settings(jwks_server.url, jwks_refetch_interval=0.01))
    cache = cache_of(auth)
    await wait_for(lambda: time.monotonic() > cache._last_fetch + 0.01, message="interval")
    jwks_server.serve(after, Cache_Control="max-age=86400")
    assert (await auth.verify_connection_token_async(after.token("ann"))).user == "ann"
    await wait_for(lambda: time.monotonic() > cache._last_fetch + 0.01, message="interval")
    with pytest.raises(Unauthorized, match="signature is invalid"):
        await auth.verify_connection_token_async(before.token())
    assert jwks_server.requests == 3


@pytest.mark.parametrize(
    ("status", "body", "logged"),
    [
        (200, b"<html>maintenance</html>", "not JSON"),
        (200, b'{"keys": []}', "no usable signing key"),
        (200, b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "e"}]}',
         "fits none of RS256"),
        (503, b'{"error": "down"}', "answered HTTP 503"),
    ],
)  # fmt: skip
async def test_a_bad_key_set_refuses_tokens_and_tells_the_operator(
    status: int,
    body: bytes,
    logged: str,
    jwks_server: JWKSServer,
    authenticators: list[Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks_server.status, jwks_server.body = status, body
    with caplog.at_level(logging.WARNING, logger="squall.jwks"):
        auth = await started(authenticators, settings(jwks_server.url))
    errors = [r for r in caplog.records if r.name == "squall.jwks" and r.levelno == logging.ERROR]
    assert errors and logged in errors[0].getMessage()
    assert "NO SIGNING KEYS" in errors[0].getMessage()
    for verify in (auth.verify_connection_token_async, _sync(auth)):
        with pytest.raises(Unauthorized, match="signing keys are not available yet"):
            await verify(rsa_key().token())


async def test_the_cached_keys_are_kept_while_the_provider_is_down(
    jwks_server: JWKSServer, authenticators: list[Authenticator], caplog: pytest.LogCaptureFixture
) -> None:
    key = rsa_key()
    jwks_server.serve(key)
    auth = await started(
        authenticators, settings(jwks_server.url, jwks_cache_min=0.05, jwks_cache_max=0.05)
    )
    cache = cache_of(auth)
    with caplog.at_level(logging.WARNING, logger="squall.jwks"):
        jwks_server.status, jwks_server.body = 500, b"oops"
        await wait_for(lambda: cache.failures >= 1, message="a failed refresh")
        await jwks_server.stop()  # and then gone altogether
        failed = cache.failures
        await wait_for(lambda: cache.failures > failed, timeout=10, message="a refused refresh")
    assert "still using the 1 cached keys" in caplog.text
    assert (await auth.verify_connection_token_async(key.token("ann"))).user == "ann"


async def test_start_with_the_provider_down_then_it_comes_back(
    authenticators: list[Authenticator], caplog: pytest.LogCaptureFixture
) -> None:
    # A bound socket that does not listen yet: connections are refused.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = JWKSServer(sock.getsockname()[1])
    key = rsa_key()
    server.serve(key)
    try:
        with caplog.at_level(logging.ERROR, logger="squall.jwks"):
            auth = await started(authenticators, settings(server.url, jwks_refetch_interval=0.05))
        assert "NO SIGNING KEYS" in caplog.text and "cannot fetch" in caplog.text
        with pytest.raises(Unauthorized, match="not available yet"):
            await auth.verify_connection_token_async(key.token())
        sock.listen(16)
        sock.setblocking(False)
        server.listen(sock)
        cache = cache_of(auth)
        await wait_for(lambda: cache.keys is not None, timeout=30, message="keys after the outage")
        assert (await auth.verify_connection_token_async(key.token("ann"))).user == "ann"
    finally:
        await server.stop()
        sock.close()


# ---- configuration and check-config -------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "key", "message"),
    [
        ({"token_algorithms": ["HS256"]}, "auth.token_algorithms", "public-key algorithms only"),
        ({"token_public_key": "/etc/key.pem"}, "auth.token_public_key", "not both"),
        ({"token_secret": "s" * 40}, "auth.token_secret", "not used with auth.jwks_url"),
        ({"jwks_url": "ftp://idp.test/jwks"}, "auth.jwks_url", "http:// or https://"),
        ({"jwks_url": "idp.test/jwks"}, "auth.jwks_url", "http:// or https://"),
        ({"jwks_cache_min": 600, "jwks_cache_max": 60}, "auth.jwks_cache_max", "less than"),
        ({"jwks_refetch_interval": 0}, "auth.jwks_refetch_interval", "greater than 0"),
        ({"jwks_timeout": -1}, "auth.jwks_timeout", "greater than 0"),
    ],
)
def test_config_refuses_bad_jwks_combinations(auth: dict[str, Any], key: str, message: str) -> None:
    raw = {"auth": {"jwks_url": "https://idp.test/jwks", "token_algorithms": ["RS256"], **auth}}
    with pytest.raises(ConfigError) as err:
        load_settings(raw=raw, env={})
    assert err.value.key == key and message in err.value.problem


def test_a_jwks_config_needs_no_secret(tmp_path: Path) -> None:
    raw = {
        "server": {"data_dir": str(tmp_path)},
        "auth": {"jwks_url": "https://idp.test/jwks", "token_algorithms": ["RS256", "EdDSA"]},
    }
    s = load_settings(raw=raw, env={"SQUALL_AUTH_JWKS_REFETCH_INTERVAL": "5"})
    assert s.auth.jwks_refetch_interval == 5.0
    ensure_secrets(s)
    assert s.auth.token_secret == ""  # nothing generated: no HS tokens


def write_config(tmp_path: Path, url: str, algorithms: list[str]) -> str:
    path = tmp_path / "squall.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path}"\n'
        f'[auth]\napi_key = "{"k" * 20}"\njwks_url = "{url}"\n'
        f"token_algorithms = {json.dumps(algorithms)}\njwks_timeout = 5.0\n"
    )
    return str(path)


async def test_check_config_lists_the_providers_keys(
    jwks_server: JWKSServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r, e = rsa_key("r-2025"), ec_key("e-2025")
    jwks_server.serve(r, e)
    config = write_config(
        tmp_path, jwks_server.url.replace("//", "//ops:s3cr3t-pw@"), ["RS256", "PS256"]
    )
    code = await asyncio.to_thread(cli.main, ["check-config", "--config", config])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "config OK" in out
    assert f"jwks OK: {jwks_server.url}: 1 signing keys, kept 60s" in out
    assert "kid r-2025: RSA, PS256, RS256" in out
    assert "left out key 'e-2025'" in out
    assert "s3cr3t" not in out + err and r.public_jwk()["n"] not in out


async def test_check_config_reports_a_bad_key_set(
    jwks_server: JWKSServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks_server.body = b"not json"
    config = write_config(tmp_path, jwks_server.url, ["RS256"])
    code = await asyncio.to_thread(cli.main, ["check-config", "--config", config])
    _, err = capsys.readouterr()
    assert code == 1
    assert f"auth.jwks_url: {jwks_server.url}: the answer is not JSON" in err

"""JWT connection and subscription tokens: what is accepted and what is not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.auth import Authenticator, mint_token
from server.config import AuthSettings, ConfigError, load_settings
from server.errors import TokenExpired, Unauthorized

SECRET = "unit-secret-0123456789abcdef-0123456789"


def hs() -> AuthSettings:
    return AuthSettings(token_secret=SECRET, api_key="k" * 20)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def pem_pair(kind: str) -> tuple[str, str]:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def test_valid_hs256_token() -> None:
    auth = Authenticator(hs())
    token = mint_token(hs(), sub="alice", ttl=60, info={"name": "A"}, channels=["news"])
    claims = auth.verify_connection_token(token)
    assert claims.user == "alice"
    assert claims.info == {"name": "A"}
    assert claims.channels == ["news"]
    assert claims.exp > time.time()


def test_expired_token() -> None:
    token = mint_token(hs(), sub="alice", ttl=-1)
    with pytest.raises(TokenExpired):
        Authenticator(hs()).verify_connection_token(token)


def test_bad_signature() -> None:
    other = AuthSettings(token_secret="another-secret-0123456789abcdef-xyz")
    token = mint_token(other, sub="alice")
    with pytest.raises(Unauthorized, match="signature"):
        Authenticator(hs()).verify_connection_token(token)


def test_alg_none_is_refused() -> None:
    token = forge({"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": time.time() + 60}, None)
    with pytest.raises(Unauthorized):
        Authenticator(hs()).verify_connection_token(token)


def test_hs_rs_confusion_is_refused() -> None:
    """An attacker signs HS256 with the server's RSA *public* key as the secret."""
    _, public = pem_pair("rsa")
    settings = AuthSettings(token_algorithms=["RS256"], token_public_key=public)
    claims = {"sub": "admin", "exp": time.time() + 60}
    token = forge({"alg": "HS256", "typ": "JWT"}, claims, public.encode())
    with pytest.raises(Unauthorized, match="algorithm"):
        Authenticator(settings).verify_connection_token(token)


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_missing_claims(missing: str) -> None:
    claims: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 60}
    del claims[missing]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match=missing):
        Authenticator(hs()).verify_connection_token(token)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": 5, "exp": 2**40},
        {"sub": "a", "exp": 2**40, "channels": "news"},
        {"sub": "a", "exp": 2**40, "channel": "news"},
    ],
)
def test_malformed_claims(claims: dict[str, Any]) -> None:
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized):
        Authenticator(hs()).verify_connection_token(token)


@pytest.mark.parametrize("token", [None, "", 42, "a.b", "a.b.c"])
def test_garbage_tokens(token: object) -> None:
    with pytest.raises(Unauthorized):
        Authenticator(hs()).verify_connection_token(token)


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256")])
def test_public_key_tokens(kind: str, alg: str, tmp_path: Any) -> None:
    private, public = pem_pair(kind)
    path = tmp_path / "public.pem"
    path.write_text(public)
    settings = AuthSettings(token_algorithms=[alg], token_public_key=str(path))
    token = mint_token(settings, sub="bob", private_key=private)
    assert Authenticator(settings).verify_connection_token(token).user == "bob"
    # A token signed by another key fails.
    other_private, _ = pem_pair(kind)
    forged = mint_token(settings, sub="bob", private_key=other_private)
    with pytest.raises(Unauthorized):
        Authenticator(settings).verify_connection_token(forged)


def test_audience_and_issuer() -> None:
    settings = AuthSettings(token_secret=SECRET, token_audience="squall", token_issuer="me")
    auth = Authenticator(settings)
    assert auth.verify_connection_token(mint_token(settings, sub="a")).user == "a"
    wrong = jwt.encode({"sub": "a", "exp": 2**40, "aud": "other", "iss": "me"}, SECRET)
    with pytest.raises(Unauthorized):
        auth.verify_connection_token(wrong)


def test_subscription_token_binding() -> None:
    auth = Authenticator(hs())
    token = mint_token(hs(), sub="alice", channel="dm:1", client="c1")
    assert auth.verify_subscription_token(token, user="alice", client="c1", channel="dm:1") > 0
    for kwargs in (
        {"user": "bob", "client": "c1", "channel": "dm:1"},
        {"user": "alice", "client": "c2", "channel": "dm:1"},
        {"user": "alice", "client": "c1", "channel": "dm:2"},
    ):
        with pytest.raises(Unauthorized):
            auth.verify_subscription_token(token, **kwargs)
    connection_token = mint_token(hs(), sub="alice")
    with pytest.raises(Unauthorized, match="channel"):
        auth.verify_subscription_token(connection_token, user="alice", client="c1", channel="dm:1")


def test_api_key_check_is_exact() -> None:
    auth = Authenticator(hs())
    assert auth.check_api_key("k" * 20)
    assert not auth.check_api_key("k" * 19)
    assert not auth.check_api_key("")
    assert not auth.check_api_key(None)


def test_config_refuses_mixed_algorithm_families() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(raw={"auth": {"token_algorithms": ["HS256", "RS256"]}}, env={})
    assert info.value.key == "auth.token_algorithms"

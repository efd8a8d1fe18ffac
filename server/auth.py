"""JWT connection and subscription tokens (PyJWT), and API keys.

Connection token claims: ``sub`` (user id, may be ""), ``exp``; optional
``info`` (shown to others in presence and as publisher) and ``channels``
(server-side subscriptions made at connect). A connection token must not carry
``channel``: that claim marks a subscription token.

Subscription token claims (private channels): ``sub`` (must equal the
connection's user), ``channel``, ``exp``; optional ``client`` (when present it
must equal the connection's client id).

Only the configured algorithms are accepted, so ``alg: none`` and HS/RS key
confusion fail; HMAC and public-key algorithms are never mixed (config refuses).

Keys: one HMAC secret, one public key (PEM), or an identity provider's key set
(``auth.jwks_url``, ``server/jwks.py``), chosen by the token's ``kid``. With a
key set, verification may wait for a refetch: sessions call the ``*_async``
methods; the synchronous ones use the cached keys only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from server.config import AuthSettings
from server.errors import TokenExpired, Unauthorized
from server.jwks import JWKSCache


@dataclass(slots=True, frozen=True)
class ConnectClaims:
    user: str
    exp: float
    info: Any = None
    channels: list[str] = field(default_factory=list)


def _load_key(settings: AuthSettings) -> str:
    if settings.jwks_url:
        return ""  # keys come from the key set
    if any(a.startswith("HS") for a in settings.token_algorithms):
        return settings.token_secret
    pem = settings.token_public_key
    if "-----BEGIN" not in pem:
        pem = Path(pem).expanduser().read_text(encoding="utf-8")
    return pem


class _BadSignature(Unauthorized):
    """The signature does not match the key: with a key set, perhaps the
    provider replaced the key under the same ``kid``."""


class Authenticator:
    """Checks tokens and API keys. Messages returned to clients never include
    the token or a key; they say which claim failed."""

    __slots__ = ("_algorithms", "_api_key", "_jwks", "_key", "_settings")

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._algorithms = list(settings.token_algorithms)
        self._key = _load_key(settings)
        self._api_key = settings.api_key.encode()
        self._jwks: JWKSCache | None = None
        if settings.jwks_url:
            self._jwks = JWKSCache(
                settings.jwks_url,
                self._algorithms,
                cache_min=settings.jwks_cache_min,
                cache_max=settings.jwks_cache_max,
                refetch_interval=settings.jwks_refetch_interval,
                timeout=settings.jwks_timeout,
            )

    @property
    def jwks(self) -> JWKSCache | None:
        """The identity provider's key set, when ``auth.jwks_url`` is set."""
        return self._jwks

    async def start(self) -> None:
        """Fetch the key set (if any); never fails: see ``JWKSCache.start``."""
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    def check_api_key(self, presented: str | None) -> bool:
        if not presented or not self._api_key:
            return False
        return hmac.compare_digest(presented.encode(), self._api_key)

    # ---- keys -------------------------------------------------------------

    def _header(self, token: object) -> tuple[str, str | None]:
        """The token's ``alg`` (one of ours) and ``kid``, before any key is
        looked up: a token in another algorithm never costs a refetch."""
        if not isinstance(token, str) or not token:
            raise Unauthorized("token must be a non-empty string")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthorized("token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("token 'kid' header must be a string")
        return alg, kid

    def _cached_key(self, token: object) -> tuple[Any, list[str]]:
        if self._jwks is None:
            return self._key, self._algorithms
        alg, kid = self._header(token)
        key = self._jwks.lookup(kid, alg)
        if key is None:
            if self._jwks.keys is None:
                raise Unauthorized("token signing keys are not available yet; try again later")
            raise Unauthorized("token 'kid' names no known signing key")
        return key.key, [alg]

    async def _claims(self, token: object, required: list[str]) -> dict[str, Any]:
        jwks = self._jwks
        if jwks is None:
            return self._decode(token, required)
        alg, kid = self._header(token)
        key = await jwks.key_for(kid, alg)
        try:
            return self._decode(token, required, key.key, [alg])
        except _BadSignature:
            # The provider may have replaced the key under the same kid:
            # refetch (rate limited, as for an unknown kid) and try once more.
            if not await jwks.refetch_on_demand():
                raise
            fresh = jwks.lookup(kid, alg)
            if fresh is None or fresh == key:
                raise
            return self._decode(token, required, fresh.key, [alg])

    # ---- tokens -----------------------------------------------------------

    def _decode(
        self,
        token: object,
        required: list[str],
        key: Any = None,
        algorithms: list[str] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise Unauthorized("token must be a non-empty string")
        if key is None:
            key, algorithms = self._key, self._algorithms
        if not key:
            raise Unauthorized("token verification is not configured")
        options: Any = {"require": required}
        kwargs: dict[str, Any] = {}
        if self._settings.token_audience:
            kwargs["audience"] = self._settings.token_audience
        else:
            options["verify_aud"] = False
        if self._settings.token_issuer:
            kwargs["issuer"] = self._settings.token_issuer
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=options,
                leeway=self._settings.leeway,
                **kwargs,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token is missing the {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise _BadSignature("token signature is invalid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience ('aud') is not accepted here") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer ('iss') is not accepted here") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        if not isinstance(claims.get("sub"), str):
            raise Unauthorized("token 'sub' claim must be a string")
        if not isinstance(claims.get("exp"), (int, float)):
            raise Unauthorized("token 'exp' claim must be a number")
        return claims

    @staticmethod
    def _connect_claims(claims: dict[str, Any]) -> ConnectClaims:
        if "channel" in claims:
            raise Unauthorized("a subscription token cannot be used to connect")
        channels = claims.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise Unauthorized("token 'channels' claim must be a list of strings")
        return ConnectClaims(
            user=claims["sub"], exp=float(claims["exp"]), info=claims.get("info"), channels=channels
        )

    @staticmethod
    def _subscription_exp(claims: dict[str, Any], user: str, client: str, channel: str) -> float:
        if claims["channel"] != channel:
            raise Unauthorized("subscription token is for another channel")
        if claims["sub"] != user:
            raise Unauthorized("subscription token is for another user")
        if "client" in claims and claims["client"] != client:
            raise Unauthorized("subscription token is for another client")
        return float(claims["exp"])

    def verify_connection_token(self, token: object) -> ConnectClaims:
        """Check a connection token now, with the keys at hand (with a key
        set: the cached one, never refetched). Sessions use the async form."""
        key, algorithms = self._cached_key(token)
        return self._connect_claims(self._decode(token, ["sub", "exp"], key, algorithms))

    async def verify_connection_token_async(self, token: object) -> ConnectClaims:
        """Check a connection token; with a key set, refetch it (rate
        limited) when the token's key is not in it."""
        return self._connect_claims(await self._claims(token, ["sub", "exp"]))

    def verify_subscription_token(
        self, token: object, *, user: str, client: str, channel: str
    ) -> float:
        """Return the token's ``exp``; raise if it does not grant ``channel``."""
        key, algorithms = self._cached_key(token)
        claims = self._decode(token, ["sub", "exp", "channel"], key, algorithms)
        return self._subscription_exp(claims, user, client, channel)

    async def verify_subscription_token_async(
        self, token: object, *, user: str, client: str, channel: str
    ) -> float:
        """``verify_subscription_token``, refetching the key set when needed."""
        claims = await self._claims(token, ["sub", "exp", "channel"])
        return self._subscription_exp(claims, user, client, channel)


_PBKDF2_ITERATIONS = 600_000


def hash_password(password: str, *, iterations: int = _PBKDF2_ITERATIONS) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<hash>`` for the dashboard password."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.urlsafe_b64encode
    return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, iterations, salt, digest = encoded.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        expected = base64.urlsafe_b64decode(digest)
        got = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.urlsafe_b64decode(salt), int(iterations)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def mint_token(
    settings: AuthSettings,
    *,
    sub: str,
    ttl: float = 3600,
    channel: str | None = None,
    client: str | None = None,
    info: Any = None,
    channels: list[str] | None = None,
    private_key: str | None = None,
) -> str:
    """Sign a connection token, or a subscription token when ``channel`` is set."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    if channel is not None:
        claims["channel"] = channel
    if client is not None:
        claims["client"] = client
    if info is not None:
        claims["info"] = info
    if channels:
        claims["channels"] = channels
    if settings.token_audience:
        claims["aud"] = settings.token_audience
    if settings.token_issuer:
        claims["iss"] = settings.token_issuer
    algorithm = settings.token_algorithms[0]
    if algorithm.startswith("HS"):
        key = settings.token_secret
    elif private_key:
        key = private_key
    else:
        raise ValueError(f"{algorithm} tokens need a private key (--private-key)")
    return jwt.encode(claims, key, algorithm=algorithm)

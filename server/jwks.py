"""Signing keys from an identity provider's JSON Web Key Set (``auth.jwks_url``).

The key set is fetched with Tornado's ``AsyncHTTPClient`` (timeouts, a size
cap) at start and kept in memory:

- **Cache.** A fetched set is kept as long as the provider's ``Cache-Control:
  max-age`` (less ``Age``) or ``Expires`` says, clamped between
  ``jwks_cache_min`` and ``jwks_cache_max``; no caching headers (or
  ``no-cache``/``no-store``) mean the floor. A background task fetches it
  again when it is due.
- **Unknown ``kid``.** A token naming a key that is not in the set (the
  provider rotated its keys), or whose signature fails with the cached key of
  its ``kid`` (a provider that reuses key ids), makes one refetch, at most one
  per ``jwks_refetch_interval`` seconds: within that interval the token is
  refused and one fetch is scheduled for when the interval is over, so a flood
  of made-up key ids costs the provider nothing more. Concurrent requests for
  a refetch share one fetch.
- **Provider down.** A failed fetch (unreachable, not JSON, no usable key)
  keeps the cached set and logs a warning; the next try backs off (1 s
  doubling to 60 s, with jitter). When no set was ever fetched, tokens are
  refused with a clear message until one is, and start never fails because of
  it (it logs an error).

Only keys that fit a configured algorithm are used: ``RSA`` for RS*/PS*,
``EC`` on the matching curve for ES*, ``OKP`` Ed25519 for EdDSA. A JWK's own
``alg`` narrows that to one algorithm; keys for encryption (``use: enc``) and
symmetric (``oct``) keys are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
import orjson
import tornado.httpclient

from server.errors import Unauthorized

log = logging.getLogger("squall.jwks")

# Largest JWKS answer read (real ones are a few KB).
MAX_BODY_BYTES = 1024 * 1024
# Retries of a failed fetch: the first after RETRY_FIRST seconds, doubling up to RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0

# Which key types and curves each algorithm can use.
_RSA = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = {"EdDSA": ("Ed25519", "Ed448")}


class JWKSError(Exception):
    """A key set could not be fetched or used. The message is for operators
    (logs, ``squall check-config``); clients only ever see ``Unauthorized``."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    kty: str
    algorithms: frozenset[str]
    key: Any  # a cryptography public key object

    def describe(self) -> str:
        return f"{self.kid or '(no kid)'} ({self.kty}: {', '.join(sorted(self.algorithms))})"


@dataclass(frozen=True, slots=True)
class KeySet:
    by_kid: Mapping[str, SigningKey]
    unnamed: tuple[SigningKey, ...]
    # Why keys of the document were left out, for the operator.
    skipped: tuple[str, ...] = ()

    @property
    def keys(self) -> list[SigningKey]:
        return [*self.by_kid.values(), *self.unnamed]

    def describe(self) -> str:
        return "; ".join(k.describe() for k in self.keys)


def safe_url(url: str) -> str:
    """The URL without user info, query or fragment: fit for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _fits(jwk: Mapping[str, Any], algorithms: Sequence[str]) -> tuple[set[str], str]:
    """The configured algorithms this JWK can verify, or why none."""
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if kty == "RSA":
        fits = {a for a in algorithms if a in _RSA}
    elif kty == "EC":
        fits = {a for a in algorithms if _EC_CURVES.get(a) == crv}
    elif kty == "OKP":
        fits = {a for a in algorithms if crv in _OKP_CURVES.get(a, ())}
    elif kty == "oct":
        return set(), "a symmetric (oct) key is never used"
    else:
        return set(), f"unsupported key type {kty!r}"
    declared = jwk.get("alg")
    if declared is not None:
        if not isinstance(declared, str) or declared not in fits:
            return set(), f"its alg {declared!r} is not configured or does not fit a {kty} key"
        fits = {declared}
    if not fits:
        shown = f"{kty} {crv}" if crv else str(kty)
        return set(), f"a {shown} key fits none of {', '.join(algorithms)}"
    return fits, ""


def parse_jwks(body: bytes, algorithms: Sequence[str]) -> KeySet:
    """The usable signing keys of a JWKS document; ``JWKSError`` when it is
    not one or has none for the configured ``algorithms``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JWKSError("the answer is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JWKSError("the answer is not a JWK Set (no 'keys' list)")
    by_kid: dict[str, SigningKey] = {}
    unnamed: list[SigningKey] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"key #{i}: not an object")
            continue
        kid = jwk.get("kid")
        name = f"key {kid!r}" if kid is not None else f"key #{i}"
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{name}: its kid is not a string")
            continue
        if jwk.get("use", "sig") != "sig":
            skipped.append(f"{name}: use is {jwk.get('use')!r}, not 'sig'")
            continue
        ops = jwk.get("key_ops")
        # A signing key's public half verifies: "sign" (as some providers
        # copy it from the private key) is taken as "verify".
        if ops is not None and (
            not isinstance(ops, list) or not any(op in ("verify", "sign") for op in ops)
        ):
            skipped.append(f"{name}: key_ops has neither 'verify' nor 'sign'")
            continue
        fits, why = _fits(jwk, algorithms)
        if not fits:
            skipped.append(f"{name}: {why}")
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=sorted(fits)[0]).key
        except Exception as exc:  # any malformed member: leave the key out
            skipped.append(f"{name}: not a valid {jwk.get('kty')} key ({exc.__class__.__name__})")
            continue
        if hasattr(key, "public_key"):  # published private material: use only the public half
            key = key.public_key()
        signing = SigningKey(kid, str(jwk["kty"]), frozenset(fits), key)
        if kid is None:
            unnamed.append(signing)
        elif kid in by_kid:
            skipped.append(f"{name}: a second key with the same kid")
        else:
            by_kid[kid] = signing
    if not by_kid and not unnamed:
        why = "; ".join(skipped) if skipped else "the set is empty"
        raise JWKSError(f"no usable signing key for {', '.join(algorithms)} ({why})")
    return KeySet(by_kid, tuple(unnamed), tuple(skipped))


def _header_values(headers: Any, name: str) -> list[str]:
    if hasattr(headers, "get_list"):
        return [str(v) for v in headers.get_list(name)]
    value = headers.get(name)
    return [] if value is None else [str(value)]


def _http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def cache_lifetime(
    headers: Any, *, floor: float, ceiling: float, now: float | None = None
) -> float:
    """Seconds to keep a response with these headers (a mapping or Tornado's
    ``HTTPHeaders``), from ``Cache-Control`` (``max-age`` less ``Age``) or
    else ``Expires``, clamped to ``[floor, ceiling]``. No usable header,
    ``no-cache`` or ``no-store``: the floor."""
    seconds: float | None = None
    directives: dict[str, str] = {}
    for value in _header_values(headers, "Cache-Control"):
        for part in value.split(","):
            key, _, arg = part.strip().partition("=")
            if key:
                directives.setdefault(key.strip().lower(), arg.strip().strip('"'))
    if "no-store" in directives or "no-cache" in directives:
        seconds = 0.0
    elif "max-age" in directives:
        with contextlib.suppress(ValueError):
            seconds = float(int(directives["max-age"]))
            ages = _header_values(headers, "Age")
            with contextlib.suppress(ValueError, IndexError):
                seconds -= float(int(ages[0]))
    if seconds is None:
        expires = _header_values(headers, "Expires")
        if expires:
            at = _http_date(expires[0])
            dates = _header_values(headers, "Date")
            base = _http_date(dates[0]) if dates else None
            if base is None:
                base = time.time() if now is None else now
            # An unparsable Expires ("0", "-1") means already expired.
            seconds = 0.0 if at is None else at - base
    if seconds is None:
        return floor
    return min(ceiling, max(floor, seconds))


class JWKSCache:
    """The key set of one JWKS URL, fetched, cached and refetched as the
    module's docstring says. ``start`` before use, ``close`` after."""

    def __init__(
        self,
        url: str,
        algorithms: Sequence[str],
        *,
        cache_min: float = 60.0,
        cache_max: float = 86400.0,
        refetch_interval: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.algorithms = list(algorithms)
        self.cache_min = cache_min
        self.cache_max = cache_max
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self.keys: KeySet | None = None
        # For operators and tests: fetches tried, how many failed, the last error.
        self.fetches = 0
        self.failures = 0
        self.last_error = ""
        self._shown = safe_url(url)
        self._http: tornado.httpclient.AsyncHTTPClient | None = None
        self._inflight: asyncio.Future[KeySet] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._last_fetch = -float("inf")  # monotonic start of the last fetch
        self._next_at = 0.0  # monotonic time of the next scheduled fetch
        self._retries = 0  # failed fetches in a row
        self._closed = False

    # ---- life cycle -----------------------------------------------------

    async def start(self) -> None:
        """Fetch the set once (errors are logged, never raised), then keep it
        fresh in the background."""
        try:
            await self.refresh()
        except JWKSError:
            pass  # logged loudly by the fetch; the background task retries
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._inflight = None
        if self._http is not None:
            self._http.close()
            self._http = None

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            self._wake.clear()
            delay = self._next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            with contextlib.suppress(JWKSError):
                await self.refresh()

    # ---- fetching -------------------------------------------------------

    async def refresh(self) -> KeySet:
        """Fetch the set now, or join the fetch under way."""
        if self._inflight is None:
            inflight = asyncio.ensure_future(self._fetch())
            inflight.add_done_callback(self._fetched)
            self._inflight = inflight
        return await asyncio.shield(self._inflight)

    def _fetched(self, future: asyncio.Future[KeySet]) -> None:
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # retrieved: each waiter re-raises it

    async def _fetch(self) -> KeySet:
        self._last_fetch = time.monotonic()
        self.fetches += 1
        try:
            keys, lifetime = await self._get()
        except JWKSError as exc:
            self._failed(str(exc))
            raise
        changed = self.keys is None or set(self.keys.by_kid) != set(keys.by_kid)
        self.keys = keys
        self._retries = 0
        self.last_error = ""
        self._next_at = time.monotonic() + lifetime
        (log.info if changed else log.debug)(
            "JWKS %s: %d signing keys [%s], kept %.0fs",
            self._shown, len(keys.keys), keys.describe(), lifetime,
        )  # fmt: skip
        for why in keys.skipped:
            log.debug("JWKS %s: left out %s", self._shown, why)
        return keys

    async def fetch_once(self) -> tuple[KeySet, float]:
        """Fetch and parse the set once, and say how long it would be kept;
        nothing is cached or logged (``squall check-config``)."""
        try:
            return await self._get()
        finally:
            if self._http is not None and self._task is None:
                self._http.close()
                self._http = None

    async def _get(self) -> tuple[KeySet, float]:
        if self._http is None:
            self._http = tornado.httpclient.AsyncHTTPClient(
                force_instance=True, max_body_size=MAX_BODY_BYTES
            )
        request = tornado.httpclient.HTTPRequest(
            self.url,
            headers={"Accept": "application/json"},
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=True,
            max_redirects=3,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any transport failure: unreachable
            raise JWKSError(f"cannot fetch {self._shown}: {exc}") from None
        if response.code != 200:
            raise JWKSError(f"{self._shown} answered HTTP {response.code}")
        try:
            keys = parse_jwks(response.body or b"", self.algorithms)
        except JWKSError as exc:
            raise JWKSError(f"{self._shown}: {exc}") from None
        lifetime = cache_lifetime(response.headers, floor=self.cache_min, ceiling=self.cache_max)
        return keys, lifetime

    def _failed(self, message: str) -> None:
        self.failures += 1
        self._retries += 1
        self.last_error = message
        backoff = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._retries - 1))
        backoff *= random.uniform(0.75, 1.0)  # jitter
        self._next_at = time.monotonic() + backoff
        if self.keys is None:
            log.error(
                "JWKS: NO SIGNING KEYS: %s. Every token is refused until the keys arrive; "
                "trying again in %.0fs", message, backoff,
            )  # fmt: skip
        else:
            log.warning(
                "JWKS: %s; still using the %d cached keys, trying again in %.0fs",
                message, len(self.keys.keys), backoff,
            )  # fmt: skip

    async def refetch_on_demand(self) -> bool:
        """Refetch because a token needs a key the cached set lacks. At most
        one fetch per ``refetch_interval``: within it, one fetch is scheduled
        for when it is over and False returned. True when a fetch was made
        (or joined), whatever its outcome."""
        if self._closed:
            return False
        if self._inflight is not None:
            with contextlib.suppress(JWKSError):
                await self.refresh()
            return True
        now = time.monotonic()
        wait = self._last_fetch + self.refetch_interval - now
        if wait > 0:
            if self._next_at > now + wait:
                self._next_at = now + wait
                if self._wake is not None:
                    self._wake.set()
            return False
        with contextlib.suppress(JWKSError):
            await self.refresh()
        return True

    # ---- keys for tokens --------------------------------------------------

    def lookup(self, kid: str | None, alg: str) -> SigningKey | None:
        """The cached key for a token's ``kid`` and ``alg``, or None when the
        set lacks it. Raises ``Unauthorized`` when the answer cannot change by
        fetching again."""
        keys = self.keys
        if keys is None:
            return None
        if kid is not None:
            key = keys.by_kid.get(kid)
            if key is not None and alg not in key.algorithms:
                raise Unauthorized("token algorithm does not match its key")
            return key
        fitting = [k for k in keys.keys if alg in k.algorithms]
        if len(fitting) > 1:
            raise Unauthorized("token has no 'kid' header and several keys could sign it")
        return fitting[0] if fitting else None

    async def key_for(self, kid: str | None, alg: str) -> SigningKey:
        """The key to verify a token with, refetching once (rate limited)
        when the cached set lacks it; ``Unauthorized`` when there is none."""
        key = self.lookup(kid, alg)
        if key is None and await self.refetch_on_demand():
            key = self.lookup(kid, alg)
        if key is not None:
            return key
        if self.keys is None:
            raise Unauthorized("token signing keys are not available yet; try again later")
        if kid is None:
            raise Unauthorized("token has no 'kid' header and no key fits its algorithm")
        raise Unauthorized("token 'kid' names no known signing key")

    def describe(self) -> str:
        keys = self.keys
        return keys.describe() if keys is not None else "(none)"

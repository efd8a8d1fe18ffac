"""Error codes for command replies and close codes for disconnects.

What the client sees (code and message) is kept apart from what is logged.
``docs/protocol.md`` is the contract for every number here.
"""

from __future__ import annotations

from dataclasses import dataclass


class SquallError(Exception):
    """A command failed; the client gets ``{"error": {"code", "message"}}``."""

    code = 100
    message = "internal server error"
    http_status = 500

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class InternalError(SquallError):
    code = 100
    message = "internal server error"
    http_status = 500


class Unauthorized(SquallError):
    code = 101
    message = "unauthorized"
    http_status = 401


class UnknownChannel(SquallError):
    code = 102
    message = "unknown channel"
    http_status = 400


class PermissionDenied(SquallError):
    code = 103
    message = "permission denied"
    http_status = 403


class MethodNotFound(SquallError):
    code = 104
    message = "method not found"
    http_status = 404


class AlreadySubscribed(SquallError):
    code = 105
    message = "already subscribed"
    http_status = 409


class LimitExceeded(SquallError):
    code = 106
    message = "limit exceeded"
    http_status = 400


class BadRequest(SquallError):
    code = 107
    message = "bad request"
    http_status = 400


class NotAvailable(SquallError):
    code = 108
    message = "not available"
    http_status = 400


class TokenExpired(SquallError):
    code = 109
    message = "token expired"
    http_status = 401


class NotSubscribed(SquallError):
    code = 110
    message = "not subscribed"
    http_status = 400


class TooManyRequests(SquallError):
    code = 111
    message = "too many requests"
    http_status = 429


class BadSubscriptionToken(PermissionDenied):
    """A subscription token that does not verify (Squall's protocol answers
    "permission denied"; ``expired`` says whether only its time is up)."""

    def __init__(self, message: str | None = None, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class Unrecoverable(SquallError):
    code = 112
    message = "unrecoverable position"
    http_status = 400


class NotConnected(SquallError):
    code = 113
    message = "connect first"
    http_status = 400


class Unavailable(SquallError):
    code = 114
    message = "service unavailable"
    http_status = 503


class MessageTooLarge(SquallError):
    code = 115
    message = "message too large"
    http_status = 413


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Why the server closes a connection. Codes 3000-3499 mean "reconnect
    (with backoff) and recover"; codes 3500-3999 mean "do not reconnect
    without changing something" (a new token, a fixed client)."""

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return self.code < 3500


# Reconnect range.
SHUTDOWN = Disconnect(3001, "shutdown")
EXPIRED = Disconnect(3005, "token expired")
SLOW = Disconnect(3008, "slow")
WRITE_ERROR = Disconnect(3009, "write error")
INSUFFICIENT_STATE = Disconnect(3010, "insufficient state")
FORCE_RECONNECT = Disconnect(3011, "force reconnect")
NO_PONG = Disconnect(3012, "no pong")
# Do-not-reconnect range.
INVALID_TOKEN = Disconnect(3500, "invalid token")
BAD_REQUEST = Disconnect(3501, "bad request")
CONNECT_TIMEOUT = Disconnect(3502, "connect timeout")
FORCE_DISCONNECT = Disconnect(3503, "force disconnect")

ALL_DISCONNECTS = (
    SHUTDOWN,
    EXPIRED,
    SLOW,
    WRITE_ERROR,
    INSUFFICIENT_STATE,
    FORCE_RECONNECT,
    NO_PONG,
    INVALID_TOKEN,
    BAD_REQUEST,
    CONNECT_TIMEOUT,
    FORCE_DISCONNECT,
)

"""The Pusher Channels HTTP API (``/apps/<app_id>/...``), driven by Pusher's
own server SDK (the PyPI ``pusher`` package) against a running Squall, and
by hand-signed requests so the signature algorithm is pinned without it.

Pusher's SDKs need a numeric app id, so the app here is ``1234``; its
channels live in the namespace ``pusher-1234``, where Squall-protocol
clients subscribe with subscription tokens (the namespace is private).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import orjson
import pusher
import pusher.errors
import pytest
import tornado.httpclient

from server.config import PusherApp
from server.pusher import RequestRefused, channel_auth_valid, verify_request
from tests.conftest import RawWS, Running, ServerFactory

APP_ID = "1234"
KEY = "app-key"
SECRET = "app-secret-0123456789"
NS = f"pusher-{APP_ID}"
CONFIG: dict[str, Any] = {"pusher": {"apps": [{"id": APP_ID, "key": KEY, "secret": SECRET}]}}


@pytest.fixture
async def server(make_server: ServerFactory) -> Running:
    return await make_server(CONFIG)


@pytest.fixture
def sdk_factory(server: Running) -> Iterator[Callable[..., pusher.Pusher]]:
    """Pusher's server SDK pointed at the server; its HTTP sessions closed
    at the end."""
    made: list[pusher.Pusher] = []

    def make(**overrides: Any) -> pusher.Pusher:
        args: dict[str, Any] = {
            "app_id": APP_ID,
            "key": KEY,
            "secret": SECRET,
            "host": "127.0.0.1",
            "port": server.port,
            "ssl": False,
        }
        args.update(overrides)
        client = pusher.Pusher(**args)
        made.append(client)
        return client

    yield make
    for client in made:
        client._pusher_client.http.session.close()
        client._authentication_client.http.session.close()


@pytest.fixture
def sdk(sdk_factory: Callable[..., pusher.Pusher]) -> pusher.Pusher:
    return sdk_factory()


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The SDK is synchronous (requests): run it off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def subscriber(server: Running, user: str, channel: str) -> RawWS:
    """A Squall-protocol client of ``user`` subscribed to the app's Pusher
    ``channel`` with a subscription token."""
    raw = await server.connected(user)
    name = f"{NS}:{channel}"
    reply = await raw.call(
        "subscribe", {"channel": name, "token": server.token(user, channel=name)}
    )
    assert "result" in reply, reply
    return raw


async def settled(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``await check()`` holds (presence is joined asynchronously)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await asyncio.sleep(0.01)


async def offset(server: Running, channel: str) -> int:
    result = await server.api().history(f"{NS}:{channel}", limit=0)
    return int(result["offset"])


# ---- hand-signed requests --------------------------------------------------


def signed_url(
    server: Running,
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    params: dict[str, str] | None = None,
    secret: str = SECRET,
    timestamp: int | None = None,
    md5: str | None = None,
) -> str:
    """Sign a request as Pusher's HTTP API reference describes, by hand."""
    query = {
        "auth_key": KEY,
        "auth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "auth_version": "1.0",
        **(params or {}),
    }
    if body or md5 is not None:
        query["body_md5"] = hashlib.md5(body).hexdigest() if md5 is None else md5
    signed = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
    message = f"{method}\n{path}\n{signed}"
    query["auth_signature"] = hmac.new(
        secret.encode(), message.encode(), hashlib.sha256
    ).hexdigest()
    return f"{server.http_url}{path}?{urlencode(query)}"


async def fetch(
    server: Running, path: str, *, method: str = "GET", body: Any = None, **sign: Any
) -> tuple[int, bytes]:
    data = b"" if body is None else orjson.dumps(body)
    url = signed_url(server, path, method=method, body=data, **sign)
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        url,
        method=method,
        body=data if method == "POST" else None,
        headers={"Content-Type": "application/json"},
        raise_error=False,
    )
    return response.code, response.body


EVENTS = f"/apps/{APP_ID}/events"


# ---- triggering ------------------------------------------------------------


async def test_trigger_reaches_a_squall_subscriber(server: Running, sdk: pusher.Pusher) -> None:
    raw = await subscriber(server, "alice", "news")
    assert await call(sdk.trigger, "news", "my-event", {"hello": "world"}) == {}
    push = await raw.push("pub")
    assert push["channel"] == f"{NS}:news"
    assert push["pub"]["data"] == {"event": "my-event", "data": '{"hello": "world"}'}
    assert "info" not in push["pub"]


async def test_trigger_to_several_channels(server: Running, sdk: pusher.Pusher) -> None:
    a = await subscriber(server, "alice", "a")
    b = await subscriber(server, "bob", "private-b")
    assert await call(sdk.trigger, ["a", "private-b"], "update", "plain text") == {}
    for raw in (a, b):
        assert (await raw.push("pub"))["pub"]["data"] == {"event": "update", "data": "plain text"}
    assert await offset(server, "a") == 1
    assert await offset(server, "private-b") == 1


async def test_trigger_with_socket_id_sets_the_publisher(
    server: Running, sdk: pusher.Pusher
) -> None:
    raw = await subscriber(server, "alice", "news")
    await call(sdk.trigger, "news", "ev", "x", socket_id="123.456")
    push = await raw.push("pub")
    # The core leaves this socket out of a Pusher channel's delivery.
    assert push["pub"]["info"]["client"] == "123.456"


async def test_trigger_batch(server: Running, sdk: pusher.Pusher) -> None:
    raw = await subscriber(server, "alice", "news")
    batch = [
        {"channel": "news", "name": "first", "data": "1"},
        {"channel": "other", "name": "second", "data": {"n": 2}},
        {"channel": "news", "name": "third", "data": "3"},
    ]
    assert await call(sdk.trigger_batch, batch) == {}
    assert (await raw.push("pub"))["pub"]["data"] == {"event": "first", "data": "1"}
    assert (await raw.push("pub"))["pub"]["data"] == {"event": "third", "data": "3"}
    assert await offset(server, "other") == 1


async def test_trigger_info_attributes(server: Running) -> None:
    await subscriber(server, "alice", "presence-room")
    await subscriber(server, "bob", "presence-room")
    await subscriber(server, "bob", "news")
    info = "user_count,subscription_count"
    body = {"name": "e", "data": "d", "channels": ["presence-room", "news"], "info": info}

    async def counted() -> bool:
        members = await server.node.broker.presence(f"{NS}:presence-room")
        return len(members) == 2

    await settled(counted)
    code, reply = await fetch(server, EVENTS, method="POST", body=body)
    assert code == 200, reply
    assert orjson.loads(reply) == {
        "channels": {
            "presence-room": {"user_count": 2, "subscription_count": 2},
            "news": {"subscription_count": 1},
        }
    }
    batch = {
        "batch": [
            {"channel": "news", "name": "e", "data": "d"},
            {"channel": "presence-room", "name": "e", "data": "d", "info": "user_count"},
        ]
    }
    code, reply = await fetch(server, f"/apps/{APP_ID}/batch_events", method="POST", body=batch)
    assert code == 200, reply
    assert orjson.loads(reply) == {"batch": [{}, {"user_count": 2}]}


# ---- channel state -----------------------------------------------------------


async def test_channels_channel_and_users(server: Running, sdk: pusher.Pusher) -> None:
    await subscriber(server, "alice", "presence-room")
    await subscriber(server, "bob", "presence-room")
    await subscriber(server, "bob", "news")

    async def two_members() -> bool:
        info = await call(sdk.channel_info, "presence-room", ["user_count"])
        return bool(info.get("user_count") == 2)

    await settled(two_members)
    assert await call(sdk.channels_info) == {"channels": {"news": {}, "presence-room": {}}}
    assert await call(sdk.channels_info, "presence-", ["user_count"]) == {
        "channels": {"presence-room": {"user_count": 2}}
    }
    assert await call(sdk.channels_info, "new") == {"channels": {"news": {}}}
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(sdk.channels_info, None, ["user_count"])

    assert await call(sdk.channel_info, "news", ["subscription_count"]) == {
        "occupied": True,
        "subscription_count": 1,
    }
    assert await call(sdk.channel_info, "presence-room", ["user_count", "subscription_count"]) == {
        "occupied": True,
        "user_count": 2,
        "subscription_count": 2,
    }
    assert await call(sdk.channel_info, "empty") == {"occupied": False}
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(sdk.channel_info, "news", ["user_count"])

    users = await call(sdk.users_info, "presence-room")
    assert sorted(u["id"] for u in users["users"]) == ["alice", "bob"]
    with pytest.raises(pusher.errors.PusherBadRequest):
        await call(sdk.users_info, "news")


async def test_terminate_user_connections(server: Running, sdk: pusher.Pusher) -> None:
    carol = await server.connected("carol")
    dave = await server.connected("dave")
    assert await call(sdk.terminate_user_connections, "carol") == {}
    assert (await carol.closed())[0] == 3503
    # The documented path, with the app id, does the same.
    code, body = await fetch(
        server, f"/apps/{APP_ID}/users/dave/terminate_connections", method="POST", body={}
    )
    assert (code, orjson.loads(body)) == (200, {})
    assert (await dave.closed())[0] == 3503


async def test_authenticate_is_accepted_by_channel_auth(
    server: Running, sdk: pusher.Pusher
) -> None:
    app = server.settings.pusher.apps[0]
    private = await call(sdk.authenticate, "private-room", "1.2")
    assert channel_auth_valid(app, "1.2", "private-room", private["auth"], None)
    assert not channel_auth_valid(app, "1.3", "private-room", private["auth"], None)
    presence = await call(sdk.authenticate, "presence-room", "1.2", {"user_id": "alice"})
    assert channel_auth_valid(
        app, "1.2", "presence-room", presence["auth"], presence["channel_data"]
    )
    assert not channel_auth_valid(app, "1.2", "presence-room", presence["auth"], '{"user_id":"x"}')


# ---- refusals: each changes nothing -----------------------------------------


async def test_wrong_secret_is_401(
    server: Running, sdk_factory: Callable[..., pusher.Pusher]
) -> None:
    wrong = sdk_factory(secret="not-the-secret-0123456789")
    with pytest.raises(pusher.errors.PusherBadAuth):
        await call(wrong.trigger, "news", "e", "d")
    with pytest.raises(pusher.errors.PusherBadAuth):
        await call(wrong.channels_info)
    other_key = sdk_factory(key="other-key")
    with pytest.raises(pusher.errors.PusherBadAuth):
        await call(other_key.trigger, "news", "e", "d")
    assert await offset(server, "news") == 0


async def test_unknown_app_is_404(
    server: Running, sdk_factory: Callable[..., pusher.Pusher]
) -> None:
    with pytest.raises(pusher.errors.PusherBadStatus, match=r"^404"):
        await call(sdk_factory(app_id="9999").trigger, "news", "e", "d")
    code, _ = await fetch(server, f"/apps/{APP_ID}/nothing-here")
    assert code == 404


async def test_too_large_data_is_413(server: Running, sdk: pusher.Pusher) -> None:
    with pytest.raises(pusher.errors.PusherBadStatus, match=r"^413"):
        await call(sdk.trigger, "news", "e", "x" * (10 * 1024 + 1))
    assert await offset(server, "news") == 0


@pytest.mark.parametrize(
    ("sign", "reason"),
    [
        ({"timestamp": -601}, b"Timestamp expired"),
        ({"md5": hashlib.md5(b"another body").hexdigest()}, b"body_md5"),
        ({"secret": "wrong-secret-0123456789"}, b"Invalid signature"),
    ],
)
async def test_bad_signature_is_401(server: Running, sign: dict[str, Any], reason: bytes) -> None:
    body = {"name": "e", "data": "d", "channel": "news"}
    if "timestamp" in sign:  # seconds from now
        sign = {**sign, "timestamp": int(time.time()) + sign["timestamp"]}
    code, text = await fetch(server, EVENTS, method="POST", body=body, **sign)
    assert code == 401
    assert reason in text
    assert SECRET.encode() not in text
    assert await offset(server, "news") == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "e", "data": "d", "channel": "bad name!"},
        {"name": "e", "data": "d", "channels": ["good", "#server-to-user-1"]},
        {"name": "e", "data": "d", "channels": [f"c{i}" for i in range(101)]},
        {"name": "e", "data": "d"},
        {"name": "e", "data": {"not": "a string"}, "channel": "good"},
        {"name": "", "data": "d", "channel": "good"},
        {"name": "e", "data": "d", "channel": "good", "socket_id": "nope"},
        {"name": "e", "data": "d", "channels": ["private-encrypted-a", "good"]},
        # Found by the fuzzer: a non-string channel was hashed first, a 500.
        {"name": "e", "data": "d", "channel": ["good"]},
        {"name": "e", "data": "d", "channels": ["good", {"a": 1}]},
    ],
)
async def test_bad_event_is_400(server: Running, body: dict[str, Any]) -> None:
    code, _ = await fetch(server, EVENTS, method="POST", body=body)
    assert code == 400
    assert await offset(server, "good") == 0
    assert server.node.metrics.publications_in == 0


async def test_batch_limits(server: Running) -> None:
    path = f"/apps/{APP_ID}/batch_events"
    eleven = {"batch": [{"channel": "good", "name": "e", "data": "d"}] * 11}
    assert (await fetch(server, path, method="POST", body=eleven))[0] == 400
    # One bad event refuses the whole batch before anything is published.
    mixed = {
        "batch": [
            {"channel": "good", "name": "e", "data": "d"},
            {"channel": "good", "name": "e", "data": "x" * (10 * 1024 + 1)},
        ]
    }
    assert (await fetch(server, path, method="POST", body=mixed))[0] == 413
    assert await offset(server, "good") == 0


# ---- the signature, pinned without the SDK -----------------------------------


async def test_hand_signed_request(server: Running) -> None:
    raw = await subscriber(server, "alice", "news")
    body = {"name": "hand", "data": '{"signed": true}', "channels": ["news"]}
    code, reply = await fetch(server, EVENTS, method="POST", body=body)
    assert (code, orjson.loads(reply)) == (200, {})
    assert (await raw.push("pub"))["pub"]["data"] == {"event": "hand", "data": '{"signed": true}'}
    # A GET signs its query parameters (and may leave body_md5 out).
    path = f"/apps/{APP_ID}/channels"
    code, reply = await fetch(server, path, params={"filter_by_prefix": "ne"})
    assert (code, orjson.loads(reply)) == (200, {"channels": {"news": {}}})
    # Changing a signed parameter after signing breaks the signature.
    url = signed_url(server, path, params={"filter_by_prefix": "ne"})
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        url.replace("filter_by_prefix=ne", "filter_by_prefix=x"), raise_error=False
    )
    assert response.code == 401


def test_pusher_reference_example_verifies() -> None:
    """The worked example of Pusher's HTTP API reference: its body, key,
    secret, timestamp and signature."""
    app = PusherApp(id="3", key="278d425bdf160c739803", secret="7ad3773142a6692b25b8")
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    params = {
        "auth_key": "278d425bdf160c739803",
        "auth_timestamp": "1353088179",
        "auth_version": "1.0",
        "body_md5": "ec365a775a4cd0599faeb73354201b6f",
        "auth_signature": "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
    }
    verify_request(app, "POST", "/apps/3/events", params, body, now=1353088179 + 10)
    with pytest.raises(RequestRefused) as info:
        verify_request(app, "POST", "/apps/3/events", params, body, now=1353088179 + 601)
    assert info.value.status == 401
    with pytest.raises(RequestRefused):
        verify_request(app, "POST", "/apps/3/events", params, body + b" ", now=1353088179)
    tampered = {**params, "auth_signature": "0" * 64}
    with pytest.raises(RequestRefused):
        verify_request(app, "POST", "/apps/3/events", tampered, body, now=1353088179)


async def test_no_routes_without_apps(make_server: ServerFactory) -> None:
    plain = await make_server()
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"{plain.http_url}/apps/{APP_ID}/channels", raise_error=False
    )
    assert response.code == 404


async def test_an_event_to_a_user(server: Running) -> None:
    """Pusher's send_to_user: the channel #server-to-user-<id>, alone."""
    raw = await subscriber(server, "u7", "#server-to-user-u7")
    body = {"name": "notice", "data": "hi", "channel": "#server-to-user-u7"}
    code, reply = await fetch(server, EVENTS, method="POST", body=body)
    assert (code, orjson.loads(reply)) == (200, {})
    assert (await raw.push("pub"))["pub"]["data"] == {"event": "notice", "data": "hi"}
    # Listed nowhere: user channels are no app channels.
    code, reply = await fetch(server, f"/apps/{APP_ID}/channels")
    assert code == 200 and "#server-to-user-u7" not in orjson.loads(reply)["channels"]


async def test_the_event_size_limit_is_the_apps(make_server: ServerFactory) -> None:
    small = {"id": APP_ID, "key": KEY, "secret": SECRET, "max_event_bytes": 100}
    server = await make_server({"pusher": {"apps": [small]}})
    event = {"name": "e", "data": "x" * 100, "channel": "news"}
    assert (await fetch(server, EVENTS, method="POST", body=event))[0] == 200
    event["data"] += "x"
    code, text = await fetch(server, EVENTS, method="POST", body=event)
    assert code == 413 and b"limit is 100" in text
    assert await offset(server, "news") == 1


async def test_batch_event_with_a_non_string_channel_is_400(server: Running) -> None:
    """Found by the fuzzer (a 500 before): the whole batch is refused."""
    path = f"/apps/{APP_ID}/batch_events"
    body = {"batch": [{"channel": "good", "name": "e", "data": "d"},
                      {"channel": ["good"], "name": "e", "data": "d"}]}  # fmt: skip
    assert (await fetch(server, path, method="POST", body=body))[0] == 400
    assert await offset(server, "good") == 0

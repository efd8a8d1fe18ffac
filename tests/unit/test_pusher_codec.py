"""The Pusher Channels codec without I/O: frames in, commands out; results,
publications and presence out as the Pusher protocol shows them."""

from __future__ import annotations

import random
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import errors
from server.codec import Command, ConnectResult, InvalidCommand, ProtocolViolation, SubscribeResult
from server.codecs.pusher import PusherCodec
from server.config import PusherApp
from server.models import ClientInfo, Publication
from server.pusher import channel_auth_valid, envelope, event_of, sign
from tests.unit.test_centrifuge_codec import FUZZ, mutants

APP = PusherApp(id="app1", key="app-key", secret="app-secret-0123456789", namespace="pusher-app1")
CODEC = PusherCodec(APP, activity_timeout=120)


def auth(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    message = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return f"{APP.key}:{sign(APP.secret, message)}"


def decode_one(msg: dict[str, Any]) -> Command | InvalidCommand:
    (command,) = CODEC.decode(orjson.dumps(msg))
    return command


def server_message(raw: bytes) -> dict[str, Any]:
    """A server message with its string ``data`` decoded."""
    msg: dict[str, Any] = orjson.loads(raw)
    if isinstance(msg.get("data"), str):
        try:
            msg["data"] = orjson.loads(msg["data"])
        except orjson.JSONDecodeError:
            pass
    return msg


def test_socket_ids_have_the_form_the_server_sdks_check() -> None:
    ids = {CODEC.client_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"\d+\.\d+", i) for i in ids)


def test_the_opening_is_a_connect_and_its_answer_the_established_message() -> None:
    (command,) = CODEC.decode(b"")
    assert isinstance(command, Command) and command.method == "connect"
    result = ConnectResult("123.456", "0.1", "n1", 25, False, None)
    msg = server_message(CODEC.reply(command, result))
    assert msg == {
        "event": "pusher:connection_established",
        "data": {"socket_id": "123.456", "activity_timeout": 120},
    }


def test_subscribe_maps_the_channel_into_the_apps_namespace() -> None:
    command = decode_one({"event": "pusher:subscribe", "data": {"channel": "news"}})
    assert isinstance(command, Command)
    assert command.method == "subscribe"
    assert command.params["channel"] == "pusher-app1:news"
    reply = server_message(CODEC.reply(command, SubscribeResult(0, "e", True)))
    assert reply == {
        "event": "pusher_internal:subscription_succeeded",
        "channel": "news",
        "data": {},
    }


def test_data_sent_as_a_string_is_read_too() -> None:
    command = decode_one({"event": "pusher:subscribe", "data": '{"channel": "news"}'})
    assert isinstance(command, Command) and command.params["channel"] == "pusher-app1:news"


@pytest.mark.parametrize(
    "frame",
    [b"not json", b"[1, 2]", b'{"data": {}}', b'{"event": 5}'],
)
def test_a_frame_that_is_not_a_pusher_message_is_a_violation(frame: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        CODEC.decode(frame)


@pytest.mark.parametrize(
    "msg",
    [
        {"event": "pusher:subscribe", "data": {"channel": "bad channel"}},
        {"event": "pusher:subscribe", "data": {"channel": "x" * 201}},
        {"event": "pusher:subscribe", "data": 5},
        {"event": "pusher:unsubscribe", "data": {"channel": "a:b"}},
        {"event": "client-typing", "channel": "bad channel", "data": {}},
        {"event": "something-else", "data": {}},
    ],
)
def test_bad_commands_are_refused_one_by_one(msg: dict[str, Any]) -> None:
    command = decode_one(msg)
    assert isinstance(command, InvalidCommand)
    reply = CODEC.error(command, command.error)
    assert isinstance(reply, bytes)


def test_pings_and_pongs() -> None:
    command = decode_one({"event": "pusher:ping", "data": {}})
    assert isinstance(command, Command) and command.method == "ping"
    assert server_message(CODEC.reply(command, {})) == {"event": "pusher:pong", "data": {}}
    assert CODEC.decode(b'{"event":"pusher:pong","data":{}}') == []


def test_private_channels_need_the_apps_signature() -> None:
    command = decode_one(
        {
            "event": "pusher:subscribe",
            "data": {"channel": "private-a", "auth": auth("1.2", "private-a")},
        }
    )
    assert isinstance(command, Command)
    grant = CODEC.authorize("subscribe", "1.2", command.params["channel"], command.params)
    assert grant is not None and grant.info is None
    # Another socket's signature, another channel's, another app's key:
    for wrong in (auth("1.3", "private-a"), auth("1.2", "private-b"), "other:" + "0" * 64, None):
        params = {**command.params, "pusher_auth": wrong}
        with pytest.raises(errors.BadSubscriptionToken):
            CODEC.authorize("subscribe", "1.2", params["channel"], params)


def test_presence_channels_sign_the_member_and_name_it() -> None:
    member = orjson.dumps({"user_id": "u7", "user_info": {"name": "Ann"}}).decode()
    data = {
        "channel": "presence-room",
        "auth": auth("1.2", "presence-room", member),
        "channel_data": member,
    }
    command = decode_one({"event": "pusher:subscribe", "data": data})
    assert isinstance(command, Command)
    grant = CODEC.authorize("subscribe", "1.2", command.params["channel"], command.params)
    assert grant is not None and grant.info == ClientInfo("1.2", "u7", {"name": "Ann"})
    forged = orjson.dumps({"user_id": "admin"}).decode()
    params = {**command.params, "pusher_channel_data": forged}
    with pytest.raises(errors.BadSubscriptionToken):
        CODEC.authorize("subscribe", "1.2", params["channel"], params)


def test_presence_answer_lists_members_once_per_user() -> None:
    command = decode_one({"event": "pusher:subscribe", "data": {"channel": "presence-room"}})
    assert isinstance(command, Command)
    members = {
        "1.1": ClientInfo("1.1", "u1", {"n": 1}),
        "1.2": ClientInfo("1.2", "u2", None),
        "1.3": ClientInfo("1.3", "u1", {"n": 1}),  # u1's second connection
    }
    result = SubscribeResult(0, "e", True, presence=members)
    msg = server_message(CODEC.reply(command, result))
    assert msg["data"]["presence"]["count"] == 2
    assert sorted(msg["data"]["presence"]["ids"]) == ["u1", "u2"]
    assert msg["data"]["presence"]["hash"] == {"u1": {"n": 1}, "u2": None}


def test_subscription_errors_name_the_channel() -> None:
    command = decode_one({"event": "pusher:subscribe", "data": {"channel": "private-a"}})
    reply = CODEC.error(command, errors.BadSubscriptionToken("Invalid signature"))
    assert isinstance(reply, bytes)
    msg = orjson.loads(reply)
    assert msg["event"] == "pusher:subscription_error"
    assert msg["channel"] == "private-a"
    assert msg["data"]["status"] == 401


def test_client_events_only_where_the_app_allows_them() -> None:
    command = decode_one({"event": "client-typing", "channel": "private-a", "data": {"x": 1}})
    assert isinstance(command, Command) and command.method == "publish"
    with pytest.raises(errors.PermissionDenied):
        CODEC.authorize("publish", "1.2", command.params["channel"], command.params)
    allowing = PusherCodec(
        PusherApp(
            id="app1",
            key="k",
            secret="s" * 16,
            namespace="pusher-app1",
            enable_client_messages=True,
        )
    )
    assert allowing.authorize("publish", "1.2", command.params["channel"], command.params)
    public = decode_one({"event": "client-typing", "channel": "news", "data": {}})
    assert isinstance(public, Command)
    with pytest.raises(errors.PermissionDenied):
        allowing.authorize("publish", "1.2", public.params["channel"], public.params)
    data = allowing.publication(command.params, ClientInfo("1.2", "u7"))
    assert data is not None
    assert event_of(data).name == "client-typing"
    assert event_of(data).socket_id == "1.2"
    assert event_of(data).user_id == ""  # only on presence channels


def test_publications_reach_pusher_clients_as_events() -> None:
    pub = Publication("pusher-app1:news", 3, "e", envelope("created", '{"id":1}'))
    assert orjson.loads(CODEC.pub(pub)) == {
        "event": "created",
        "channel": "news",
        "data": '{"id":1}',
    }
    # A publication made by another protocol: the "message" event, its data as JSON text.
    plain = Publication("pusher-app1:news", 4, "e", b'{"text":"hi"}')
    assert orjson.loads(CODEC.pub(plain)) == {
        "event": "message",
        "channel": "news",
        "data": '{"text":"hi"}',
    }


def test_member_events() -> None:
    info = ClientInfo("1.2", "u7", {"name": "Ann"})
    added = server_message(CODEC.join("pusher-app1:presence-room", info))
    assert added == {
        "event": "pusher_internal:member_added",
        "channel": "presence-room",
        "data": {"user_id": "u7", "user_info": {"name": "Ann"}},
    }
    removed = server_message(CODEC.leave("pusher-app1:presence-room", info))
    assert removed["data"] == {"user_id": "u7"}


def test_close_codes_follow_pushers_ranges() -> None:
    assert CODEC.close(errors.SHUTDOWN)[0] == 4200  # reconnect at once
    assert CODEC.close(errors.NO_PONG)[0] == 4201
    assert 4000 <= CODEC.close(errors.INVALID_TOKEN)[0] < 4100  # stay away
    unknown = PusherCodec(None)
    (command,) = unknown.decode(b"")
    refusal = unknown.error(command, errors.Unauthorized("no app"))
    assert not isinstance(refusal, bytes) and refusal.code == 4001


def test_signatures_compare_the_whole_auth_string() -> None:
    assert channel_auth_valid(APP, "1.2", "private-a", auth("1.2", "private-a"), None)
    assert not channel_auth_valid(APP, "1.2", "private-a", auth("1.2", "private-a")[:-1], None)
    assert not channel_auth_valid(APP, "1.2", "private-a", "app-key" + "0" * 64, None)


def test_a_refused_connect_closes_with_pushers_codes() -> None:
    (command,) = CODEC.decode(b"")
    refused = CODEC.error(command, errors.Unauthorized("log in first"))
    assert not isinstance(refused, bytes)
    assert (refused.code, refused.reason) == (4009, "log in first")  # stay away
    busy = CODEC.error(command, errors.Unavailable("try later"))
    assert not isinstance(busy, bytes) and 4100 <= busy.code < 4200  # come back later


def test_no_client_events_on_encrypted_channels() -> None:
    allowing = PusherCodec(
        PusherApp(id="1", key="k", secret="s" * 16, namespace="p", enable_client_messages=True)
    )
    command = allowing.decode(
        orjson.dumps({"event": "client-x", "channel": "private-encrypted-a", "data": {}})
    )[0]
    assert isinstance(command, Command)
    with pytest.raises(errors.PermissionDenied):
        allowing.authorize("publish", "1.2", command.params["channel"], command.params)


# ---- fuzz: nothing a client sends makes the codec raise -------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_channels = st.sampled_from(
    [
        "news",
        "private-a",
        "presence-room",
        "private-encrypted-x",
        "#server-to-user-u",
        "bad name",
        "",
    ]
) | st.text(max_size=10)
_data = st.fixed_dictionaries(
    {},
    optional={
        "channel": _channels | _values,
        "auth": st.text(max_size=80) | _values,
        "channel_data": st.text(max_size=40) | _values,
        "user_data": st.text(max_size=40) | _values,
    },
)
_messages = st.fixed_dictionaries(
    {
        "event": st.sampled_from(
            [
                "pusher:subscribe",
                "pusher:unsubscribe",
                "pusher:ping",
                "pusher:pong",
                "pusher:signin",
                "client-typing",
                "pusher:nope",
            ]
        )
        | st.text(max_size=10)
        | _values,
    },
    optional={
        "data": _data | _data.map(lambda d: orjson.dumps(d).decode()) | _values,
        "channel": _channels,
    },
)
_frames = st.one_of(st.binary(max_size=120), _messages.map(orjson.dumps))


@pytest.mark.timeout(300)
@FUZZ
@given(frame=_frames, rnd=st.randoms(use_true_random=False))
def test_fuzz_decoder_and_authorization(frame: bytes, rnd: random.Random) -> None:
    codec = PusherCodec(
        PusherApp(
            id="1",
            key="app-key",
            secret=APP.secret,
            namespace="p",
            enable_client_messages=True,
            max_event_bytes=64,
        )
    )
    for candidate in (frame, *mutants(frame, rnd)):
        try:
            commands = codec.decode(candidate)
        except ProtocolViolation:
            continue
        for command in commands:
            assert isinstance(command, (Command, InvalidCommand))
            if isinstance(command, InvalidCommand):
                reply = codec.error(command, command.error)
                assert isinstance(reply, bytes) or reply.code >= 4000
                continue
            assert command.method in codec.methods
            try:
                grant = codec.authorize(
                    command.method, "1.2", str(command.params.get("channel", "")), command.params
                )
            except errors.SquallError as exc:
                reply = codec.error(command, exc)
                assert isinstance(reply, bytes) or reply.code >= 4000
                continue
            assert grant is None or grant.info is None or grant.info.client == "1.2"
            if command.method == "publish":
                made = codec.publication(command.params, ClientInfo("1.2", "u"))
                assert made is not None and event_of(made).socket_id == "1.2"

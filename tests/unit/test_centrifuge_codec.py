"""The Centrifugo client protocol codecs without a socket: decoding, the
encoding of replies and pushes, error and close mapping, and fuzzing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server import errors
from server.auth import mint_token
from server.codec import Command, InvalidCommand, ProtocolViolation, SubscribeResult
from server.codecs import centrifuge_pb2
from server.codecs.centrifuge import (
    CENTRIFUGE_JSON,
    CENTRIFUGE_PROTOBUF,
    REQUESTS,
    _uvarint,
)
from server.config import load_settings
from server.errors import Disconnect
from server.models import ClientInfo, Publication
from server.node import Node
from server.session import Session
from tests.conftest import BASE_CONFIG

pb: Any = centrifuge_pb2
JSON = CENTRIFUGE_JSON
PROTO = CENTRIFUGE_PROTOBUF


def delimited(*messages: Any) -> bytes:
    out = b""
    for message in messages:
        body = message.SerializeToString()
        out += _uvarint(len(body)) + body
    return out


def read_delimited(frame: bytes) -> list[Any]:
    replies = []
    pos = 0
    while pos < len(frame):
        size, pos = PROTO._read_uvarint(frame, pos)
        reply = pb.Reply()
        reply.ParseFromString(frame[pos : pos + size])
        replies.append(reply)
        pos += size
    return replies


# ---- JSON ------------------------------------------------------------------


def test_json_batch_is_split_into_core_commands() -> None:
    frame = (
        b'{"id":1,"connect":{"token":"t","name":"js"}}\n'
        b'{"id":2,"subscribe":{"channel":"chat:a","recover":true,"offset":5,"epoch":"e"}}\n'
        b'{"id":3,"history":{"channel":"chat:a","limit":-1,"since":{"offset":2,"epoch":"e"}}}'
    )
    connect, subscribe, history = JSON.decode(frame)
    assert isinstance(connect, Command) and connect.method == "connect"
    assert connect.params["token"] == "t"
    assert isinstance(subscribe, Command)
    assert subscribe.params == {
        "channel": "chat:a",
        "token": None,
        "recover": True,
        "offset": 5,
        "epoch": "e",
    }
    assert isinstance(history, Command)
    assert history.params["since"] == {"offset": 2, "epoch": "e"}
    assert history.params["limit"] > 1000  # -1: as many as the server gives


def test_json_pong_and_send_are_no_commands() -> None:
    assert JSON.decode(b"{}") == []
    assert JSON.decode(b'{"send":{"data":{"x":1}}}') == []


@pytest.mark.parametrize(
    "frame",
    [
        b"nope",
        b"[]",
        b'{"id":"1","ping":{}}',
        b'{"id":-1,"ping":{}}',
        b'{"id":4294967296,"ping":{}}',
        b'{"id":5}',  # an id but no request
        b'{"id":5,"teleport":{}}',
        b'{"id":5,"subscribe":"chat:a"}',
        b'{"id":5,"send":{}}',
    ],
)
def test_json_unanswerable_frames_are_violations(frame: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        JSON.decode(frame)


def test_json_bad_field_types_become_invalid_commands() -> None:
    (bad,) = JSON.decode(b'{"id":7,"history":{"channel":"a","limit":"ten"}}')
    assert isinstance(bad, InvalidCommand) and bad.id == 7 and bad.error.code == 107


def test_json_too_many_commands() -> None:
    frame = b"\n".join(b'{"id":%d,"ping":{}}' % i for i in range(1, 102))
    with pytest.raises(ProtocolViolation):
        JSON.decode(frame)


def test_json_pub_push_splices_data_and_names_the_publisher() -> None:
    pub = Publication("chat:a", 7, "ep", b'{"z":1}', ClientInfo("cl", "u", {"n": 1}), 123)
    assert orjson.loads(JSON.pub(pub)) == {
        "push": {
            "channel": "chat:a",
            "pub": {
                "data": {"z": 1},
                "info": {"user": "u", "client": "cl", "conn_info": {"n": 1}},
                "offset": 7,
            },
        }
    }


def test_json_subscribe_reply_of_a_recovery() -> None:
    # The reply's offset is where the client recovered from; the
    # publications move it on.
    cmd = Command(3, "subscribe", {})
    result = SubscribeResult(
        offset=9,
        epoch="ep",
        recoverable=True,
        recovered=True,
        recovering=True,
        recovered_from=8,
        publications=[Publication("c", 9, "ep", b"1")],
    )
    assert orjson.loads(JSON.reply(cmd, result)) == {
        "id": 3,
        "subscribe": {
            "recoverable": True,
            "epoch": "ep",
            "offset": 8,  # where the client recovered from, as Centrifugo says
            "positioned": True,
            "was_recovering": True,
            "recovered": True,
            "publications": [{"data": 1, "offset": 9}],
        },
    }


@pytest.mark.parametrize(
    ("method", "error", "expected"),
    [
        ("subscribe", errors.UnknownChannel("no such namespace"), (102, "unknown channel", False)),
        ("history", errors.NotSubscribed(), (103, "permission denied", False)),
        ("publish", errors.Unavailable("broker down"), (100, "internal server error", True)),
        ("subscribe", errors.TooManyRequests(), (111, "too many requests", True)),
        ("connect", errors.TokenExpired(), (109, "token expired", False)),
    ],
)
def test_json_errors_use_centrifugo_codes_and_messages(
    method: str, error: errors.SquallError, expected: tuple[int, str, bool]
) -> None:
    out = JSON.error(Command(4, method, {}), error)
    assert isinstance(out, bytes)
    body = orjson.loads(out)["error"]
    assert (body["code"], body["message"], body.get("temporary", False)) == expected


@pytest.mark.parametrize(
    ("method", "params", "error", "close"),
    [
        ("connect", {"token": "t"}, errors.Unauthorized("bad signature"), errors.INVALID_TOKEN),
        ("connect", {"token": None}, errors.Unauthorized("token required"), errors.BAD_REQUEST),
        ("connect", {"token": "t"}, errors.BadRequest("already connected"), errors.BAD_REQUEST),
        ("subscribe", {}, errors.BadSubscriptionToken("wrong channel"), errors.INVALID_TOKEN),
        ("subscribe", {}, errors.NotConnected(), errors.BAD_REQUEST),
        ("teleport", {}, errors.MethodNotFound(), errors.BAD_REQUEST),
    ],
)
def test_errors_centrifugo_answers_with_a_close(
    method: str, params: dict[str, Any], error: errors.SquallError, close: Disconnect
) -> None:
    assert JSON.error(Command(1, method, params), error) == close
    assert PROTO.error(Command(1, method, params), error) == close


def test_an_expired_subscription_token_is_error_109() -> None:
    out = JSON.error(Command(2, "subscribe", {}), errors.BadSubscriptionToken(expired=True))
    assert isinstance(out, bytes)
    assert orjson.loads(out)["error"] == {"code": 109, "message": "token expired"}


def test_close_reasons_are_centrifugos() -> None:
    assert JSON.close(errors.CONNECT_TIMEOUT) == (3502, "stale")
    assert JSON.close(errors.EXPIRED) == (3005, "expired")
    assert PROTO.close(errors.SLOW) == (3008, "slow")


# ---- Protobuf --------------------------------------------------------------


def test_protobuf_batch_decodes_to_core_commands() -> None:
    connect = pb.Command(id=1)
    connect.connect.token = "t"
    connect.connect.subs["news"].recover = True
    connect.connect.subs["news"].offset = 3
    connect.connect.subs["news"].epoch = "e"
    publish = pb.Command(id=2)
    publish.publish.channel = "chat:a"
    publish.publish.data = b'{"x":1}'
    pong = pb.Command()
    first, second = PROTO.decode(delimited(connect, pong, publish))
    assert isinstance(first, Command)
    assert first.params == {
        "token": "t",
        "subs": {"news": {"recover": True, "offset": 3, "epoch": "e"}},
    }
    assert isinstance(second, Command)
    assert second.params == {"channel": "chat:a", "data": {"x": 1}}


def test_protobuf_data_must_be_json() -> None:
    publish = pb.Command(id=2)
    publish.publish.channel = "chat:a"
    publish.publish.data = b"\xff\x00binary"
    (bad,) = PROTO.decode(delimited(publish))
    assert isinstance(bad, InvalidCommand) and bad.error.code == 107


@pytest.mark.parametrize(
    "frame",
    [
        b"\x05\x08",  # cut short
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a length past 64 bits
        b"\x03\xff\xff\xff",  # not a Command
        delimited(pb.Command(id=9)),  # an id but no request
    ],
)
def test_protobuf_unanswerable_frames_are_violations(frame: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        PROTO.decode(frame)


@pytest.mark.parametrize("info", [None, ClientInfo("cl", "ü", {"n": [1, 2]})])
@pytest.mark.parametrize("offset", [0, 1, 300, 2**40])
def test_protobuf_pub_push_written_by_hand_is_a_valid_reply(
    info: ClientInfo | None, offset: int
) -> None:
    pub = Publication("chat:é", offset, "ep", b'{"z":1}', info, 123)
    (reply,) = read_delimited(PROTO.pub(pub))
    expected = pb.Reply()
    expected.push.channel = "chat:é"
    expected.push.pub.data = b'{"z":1}'
    expected.push.pub.offset = offset
    if offset == 1:
        expected.push.pub.epoch = "ep"  # a stream's first publication names its epoch
    if info is not None:
        expected.push.pub.info.user = info.user
        expected.push.pub.info.client = info.client
        expected.push.pub.info.conn_info = orjson.dumps(info.info)
    assert reply == expected


def test_protobuf_frames_join_length_prefixed_messages() -> None:
    pub = Publication("c", 1, "ep", b"1")
    frame = PROTO.join_frame([PROTO.pub(pub), PROTO.ping, PROTO.pub(pub)])
    replies = read_delimited(frame)
    assert [r.push.pub.offset for r in replies] == [1, 0, 1]
    assert replies[1] == pb.Reply()  # the ping: an empty reply


# ---- fuzzing ---------------------------------------------------------------
#
# The decoders take any bytes: they return commands or raise
# ProtocolViolation, nothing else. Each generated example is decoded as drawn
# and as 19 random mutants of it (bytes flipped, cut, inserted), so the
# 5,000 examples of each decoder below are 100,000 generated inputs apiece,
# in a run bounded by that count (no example database; shrinking only on a
# failure).

MUTANTS = 19


def mutants(frame: bytes, rnd: random.Random) -> list[bytes]:
    out = []
    for _ in range(MUTANTS):
        data = bytearray(frame)
        for _ in range(rnd.randint(1, 3)):
            op = rnd.randrange(4)
            pos = rnd.randrange(len(data) + 1)
            if op == 0 and data:
                data[pos % len(data)] = rnd.randrange(256)
            elif op == 1:
                data.insert(pos, rnd.randrange(256))
            elif op == 2:
                del data[pos:]
            elif data:
                data[pos % len(data)] ^= 1 << rnd.randrange(8)
        out.append(bytes(data))
    return out


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON numbers hold here
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.text(max_size=12) | ints | st.none(),
        "token": st.text(max_size=8) | ints,
        "recover": st.booleans() | ints,
        "offset": st.integers(min_value=-5, max_value=2**64 - 1) | st.text(max_size=3),
        "epoch": st.text(max_size=6) | ints,
        "limit": st.integers(min_value=-(2**33), max_value=2**33) | st.text(max_size=2),
        "since": st.dictionaries(st.sampled_from(["offset", "epoch"]), ints | st.text()),
        "data": ints | st.text(max_size=8) | st.none(),
        "subs": st.dictionaries(st.text(max_size=4), st.dictionaries(st.text(max_size=3), ints)),
    },
)
json_commands = st.builds(
    lambda cmd_id, requests: {**requests, **cmd_id},
    st.fixed_dictionaries(
        {}, optional={"id": st.integers(min_value=-1, max_value=2**33) | st.text(max_size=2)}
    ),
    st.dictionaries(
        st.sampled_from(REQUESTS), request_fields | ints | st.text(max_size=3), max_size=2
    ),
)
json_frames = st.one_of(
    st.binary(max_size=120),
    json_commands.map(orjson.dumps),
    st.lists(json_commands.map(orjson.dumps), min_size=1, max_size=4).map(b"\n".join),
)


def _pb_command(fields: dict[str, Any]) -> bytes:
    command = pb.Command(id=fields.get("id", 0))
    method = fields.get("method")
    if method is not None:
        request = getattr(command, method)
        request.SetInParent()
        for key, value in fields.get("values", {}).items():
            if hasattr(request, key):
                try:
                    setattr(request, key, value)
                except (TypeError, ValueError, AttributeError):
                    pass
    body: bytes = command.SerializeToString()
    return body


pb_commands = st.fixed_dictionaries(
    {"id": st.integers(min_value=0, max_value=2**32 - 1)},
    optional={
        "method": st.sampled_from(REQUESTS),
        "values": st.dictionaries(
            st.sampled_from(["channel", "token", "epoch", "data", "offset", "limit", "recover"]),
            st.text(max_size=8) | st.binary(max_size=8) | st.integers(0, 2**40) | st.booleans(),
        ),
    },
).map(_pb_command)
pb_frames = st.one_of(
    st.binary(max_size=120),
    st.lists(pb_commands, min_size=1, max_size=4).map(
        lambda bodies: b"".join(_uvarint(len(b)) + b for b in bodies)
    ),
    # A valid prefix with a corrupted tail.
    st.tuples(pb_commands, st.binary(min_size=1, max_size=6)).map(
        lambda pair: _uvarint(len(pair[0])) + pair[0][: len(pair[0]) // 2] + pair[1]
    ),
)

FUZZ = settings(
    max_examples=5_000,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


def _decodes_or_violates(codec: Any, frame: bytes) -> None:
    try:
        commands = codec.decode(frame)
    except ProtocolViolation:
        return
    for command in commands:
        assert isinstance(command, (Command, InvalidCommand))
        assert 0 < command.id < 2**32
        assert command.method in REQUESTS


@pytest.mark.timeout(300)
@FUZZ
@given(frame=json_frames, rnd=st.randoms(use_true_random=False))
def test_fuzz_json_decoder(frame: bytes, rnd: random.Random) -> None:
    for candidate in (frame, *mutants(frame, rnd)):
        _decodes_or_violates(JSON, candidate)


@pytest.mark.timeout(300)
@FUZZ
@given(frame=pb_frames, rnd=st.randoms(use_true_random=False))
def test_fuzz_protobuf_decoder(frame: bytes, rnd: random.Random) -> None:
    for candidate in (frame, *mutants(frame, rnd)):
        _decodes_or_violates(PROTO, candidate)


# ---- a session behind each codec -------------------------------------------


class RecordingTransport:
    kind = "test"

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.closed: Disconnect | None = None

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        self.items.extend(items)
        return None

    def close(self, disconnect: Disconnect) -> None:
        self.closed = disconnect


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    raw = {
        **BASE_CONFIG,
        "server": {"data_dir": str(tmp_path)},
        "namespaces": {"chat": {"allow_publish": True, "presence": True}},
    }
    n = Node(load_settings(raw=raw, env={}))
    await n.start()
    yield n
    await n.close()


def _replies(codec: Any, items: list[bytes]) -> list[dict[str, Any]]:
    """Replies (with an id) as JSON-like dicts, whichever the codec."""
    out: list[dict[str, Any]] = []
    for item in items:
        if codec is JSON:
            for line in item.split(b"\n"):
                msg = orjson.loads(line)
                if msg.get("id"):
                    out.append(msg)
        else:
            for reply in read_delimited(item):
                if reply.id:
                    out.append({"id": reply.id, "error": reply.error.code or None})
    return out


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), connected=st.booleans(), binary=st.booleans())
async def test_any_frame_gets_a_reply_or_a_close(
    node: Node, data: st.DataObject, connected: bool, binary: bool
) -> None:
    codec = PROTO if binary else JSON
    frame = data.draw(pb_frames if binary else json_frames)
    transport = RecordingTransport()
    session = Session(node, transport, codec)
    if connected:
        token = mint_token(node.settings.auth, sub="fuzz")
        connect = pb.Command(id=1)
        connect.connect.token = token
        await session.handle_frame(
            delimited(connect) if binary else orjson.dumps({"id": 1, "connect": {"token": token}})
        )
        session.flush()
    await asyncio.sleep(0)
    before = len(transport.items)
    await session.handle_frame(frame)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    session.flush()
    try:
        commands = codec.decode(frame)
    except ProtocolViolation:
        commands = None
    if commands is None:
        assert transport.closed == errors.BAD_REQUEST
    elif commands and transport.closed is None:
        # Every command was answered (in order), or the connection closed.
        replies = _replies(codec, transport.items[before:])
        assert [r["id"] for r in replies] == [c.id for c in commands][: len(replies)]
        assert len(replies) == len(commands)
    if transport.closed is not None:
        assert 3000 <= transport.closed.code <= 3999
    session.disconnect(Disconnect(3001, "test over"))
    await asyncio.sleep(0)


class CountingCodec(type(JSON)):  # type: ignore[misc]
    """The JSON codec, counting the publications it encodes."""

    def __init__(self) -> None:
        self.encoded = 0

    def pub(self, pub: Publication) -> bytes:
        self.encoded += 1
        return super().pub(pub)


async def test_a_publication_is_encoded_once_per_codec_not_per_subscriber(node: Node) -> None:
    counting = CountingCodec()
    squall_transports = [RecordingTransport() for _ in range(3)]
    cent_transports = [RecordingTransport() for _ in range(4)]
    sessions = [Session(node, t) for t in squall_transports]
    sessions += [Session(node, t, counting) for t in cent_transports]
    token = mint_token(node.settings.auth, sub="many")
    for session in sessions:
        if session.codec is counting:
            await session.handle_frame(orjson.dumps({"id": 1, "connect": {"token": token}}))
            await session.handle_frame(orjson.dumps({"id": 2, "subscribe": {"channel": "news"}}))
        else:
            await session.handle_frame(
                orjson.dumps({"id": 1, "method": "connect", "params": {"token": token}})
            )
            await session.handle_frame(
                orjson.dumps({"id": 2, "method": "subscribe", "params": {"channel": "news"}})
            )
    await asyncio.sleep(0)
    node.on_publication(Publication("news", 1, "ep", b'{"x":1}'))
    for session in sessions:
        session.flush()
    assert counting.encoded == 1
    # Every subscriber of a codec got the very same bytes object.
    assert len({id(t.items[-1]) for t in cent_transports}) == 1
    assert len({id(t.items[-1]) for t in squall_transports}) == 1
    assert orjson.loads(cent_transports[0].items[-1])["push"]["pub"]["data"] == {"x": 1}
    assert orjson.loads(squall_transports[0].items[-1])["pub"]["data"] == {"x": 1}
    for session in sessions:
        session.disconnect(Disconnect(3001, "test over"))
    await asyncio.sleep(0)

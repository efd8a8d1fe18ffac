"""Target (b): the protocol decoders behind ``server/codec.py``: Squall's JSON
protocol, Centrifugo JSON and Protobuf, Pusher.

A frame is made from a valid-shaped message (the protocol's commands with
every field maybe hostile: wrong types, sizes, unicode, lone surrogates,
deep nesting, huge numbers), several of them joined, then maybe mutated
byte by byte; or it is plain random bytes.

Properties (``check``): ``decode`` returns ``Command``s and
``InvalidCommand``s or raises ``ProtocolViolation``, nothing else (the
contract in ``server/codec.py``); every command it returns can be answered
(``reply`` and ``error`` give bytes or a ``Disconnect``); a Pusher command
goes through the codec's own ``authorize`` (which may only raise
``SquallError``) and ``publication``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

from reliability.fuzz.gen import (
    EDGE_INTS,
    EDGE_TEXT,
    dumps,
    hostile,
    ints,
    maybe,
    mutate,
    mutations,
    texts,
    values,
    with_extra,
)
from server import errors
from server.codec import EMPTY, ChannelGrant, Command, InvalidCommand, ProtocolViolation
from server.codecs import centrifuge
from server.codecs.centrifuge import CENTRIFUGE_JSON, CENTRIFUGE_PROTOBUF, pb
from server.codecs.pusher import PusherCodec
from server.config import PusherApp
from server.errors import Disconnect, SquallError
from server.models import ClientInfo, Publication
from server.protocol import METHODS, SQUALL
from server.pusher import event_of, sign

APP = PusherApp(
    id="fuzz",
    key="fuzz-key",
    secret="fuzz-secret-0123456789",  # noqa: S106 - a test app's
    namespace="pusher-fuzz",
    enable_client_messages=True,
)
PUSHER = PusherCodec(APP)
SOCKET_ID = "1234.5678"

CODECS: dict[str, Any] = {
    "squall": SQUALL,
    "centrifuge-json": CENTRIFUGE_JSON,
    "centrifuge-protobuf": CENTRIFUGE_PROTOBUF,
    "pusher": PUSHER,
}
DECODER_TARGETS = tuple(CODECS)


def check(target: str, frame: bytes) -> None:
    codec = CODECS[target]
    try:
        commands = codec.decode(frame)
    except ProtocolViolation:
        return
    assert isinstance(commands, list)
    for command in commands:
        assert isinstance(command, (Command, InvalidCommand)), type(command)
        assert type(command.id) is int
        if isinstance(command, InvalidCommand):
            assert isinstance(command.error, SquallError)
            answer = codec.error(command, command.error)
            assert isinstance(answer, (bytes, Disconnect))
            continue
        assert isinstance(command.method, str) and isinstance(command.params, dict)
        if target != "squall":
            # Squall's own names its method freely (the session answers an
            # unknown one); the others decode only the methods they have.
            assert command.method in codec.methods, command.method
        if target == "pusher":
            _pusher(command)
        answer = codec.error(command, errors.BadRequest("fuzz"))
        assert isinstance(answer, (bytes, Disconnect))
        assert isinstance(codec.reply(command, EMPTY), bytes)


def _pusher(command: Command) -> None:
    params = command.params
    try:
        grant = PUSHER.authorize(command.method, SOCKET_ID, params.get("channel", ""), params)
    except SquallError:
        return
    assert grant is None or isinstance(grant, ChannelGrant)
    data = PUSHER.publication(params, ClientInfo(SOCKET_ID, "user-1", None))
    if data is not None:
        channel = str(params.get("channel", ""))
        event = event_of(data)
        assert event.name == params["pusher_event"]
        assert isinstance(PUSHER.pub(Publication(channel, 1, "e", data)), bytes)


# ---- strategies ----------------------------------------------------------------

channels = st.one_of(
    st.sampled_from(["news", "chat:room", "a" * 255, "default:x", "ns:", "#user,1", "$s:x"]),
    texts,
)
positions = st.fixed_dictionaries({"offset": ints, "epoch": texts})


def _joined(items: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    return st.tuples(items, st.sampled_from([b"\n", b"\n\n", b"\r\n", b" \n"])).map(
        lambda pair: pair[1].join(pair[0])
    )


def _framed(one: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """One to a few messages per frame, sometimes more than the 100 a frame
    may hold, then maybe mutated; or random bytes."""
    many = st.one_of(
        st.lists(one, min_size=1, max_size=3),
        st.tuples(one, st.integers(99, 102)).map(lambda p: [p[0]] * p[1]),
    )
    return st.one_of(
        st.tuples(_joined(many), mutations).map(lambda p: mutate(*p)),
        st.binary(max_size=200),
    )


SQUALL_PARAMS = {
    "channel": channels,
    "data": values,
    "token": texts,
    "recover": st.booleans(),
    "offset": ints,
    "epoch": texts,
    "limit": ints,
    "since": positions,
    "reverse": st.booleans(),
    "query": texts,
    "cursor": texts,
    "user": texts,
}
squall_command = with_extra(
    {"id": st.one_of(st.integers(1, 2**53 - 1), st.sampled_from(EDGE_INTS))},
    {
        "method": st.one_of(st.sampled_from(sorted(METHODS)), texts),
        "params": with_extra({}, SQUALL_PARAMS),
    },
).map(dumps)

CENTRIFUGE_REQUEST = {
    "channel": channels,
    "token": texts,
    "data": values,
    "recover": st.booleans(),
    "offset": ints,
    "epoch": texts,
    "limit": ints,
    "since": positions,
    "reverse": st.booleans(),
    "subs": st.dictionaries(
        texts, with_extra({}, {"recover": st.booleans(), "offset": ints, "epoch": texts})
    ),
    "name": texts,
    "version": texts,
    "method": texts,
}
centrifuge_json_command = st.tuples(
    st.sampled_from([*centrifuge.REQUESTS, "nonsense"]),
    st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(EDGE_INTS)),
    with_extra({}, CENTRIFUGE_REQUEST),
    st.booleans(),
    st.dictionaries(st.sampled_from(list(centrifuge.REQUESTS)), hostile, max_size=2),
).map(
    lambda t: (
        dumps({**(t[4] if t[3] else {}), "id": t[1], t[0]: t[2]})
        if t[3] or t[0]
        else dumps({"id": t[1]})
    )
)


# Protobuf: every field of the message, from its descriptor, maybe set.
_PB_STRINGS = st.one_of(  # protobuf strings cannot hold lone surrogates
    st.text(max_size=30),
    st.sampled_from([t for t in EDGE_TEXT if t[:1] < "\ud800" or t[:1] > "\udfff"]),
)
_PB_BYTES = st.one_of(
    st.binary(max_size=30),
    values.map(lambda v: dumps(v)),
    st.sampled_from([b"", b"{}", b"null", b"\xff", b"[" * 1100]),
)
_PB_INTS = {
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
}


def _repeated(fd: Any) -> bool:
    flag = getattr(fd, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)


@st.composite
def _pb_fill(draw: st.DrawFn, message: Any, depth: int = 0) -> Any:
    for fd in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if is_map:
            target = getattr(message, fd.name)
            value_fd = fd.message_type.fields_by_name["value"]
            for key in draw(st.lists(_PB_STRINGS, max_size=3)):
                if value_fd.message_type is not None:
                    if depth < 3:
                        draw(_pb_fill(target[key], depth + 1))
                else:
                    target[key] = draw(_PB_STRINGS)
            continue
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < 3:
                sub = getattr(message, fd.name)
                if _repeated(fd):
                    for _ in range(draw(st.integers(0, 2))):
                        draw(_pb_fill(sub.add(), depth + 1))
                else:
                    sub.SetInParent()
                    draw(_pb_fill(sub, depth + 1))
            continue
        if fd.type == FieldDescriptor.TYPE_STRING:
            value: Any = draw(_PB_STRINGS)
        elif fd.type == FieldDescriptor.TYPE_BYTES:
            value = draw(_PB_BYTES)
        elif fd.type == FieldDescriptor.TYPE_BOOL:
            value = draw(st.booleans())
        elif fd.type in _PB_INTS:
            value = draw(_PB_INTS[fd.type])
        elif fd.type == FieldDescriptor.TYPE_ENUM:
            value = draw(st.sampled_from([v.number for v in fd.enum_type.values]))
        else:
            continue
        if _repeated(fd):
            getattr(message, fd.name).append(value)
        else:
            setattr(message, fd.name, value)
    return message


def _uvarint(value: int) -> bytes:
    return centrifuge._uvarint(value)


@st.composite
def _pb_command(draw: st.DrawFn) -> bytes:
    message = pb.Command()
    request = draw(st.sampled_from([*centrifuge.REQUESTS, None]))
    message.id = draw(st.one_of(st.integers(0, 2**32 - 1), st.just(1)))
    if request is not None:
        sub = getattr(message, request)
        sub.SetInParent()
        draw(_pb_fill(sub))
    body: bytes = message.SerializeToString()
    prefix = draw(
        st.one_of(
            st.just(_uvarint(len(body))),
            st.just(_uvarint(len(body))),
            st.integers(0, 2**70).map(_uvarint),
            st.binary(max_size=11),
        )
    )
    return prefix + body


centrifuge_protobuf_frame = st.one_of(
    st.tuples(st.lists(_pb_command(), min_size=1, max_size=3), mutations).map(
        lambda p: mutate(b"".join(p[0]), p[1])
    ),
    st.tuples(_pb_command(), st.integers(99, 102)).map(lambda p: p[0] * p[1]),
    st.binary(max_size=200),
)

PUSHER_EVENTS = [
    "pusher:subscribe",
    "pusher:unsubscribe",
    "pusher:ping",
    "pusher:pong",
    "pusher:signin",
    "client-typing",
    "client-" + "x" * 200,
    "pusher:other",
]
PUSHER_CHANNELS = [
    "public",
    "private-room",
    "presence-room",
    "private-encrypted-room",
    "#server-to-user-u1",
    "bad channel",
    "",
    "a" * 201,
]


@st.composite
def _pusher_message(draw: st.DrawFn) -> bytes:
    event = draw(st.one_of(st.sampled_from(PUSHER_EVENTS), texts))
    channel = draw(st.one_of(st.sampled_from(PUSHER_CHANNELS), texts))
    member = {"user_id": draw(maybe(st.one_of(texts, ints))), "user_info": draw(values)}
    channel_data = draw(st.one_of(st.just(dumps(member).decode("utf-8", "replace")), texts))
    user_data = dumps({"id": draw(maybe(texts)), "user_info": draw(values)}).decode(
        "utf-8", "replace"
    )
    # What is signed must be encodable (no lone surrogates).
    channel = channel.encode("utf-8", "replace").decode("utf-8")
    channel_data = channel_data.encode("utf-8", "replace").decode("utf-8")
    signed = channel_data if channel.startswith("presence-") else None
    valid = f"{SOCKET_ID}:{channel}" + (f":{signed}" if signed is not None else "")
    auth = draw(
        st.one_of(
            st.just(f"{APP.key}:{sign(APP.secret, valid)}"),
            st.just(f"{APP.key}:{sign(APP.secret, f'{SOCKET_ID}::user::{user_data}')}"),
            maybe(texts),
        )
    )
    data: dict[str, Any] = draw(
        with_extra(
            {},
            {
                "channel": st.just(channel),
                "auth": st.just(auth),
                "channel_data": st.just(channel_data),
                "user_data": st.just(user_data),
            },
        )
    )
    payload: Any = draw(
        st.one_of(st.just(data), st.just(dumps(data).decode("utf-8", "replace")), hostile)
    )
    msg: dict[str, Any] = {"event": event, "data": payload}
    if draw(st.booleans()):
        msg["channel"] = channel
    extra = draw(st.dictionaries(texts, values, max_size=2))
    return dumps({**extra, **msg})


pusher_frame = st.one_of(
    st.tuples(_pusher_message(), mutations).map(lambda p: mutate(*p)),
    st.binary(max_size=200),
)

STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "squall": _framed(squall_command),
    "centrifuge-json": _framed(centrifuge_json_command),
    "centrifuge-protobuf": centrifuge_protobuf_frame,
    "pusher": pusher_frame,
}

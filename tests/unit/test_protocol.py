"""The sans-I/O protocol: parsing, encoding, and fuzzing of the session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import protocol
from server.auth import mint_token
from server.channels import Channels
from server.config import load_settings
from server.errors import ALL_DISCONNECTS, BadRequest, Disconnect, UnknownChannel
from server.models import ClientInfo, Publication
from server.node import Node
from server.session import Session
from tests.conftest import BASE_CONFIG


def test_parse_single_and_batched_commands() -> None:
    cmds = protocol.parse_frame(b'{"id":1,"method":"ping"}\n{"id":2,"method":"x","params":{}}')
    assert [(c.id, c.method) for c in cmds if isinstance(c, protocol.Command)] == [
        (1, "ping"),
        (2, "x"),
    ]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\n\n",
        b"nope",
        b"[]",
        b'"x"',
        b'{"method":"ping"}',
        b'{"id":0}',
        b'{"id":1.5}',
        b'{"id":true}',
        b'{"id":"1"}',
        b'{"id":9007199254740992}',
    ],
)
def test_unanswerable_frames_are_violations(frame: bytes) -> None:
    with pytest.raises(protocol.ProtocolViolation):
        protocol.parse_frame(frame)


def test_answerable_bad_commands_become_errors() -> None:
    (bad,) = protocol.parse_frame(b'{"id":3,"method":""}')
    assert isinstance(bad, protocol.InvalidCommand) and bad.id == 3
    (bad,) = protocol.parse_frame(b'{"id":4,"method":"ping","params":[1]}')
    assert isinstance(bad, protocol.InvalidCommand) and bad.error.code == 107


def test_too_many_commands_in_a_frame() -> None:
    frame = b"\n".join(b'{"id":%d,"method":"ping"}' % i for i in range(1, 102))
    with pytest.raises(protocol.ProtocolViolation):
        protocol.parse_frame(frame)


def test_pub_push_splices_data_unchanged() -> None:
    pub = Publication("c", 7, "ep", b'{"z":1,"a":[1,2]}', ClientInfo("cl", "u"), 123)
    push = orjson.loads(protocol.pub_push(pub))
    assert push == {
        "push": "pub",
        "channel": "c",
        "pub": {
            "offset": 7,
            "epoch": "ep",
            "data": {"z": 1, "a": [1, 2]},
            "time": 123,
            "info": {"client": "cl", "user": "u"},
        },
    }


def test_disconnect_code_ranges() -> None:
    codes = [d.code for d in ALL_DISCONNECTS]
    assert len(set(codes)) == len(codes)
    for d in ALL_DISCONNECTS:
        assert 3000 <= d.code <= 3999
        assert d.reconnect == (d.code < 3500)


@pytest.mark.parametrize(
    ("name", "namespace"), [("news", "default"), ("chat:room-1", "chat"), ("chat:a:b", "chat")]
)
def test_channel_names(name: str, namespace: str) -> None:
    chans = Channels(load_settings(raw={"namespaces": {"chat": {}}}, env={}))
    assert chans.resolve(name).namespace == namespace


@pytest.mark.parametrize("name", ["", " ", "a b", "é", "x" * 256, ":x", "chat:", None, 1])
def test_bad_channel_names(name: Any) -> None:
    with pytest.raises(BadRequest):
        Channels(load_settings(env={})).resolve(name)


def test_unknown_namespace() -> None:
    with pytest.raises(UnknownChannel):
        Channels(load_settings(env={})).resolve("nope:x")


class RecordingTransport:
    kind = "test"

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed: Disconnect | None = None

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        for item in items:
            self.messages.append(orjson.loads(item))
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


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
commands = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(min_value=-2, max_value=2**54), st.text(max_size=3))},
    optional={
        "method": st.sampled_from([*sorted(protocol.METHODS), "nope", ""]) | json_values,
        "params": st.dictionaries(
            st.sampled_from(
                [
                    "channel",
                    "token",
                    "data",
                    "recover",
                    "offset",
                    "epoch",
                    "limit",
                    "since",
                    "reverse",
                ]
            ),
            json_values | st.sampled_from(["news", "chat:x", "bad name", "x:y"]),
            max_size=5,
        )
        | json_values,
    },
)
frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    commands.map(orjson.dumps),
    st.lists(commands.map(orjson.dumps), min_size=1, max_size=4).map(b"\n".join),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames, connected=st.booleans())
async def test_any_frame_gets_a_reply_or_a_close_code(
    node: Node, frame: bytes, connected: bool
) -> None:
    transport = RecordingTransport()
    session = Session(node, transport)
    if connected:
        token = mint_token(node.settings.auth, sub="fuzz")
        await session.handle_frame(
            orjson.dumps({"id": 1, "method": "connect", "params": {"token": token}})
        )
    await asyncio.sleep(0)
    before = len(transport.messages)
    await session.handle_frame(frame)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    replies = [m for m in transport.messages[before:] if "id" in m]
    assert transport.closed is not None or replies, (frame, transport.messages)
    if transport.closed is not None:
        assert 3000 <= transport.closed.code <= 3999
    for reply in replies:
        assert ("result" in reply) != ("error" in reply)
        if "error" in reply:
            assert isinstance(reply["error"]["code"], int) and reply["error"]["message"]
    session.disconnect(Disconnect(3001, "test over"))
    await asyncio.sleep(0)

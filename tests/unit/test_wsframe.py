"""WebSocket framing without sockets: every test names the RFC 6455 rule it
checks. Frames are built here by hand, as a client would send them."""

from __future__ import annotations

import base64
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import wsframe
from server.wsframe import FrameError, FrameParser


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """A frame as a client sends it (masked unless told otherwise)."""
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if n < 126:
        head = bytes((b0, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_payload(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of a frame the server built (unmasked)."""
    assert frame[0] & 0x80, "server frames are final"
    assert not frame[1] & 0x80, "server frames are not masked"
    n = frame[1] & 0x7F
    head = 2
    if n == 126:
        n, head = struct.unpack_from("!H", frame, 2)[0], 4
    elif n == 127:
        n, head = struct.unpack_from("!Q", frame, 2)[0], 10
    assert len(frame) == head + n
    return frame[0] & 0x0F, frame[head:]


def refused(data: bytes, max_message: int = 1024) -> FrameError:
    with pytest.raises(FrameError) as info:
        FrameParser(max_message).feed(data)
    return info.value


# ---- handshake (section 4.2.2) ------------------------------------------------


def test_accept_key_is_the_rfc_example() -> None:
    # The worked example of section 1.3.
    assert wsframe.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("key", ["", "not base64!", base64.b64encode(b"short").decode(), "é"])
def test_a_key_that_is_not_16_bytes_of_base64_is_a_400(key: str) -> None:
    with pytest.raises(wsframe.HandshakeError) as info:
        wsframe.accept_key(key)
    assert info.value.status == 400


# ---- reading (section 5) ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_every_length_encoding_round_trips(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    parser = FrameParser(1 << 20)
    assert parser.feed(client_frame(wsframe.OP_BINARY, payload)) == [(wsframe.OP_BINARY, payload)]
    assert parser.buffered == 0


def test_a_frame_split_at_every_byte_still_arrives_once() -> None:
    data = client_frame(wsframe.OP_TEXT, b'{"id":1,"method":"ping"}') + client_frame(
        wsframe.OP_TEXT, "é".encode() * 100
    )
    parser = FrameParser(1024)
    got = []
    for i in range(len(data)):
        got += parser.feed(data[i : i + 1])
    assert got == [
        (wsframe.OP_TEXT, b'{"id":1,"method":"ping"}'),
        (wsframe.OP_TEXT, "é".encode() * 100),
    ]


def test_fragments_are_reassembled_and_control_frames_may_interleave() -> None:
    # Section 5.4: control frames may be injected between fragments.
    data = (
        client_frame(wsframe.OP_TEXT, b"hel", fin=False)
        + client_frame(wsframe.OP_PING, b"p")
        + client_frame(wsframe.OP_CONTINUATION, b"lo ", fin=False)
        + client_frame(wsframe.OP_CONTINUATION, b"world")
    )
    assert FrameParser(1024).feed(data) == [
        (wsframe.OP_PING, b"p"),
        (wsframe.OP_TEXT, b"hello world"),
    ]


def test_unmasked_client_frames_are_a_protocol_error() -> None:
    # Section 5.1: the server must close on an unmasked frame from a client.
    assert refused(client_frame(wsframe.OP_TEXT, b"x", mask=False)).code == 1002


def test_reserved_bits_without_an_extension_are_a_protocol_error() -> None:
    # Section 5.2: RSV1-3 must be 0 unless an extension says otherwise.
    assert refused(client_frame(wsframe.OP_TEXT, b"x", rsv=4)).code == 1002


@pytest.mark.parametrize("opcode", [3, 7, 0xB, 0xF])
def test_reserved_opcodes_are_a_protocol_error(opcode: int) -> None:
    assert refused(client_frame(opcode, b"x")).code == 1002


def test_fragmented_control_frames_are_a_protocol_error() -> None:
    # Section 5.5: control frames must not be fragmented.
    assert refused(client_frame(wsframe.OP_PING, b"x", fin=False)).code == 1002


def test_control_frames_longer_than_125_bytes_are_a_protocol_error() -> None:
    assert refused(client_frame(wsframe.OP_PING, b"x" * 126)).code == 1002


def test_a_continuation_with_no_message_is_a_protocol_error() -> None:
    assert refused(client_frame(wsframe.OP_CONTINUATION, b"x")).code == 1002


def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error() -> None:
    data = client_frame(wsframe.OP_TEXT, b"a", fin=False) + client_frame(wsframe.OP_TEXT, b"b")
    assert refused(data).code == 1002


def test_invalid_utf8_text_is_invalid_data() -> None:
    # Section 8.1: text must be UTF-8; 1007 otherwise.
    assert refused(client_frame(wsframe.OP_TEXT, b"\xff\xfe")).code == 1007


def test_utf8_split_across_fragments_is_fine() -> None:
    e = "é".encode()
    data = client_frame(wsframe.OP_TEXT, e[:1], fin=False) + client_frame(
        wsframe.OP_CONTINUATION, e[1:]
    )
    assert FrameParser(16).feed(data) == [(wsframe.OP_TEXT, e)]


def test_a_message_over_the_limit_is_refused_from_its_header_alone() -> None:
    # Only the header of a 1 GB frame: refused before any payload is held.
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 30)
    assert refused(header, max_message=1024).code == 1009


def test_fragments_adding_up_past_the_limit_are_too_big() -> None:
    data = client_frame(wsframe.OP_BINARY, b"x" * 600, fin=False) + client_frame(
        wsframe.OP_CONTINUATION, b"x" * 600
    )
    assert refused(data, max_message=1000).code == 1009


def test_a_64_bit_length_with_the_top_bit_set_is_a_protocol_error() -> None:
    assert refused(struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 63)).code == 1002


# ---- close frames (section 5.5.1, 7.4) ----------------------------------------


def test_close_payloads_parse_to_code_and_reason() -> None:
    assert wsframe.parse_close(b"") == (None, "")
    assert wsframe.parse_close(struct.pack("!H", 1000) + "bye é".encode()) == (1000, "bye é")
    assert wsframe.parse_close(struct.pack("!H", 4001)) == (4001, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_close_codes_that_must_not_be_sent_are_a_protocol_error(code: int) -> None:
    with pytest.raises(FrameError) as info:
        wsframe.parse_close(struct.pack("!H", code))
    assert info.value.code == 1002


def test_a_one_byte_close_payload_is_a_protocol_error() -> None:
    with pytest.raises(FrameError):
        wsframe.parse_close(b"\x03")


def test_a_close_reason_that_is_not_utf8_is_invalid_data() -> None:
    with pytest.raises(FrameError) as info:
        wsframe.parse_close(struct.pack("!H", 1000) + b"\xff")
    assert info.value.code == 1007


def test_a_long_close_reason_is_cut_on_a_character_boundary() -> None:
    opcode, payload = server_payload(wsframe.close_frame(3008, "é" * 200))
    assert opcode == wsframe.OP_CLOSE
    assert len(payload) <= 125
    code, reason = wsframe.parse_close(payload)
    assert code == 3008 and reason == "é" * 61


# ---- writing -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_frames_are_final_unmasked_and_sized_right(size: int) -> None:
    payload = b"y" * size
    assert server_payload(wsframe.build(wsframe.OP_TEXT, payload)) == (wsframe.OP_TEXT, payload)


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_is_its_own_inverse_and_matches_the_bytewise_rule(data: bytes, key: bytes) -> None:
    bytewise = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert wsframe.unmask(key, data) == bytewise
    assert wsframe.unmask(key, bytewise) == data


@given(st.binary(max_size=2000))
def test_any_bytes_give_messages_or_a_close_code_never_a_crash(data: bytes) -> None:
    try:
        FrameParser(1024).feed(data)
    except FrameError as exc:
        assert exc.code in (1002, 1007, 1009)

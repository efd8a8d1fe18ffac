"""Target (a): the WebSocket frame parser (``server/wsframe.py``).

Inputs are byte streams a client might send: valid streams built from
messages (random fragmentation, control frames between fragments, random
mask keys, minimal and non-minimal length encodings), and hostile ones
(unmasked frames, reserved bits, unknown opcodes, fragmented or oversized
control frames, lengths up to 2^64-1, truncations, garbage).

Properties checked for every stream:

- ``feed`` returns frames or raises ``FrameError`` (with a close code the
  module documents), nothing else;
- differential: the stream fed whole, fed split at the generated cut points
  and fed one byte at a time gives the same frames and the same error;
- for a valid stream, the frames are exactly the messages it was built from;
- the parser never buffers more than one message and one frame header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from server import wsframe
from server.wsframe import FrameError, FrameParser

CLOSE_CODES = frozenset(
    {wsframe.CLOSE_PROTOCOL_ERROR, wsframe.CLOSE_INVALID_DATA, wsframe.CLOSE_TOO_BIG}
)
MAX_HEADER = 14  # 2 + 8 (length) + 4 (mask)
# Streams up to this long are also fed one byte at a time (the reference).
BYTEWISE_MAX = 1024

Outcome = tuple[list[tuple[int, bytes]], tuple[int, str] | None]


@dataclass(slots=True)
class FrameSpec:
    """One frame as a client could write it, faults included."""

    opcode: int
    payload: bytes
    fin: bool = True
    mask: bytes | None = b"\x00\x00\x00\x00"  # None: unmasked
    rsv: int = 0  # the three reserved bits, 0-7
    length_form: int = 0  # 0 minimal, 126 or 127: that (maybe non-minimal) form
    length_override: int | None = None  # a declared length that lies

    def encode(self) -> bytes:
        length = len(self.payload) if self.length_override is None else self.length_override
        b0 = (0x80 if self.fin else 0) | (self.rsv & 7) << 4 | (self.opcode & 0x0F)
        mask_bit = 0x80 if self.mask is not None else 0
        form = self.length_form
        if form == 0:
            form = 0 if length < 126 else 126 if length < 65536 else 127
        if form == 126 and length >= 65536:
            form = 127
        if form == 0:
            head = bytes((b0, mask_bit | length))
        elif form == 126:
            head = struct.pack("!BBH", b0, mask_bit | 126, length)
        else:
            head = struct.pack("!BBQ", b0, mask_bit | 127, length & (2**64 - 1))
        if self.mask is None:
            return head + self.payload
        return head + self.mask + wsframe.unmask(self.mask, self.payload)


@dataclass(slots=True)
class FrameCase:
    """A stream, where to cut it, the parser's limit and, for a valid stream,
    the frames it must give."""

    stream: bytes
    cuts: list[int]
    max_message: int
    expected: list[tuple[int, bytes]] | None = None
    specs: list[FrameSpec] = field(default_factory=list)


def parse(stream: bytes, cuts: list[int], max_message: int) -> Outcome:
    """Feed ``stream`` split at ``cuts``; the frames given before any error,
    and the error's code and reason."""
    parser = FrameParser(max_message)
    frames: list[tuple[int, bytes]] = []
    prev = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]:
        try:
            frames.extend(parser.feed(stream[prev:cut]))
        except FrameError as exc:
            return frames, (exc.code, exc.reason)
        prev = cut
        # What is held: an incomplete frame (a header, or a payload no longer
        # than a control frame's or what the message may still take) and the
        # fragments of one message.
        held = parser.buffered
        assert held <= max_message + 125 + MAX_HEADER, f"parser holds {held} bytes"
    return frames, None


def check(case: FrameCase) -> None:
    """All the properties above; raises AssertionError (or whatever the
    parser leaks) on a violation."""
    stream, max_message = case.stream, case.max_message
    whole = parse(stream, [], max_message)
    split = parse(stream, case.cuts, max_message)
    # One byte at a time (for streams short enough to afford it) delivers
    # every frame before an error: the reference.
    single = (
        parse(stream, list(range(1, len(stream))), max_message)
        if len(stream) <= BYTEWISE_MAX
        else None
    )
    frames, error = split
    if error is None:
        assert whole == split, f"whole {whole!r} != split {split!r}"
        assert single is None or single == split, f"byte-by-byte {single!r} != split {split!r}"
    else:
        assert error[0] in CLOSE_CODES, f"undocumented close code {error[0]}"
        # ``feed`` raises instead of returning what the same call completed
        # before the fault, so with an error only a prefix of the frames is
        # delivered, how long depending on the cuts; the error is the same.
        assert whole[1] == error, f"whole-stream error {whole[1]} != split error {error}"
        if single is not None:
            assert single[1] == error, f"byte-by-byte error {single[1]} != split error {error}"
            assert frames == single[0][: len(frames)], "split frames are not a prefix"
    for opcode, payload in frames:
        assert opcode in (
            wsframe.OP_TEXT,
            wsframe.OP_BINARY,
            wsframe.OP_CLOSE,
            wsframe.OP_PING,
            wsframe.OP_PONG,
        )
        assert isinstance(payload, bytes)
        if opcode == wsframe.OP_TEXT:
            payload.decode("utf-8")
        if opcode >= 0x8:
            assert len(payload) <= 125
        else:
            assert len(payload) <= max_message
        if opcode == wsframe.OP_CLOSE:
            try:
                wsframe.parse_close(payload)
            except FrameError as exc:
                assert exc.code in CLOSE_CODES
    if case.expected is not None:
        assert error is None, f"valid stream refused: {error}"
        assert frames == case.expected, "valid stream parsed to other frames"


def fragment(opcode: int, payload: bytes, sizes: list[int], masks: list[bytes]) -> list[FrameSpec]:
    """A message as frames of the given sizes (the rest in the last)."""
    specs: list[FrameSpec] = []
    pos = 0
    for i, size in enumerate(sizes):
        if pos + size >= len(payload):
            break
        op = opcode if i == 0 else wsframe.OP_CONTINUATION
        specs.append(FrameSpec(op, payload[pos : pos + size], False, masks[i % len(masks)]))
        pos += size
    op = opcode if not specs else wsframe.OP_CONTINUATION
    specs.append(FrameSpec(op, payload[pos:], True, masks[len(specs) % len(masks)]))
    return specs


def from_bytes(data: bytes) -> FrameCase:
    """A case from raw fuzzer bytes (the coverage-guided engine): the first
    byte picks the limit, the next ones the cuts, the rest is the stream."""
    if len(data) < 3:
        return FrameCase(data, [], 125)
    limits = (0, 1, 125, 126, 65535, 65536, 1 << 20)
    max_message = limits[data[0] % len(limits)]
    ncuts = data[1] % 8
    cut_bytes = data[2 : 2 + ncuts]
    stream = data[2 + ncuts :]
    cuts = [b * max(1, len(stream)) // 256 for b in cut_bytes]
    return FrameCase(stream, cuts, max_message)


# ---- strategies ----------------------------------------------------------------

from hypothesis import strategies as st  # noqa: E402

_masks = st.one_of(st.just(b"\x00\x00\x00\x00"), st.binary(min_size=4, max_size=4))
_limits = st.sampled_from([0, 1, 125, 126, 127, 200, 65535, 65536, 1 << 20])
_text_payload = st.text(max_size=300).map(lambda t: t.encode("utf-8"))
_payloads = st.one_of(
    _text_payload, st.binary(max_size=300), st.integers(120, 70000).map(lambda n: b"a" * n)
)


@st.composite
def valid_case(draw: st.DrawFn) -> FrameCase:
    """Messages within the limit, fragmented at random, control frames
    between fragments, every length form."""
    max_message = draw(_limits)
    specs: list[FrameSpec] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            opcode = draw(st.sampled_from([wsframe.OP_PING, wsframe.OP_PONG, wsframe.OP_CLOSE]))
            if opcode == wsframe.OP_CLOSE:
                payload = draw(st.one_of(st.just(b""), st.just(b"\x03\xe8bye")))
            else:
                payload = draw(st.binary(max_size=125))
            specs.append(FrameSpec(opcode, payload, mask=draw(_masks)))
            expected.append((opcode, payload))
            continue
        opcode = draw(st.sampled_from([wsframe.OP_TEXT, wsframe.OP_BINARY]))
        payload = draw(_text_payload if opcode == wsframe.OP_TEXT else _payloads)
        if len(payload) > max_message:
            payload = payload[:max_message]
            if opcode == wsframe.OP_TEXT:
                payload = payload.decode("utf-8", "ignore").encode("utf-8")
        sizes = draw(st.lists(st.integers(0, 70), max_size=4))
        frames = fragment(opcode, payload, sizes, draw(st.lists(_masks, min_size=1, max_size=3)))
        for spec in frames:
            spec.length_form = draw(st.sampled_from([0, 0, 126, 127]))
        # A ping may come between the fragments of a message.
        if len(frames) > 1 and draw(st.booleans()):
            ping = draw(st.binary(max_size=10))
            frames.insert(1, FrameSpec(wsframe.OP_PING, ping, mask=draw(_masks)))
            expected.append((wsframe.OP_PING, ping))
        specs.extend(frames)
        expected.append((opcode, payload))
    stream = b"".join(s.encode() for s in specs)
    cuts = draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=6))
    return FrameCase(stream, cuts, max_message, expected, specs)


@st.composite
def hostile_spec(draw: st.DrawFn) -> FrameSpec:
    spec = FrameSpec(
        opcode=draw(st.one_of(st.sampled_from([0, 1, 2, 8, 9, 10]), st.integers(0, 15))),
        payload=draw(_payloads),
        fin=draw(st.booleans()),
        mask=draw(st.one_of(_masks, _masks, _masks, st.none())),
        rsv=draw(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, 7))),
        length_form=draw(st.sampled_from([0, 0, 126, 127])),
    )
    if draw(st.integers(0, 4)) == 0:
        spec.length_override = draw(
            st.one_of(
                st.integers(0, 2**64 - 1),
                st.sampled_from([126, 65535, 65536, 2**63 - 1, 2**63, 2**64 - 1]),
            )
        )
    return spec


@st.composite
def hostile_case(draw: st.DrawFn) -> FrameCase:
    """Frames with faults, valid ones between them, truncation, garbage."""
    specs = draw(
        st.lists(
            st.one_of(
                hostile_spec(),
                valid_case().map(lambda c: c.specs[0] if c.specs else FrameSpec(1, b"")),
            ),
            max_size=5,
        )
    )
    stream = b"".join(s.encode() for s in specs)
    tail = draw(st.one_of(st.just(b""), st.binary(max_size=20)))
    stream = (
        stream[: draw(st.integers(0, len(stream)))] + tail if draw(st.booleans()) else stream + tail
    )
    cuts = draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=6))
    return FrameCase(stream, cuts, draw(_limits), None, specs)


cases = st.one_of(valid_case(), hostile_case(), st.builds(from_bytes, st.binary(max_size=300)))

"""The coverage-guided engine: atheris (libFuzzer) on the frame parser and the
protocol decoders, one target per process (libFuzzer ends the process).

    python -m reliability.fuzz.atheris_main <target> <corpus dir> [libFuzzer flags]

The target modules are instrumented for coverage feedback; the properties
are the hypothesis engine's (``frames.check``, ``decoders.check``): an
exception or an assertion is a crash, written by libFuzzer as
``crash-<sha1>`` under ``-artifact_prefix``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

# Modules whose branches guide the fuzzer.
INSTRUMENTED = [
    "server.wsframe",
    "server.protocol",
    "server.codec",
    "server.codecs",
    "server.pusher",
]
ATHERIS_TARGETS = ("frames", "squall", "centrifuge-json", "centrifuge-protobuf", "pusher")


def seeds(target: str) -> list[bytes]:
    """A few valid inputs to start from (the fuzzer mutates them)."""
    from reliability.fuzz import decoders, frames

    if target == "frames":
        specs = [
            frames.FrameSpec(1, b'{"id":1}', mask=b"abcd"),
            frames.FrameSpec(9, b"ping", mask=b"\x01\x02\x03\x04"),
            frames.FrameSpec(2, b"x" * 130, False, b"wxyz", length_form=126),
            frames.FrameSpec(0, b"yy", True, b"wxyz", length_form=127),
            frames.FrameSpec(8, b"\x03\xe8bye", mask=b"\x00\x00\x00\x01"),
        ]
        stream = b"".join(s.encode() for s in specs)
        return [bytes((2, 1, 100)) + stream, bytes((5, 0)) + specs[0].encode()]
    if target == "centrifuge-protobuf":
        from server.codecs.centrifuge import pb

        out = []
        for cmd in (
            pb.Command(id=1, connect=pb.ConnectRequest(token="t")),  # noqa: S106
            pb.Command(id=2, subscribe=pb.SubscribeRequest(channel="c", recover=True, offset=3)),
            pb.Command(id=3, publish=pb.PublishRequest(channel="c", data=b'{"a":1}')),
            pb.Command(id=4, history=pb.HistoryRequest(channel="c", limit=10)),
            pb.Command(),
        ):
            body = cmd.SerializeToString()
            out.append(decoders._uvarint(len(body)) + body)
        return [*out, b"".join(out)]
    return {
        "squall": [
            b'{"id":1,"method":"connect","params":{"token":"x"}}',
            b'{"id":2,"method":"subscribe","params":{"channel":"c","recover":true,"offset":1}}\n'
            b'{"id":3,"method":"publish","params":{"channel":"c","data":{"a":[1,2]}}}',
            b'{"id":4,"method":"history","params":{"channel":"c","since":{"offset":1,"epoch":"e"}}}',
        ],
        "centrifuge-json": [
            b'{"id":1,"connect":{"token":"x","subs":{"c":{"recover":true,"offset":1}}}}',
            b'{"id":2,"subscribe":{"channel":"c"}}\n{"id":3,"history":{"channel":"c","limit":-1}}',
            b"{}",
        ],
        "pusher": [
            b"",
            b'{"event":"pusher:subscribe","data":{"channel":"presence-r","auth":"k:s",'
            b'"channel_data":"{\\"user_id\\":1}"}}',
            b'{"event":"client-x","channel":"private-r","data":{"a":1}}',
            b'{"event":"pusher:signin","data":"{\\"user_data\\":\\"{}\\",\\"auth\\":\\"k:s\\"}"}',
            b'{"event":"pusher:ping","data":{}}',
        ],
    }[target]


def one_input(target: str) -> Callable[[bytes], None]:
    """The function libFuzzer calls with each input."""
    from reliability.fuzz import decoders, frames

    if target == "frames":
        return lambda data: frames.check(frames.from_bytes(data))
    return lambda data: decoders.check(target, data)


def main(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]

    target, corpus = argv[1], Path(argv[2])
    if target not in ATHERIS_TARGETS:
        raise SystemExit(f"unknown target {target!r}; one of {', '.join(ATHERIS_TARGETS)}")
    # Instrumented first: the seeds and the checks import these modules too.
    with atheris.instrument_imports(include=INSTRUMENTED):
        import server.codec
        import server.codecs.centrifuge
        import server.codecs.pusher
        import server.protocol
        import server.pusher
        import server.wsframe  # noqa: F401
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, seed in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(seed)
    test = one_input(target)
    atheris.Setup([argv[0], *argv[3:], str(corpus)], test)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

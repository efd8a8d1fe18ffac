"""The coverage-guided engine: atheris (libFuzzer) on the frame parser, the
protocol decoders and the HTTP API, one target per process (libFuzzer ends
the process).

    python -m reliability.fuzz.atheris_main <target> <corpus dir> [libFuzzer flags]

The target modules are instrumented for coverage feedback; the properties
are the hypothesis engine's (``frames.check``, ``decoders.check``,
``http.verdict``): an exception or an assertion is a crash, written by
libFuzzer as ``crash-<sha1>`` under ``-artifact_prefix``.

``http`` runs the real server in this process (``http_atheris.py``); its
node's data directory is ``http-data`` next to the corpus.

``FUZZ_ATHERIS_SETUP=<module>:<function>`` calls that function before the
fuzzing starts (the tests plant a bug with it).
"""

from __future__ import annotations

import gc
import importlib
import os
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
# The HTTP target's: what its requests reach in handlers/ and server/.
HTTP_INSTRUMENTED = [
    "handlers.api",
    "handlers.api_keepalive",
    "handlers.pusher_api",
    "handlers.base",
    "handlers.status",
    "server.pusher",
    "server.openapi",
    "server.protocol",
    "server.channels",
]
ATHERIS_TARGETS = ("frames", "squall", "centrifuge-json", "centrifuge-protobuf", "pusher", "http")


def seeds(target: str) -> list[bytes]:
    """A few valid inputs to start from (the fuzzer mutates them)."""
    from reliability.fuzz import decoders, frames

    if target == "http":
        from reliability.fuzz import http_atheris

        return http_atheris.seeds()

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


def one_input(target: str, data_dir: Path | None = None) -> Callable[[bytes], None]:
    """The function libFuzzer calls with each input. For ``http`` it is an
    ``HttpFuzzer``: its server starts on the first input (in ``data_dir``, or
    a temporary directory) and runs until its ``close()``."""
    from reliability.fuzz import decoders, frames

    if target == "http":
        from reliability.fuzz.http_atheris import HttpFuzzer

        return HttpFuzzer(data_dir)
    if target == "frames":
        return lambda data: frames.check(frames.from_bytes(data))
    return lambda data: decoders.check(target, data)


def main(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]

    from reliability.fuzz.http_atheris import HttpFuzzer

    target, corpus = argv[1], Path(argv[2])
    if target not in ATHERIS_TARGETS:
        raise SystemExit(f"unknown target {target!r}; one of {', '.join(ATHERIS_TARGETS)}")
    # Instrumented first: the seeds and the checks import these modules too.
    if target == "http":
        with atheris.instrument_imports(include=HTTP_INSTRUMENTED):
            import handlers.api
            import handlers.api_keepalive
            import handlers.base
            import handlers.pusher_api
            import handlers.status  # noqa: F401
            import server.app
            import server.channels
            import server.openapi
            import server.protocol
            import server.pusher
    else:
        with atheris.instrument_imports(include=INSTRUMENTED):
            import server.codec
            import server.codecs.centrifuge
            import server.codecs.pusher
            import server.protocol
            import server.pusher
            import server.wsframe  # noqa: F401
    setup = os.environ.get("FUZZ_ATHERIS_SETUP")
    if setup:
        module, _, function = setup.partition(":")
        getattr(importlib.import_module(module), function)()
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, seed in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(seed)
    test = one_input(target, corpus.parent / f"{target}-data")
    if isinstance(test, HttpFuzzer):
        test.start()  # the server, before libFuzzer's first input
        # What the server and the imports made lives as long as the process:
        # out of the collector's way (a few per cent of the time).
        gc.collect()
        gc.freeze()
    atheris.Setup([argv[0], *argv[3:], str(corpus)], test)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

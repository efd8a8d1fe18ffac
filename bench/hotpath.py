"""The fan-out hot path in-process, without the kernel: nanoseconds of
Python per delivery from a publication reaching the hub to the transport's
``write``, which here is a no-op. It isolates what Squall adds on top of the
socket write every server pays; the real runs (``bench.run``) measure the
whole.

N WebSocket connections with a null transport, speaking one codec
(``--codecs``: Squall's own, Centrifugo JSON, Centrifugo Protobuf), are
subscribed to one channel; publications go to the hub one at a time or in bursts, then the
flusher runs (as the next loop iteration would). The raw line is the
ceiling's loop: one pre-built frame to every transport.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from bench.run import write_results
from handlers.websocket import WebSocketConnection, WebSocketConnections
from server import wsframe
from server.codec import Codec
from server.codecs.centrifuge import CENTRIFUGE_JSON, CENTRIFUGE_PROTOBUF
from server.config import load_settings
from server.models import Publication
from server.node import Node
from server.protocol import SQUALL
from server.session import State

CODECS: dict[str, Codec] = {
    "squall": SQUALL,
    "centrifuge-json": CENTRIFUGE_JSON,
    "centrifuge-protobuf": CENTRIFUGE_PROTOBUF,
}


class NullTransport:
    """Takes writes and does nothing (``len`` is a C call, like uvloop's)."""

    write = staticmethod(len)

    def __init__(self) -> None:
        self.conn: WebSocketConnection | None = None

    def set_write_buffer_limits(self, high: int = 0) -> None:
        pass

    def get_extra_info(self, *args: Any, **kwargs: Any) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.connection_lost(None)

    close = abort


@dataclass
class HotResult:
    codec: str
    subscribers: int
    burst: int
    hub_ns: float  # Flusher.fan_out per delivery (best rep)
    flush_ns: float  # Flusher._run per delivery, transport write a no-op
    total_ns: float
    total_median_ns: float
    raw_ns: float  # the ceiling's loop


async def measure(
    codec_name: str, subscribers: int, burst: int, publications: int, reps: int
) -> HotResult:
    codec = CODECS[codec_name]
    with tempfile.TemporaryDirectory() as tmp:
        raw_config = {
            "auth": {"token_secret": "s" * 32, "api_key": "k" * 32},
            "server": {"data_dir": tmp},
        }
        node = Node(load_settings(raw=raw_config, env={}))
        await node.start()
        try:
            registry = WebSocketConnections(node)
            conns = []
            for _ in range(subscribers):
                conn = WebSocketConnection(registry, b"", codec)
                transport = NullTransport()
                transport.conn = conn
                conn.connection_made(transport)  # type: ignore[arg-type]
                session = conn.session
                assert session is not None
                session.state = State.CONNECTED
                node.hub.add("news", session)
                conns.append(conn)
            data = b'{"t":1234567890.123,"n":1,"pad":"' + b"x" * 60 + b'"}'
            pubs = [Publication("news", i + 1, "epoch", data) for i in range(publications)]
            flusher = node.flusher
            hub_runs, flush_runs, totals = [], [], []
            gc.disable()
            try:
                for _ in range(reps):
                    hub = flush = 0.0
                    for start in range(0, publications, burst):
                        t0 = time.perf_counter()
                        for pub in pubs[start : start + burst]:
                            node.on_publication(pub)
                        t1 = time.perf_counter()
                        flusher._run()
                        t2 = time.perf_counter()
                        hub += t1 - t0
                        flush += t2 - t1
                    per = 1e9 / (publications * subscribers)
                    hub_runs.append(hub * per)
                    flush_runs.append(flush * per)
                    totals.append((hub + flush) * per)
                transports = [c._transport for c in conns]
                opcode = wsframe.OP_BINARY if codec.binary else wsframe.OP_TEXT
                frame = wsframe.build(opcode, codec.pub(pubs[0]))
                raws = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for _ in range(publications):
                        for t in transports:
                            t.write(frame)  # type: ignore[union-attr]
                    raws.append((time.perf_counter() - t0) * 1e9 / (publications * subscribers))
            finally:
                gc.enable()
        finally:
            await node.close()
    return HotResult(
        codec=codec_name,
        subscribers=subscribers,
        burst=burst,
        hub_ns=round(min(hub_runs), 1),
        flush_ns=round(min(flush_runs), 1),
        total_ns=round(min(totals), 1),
        total_median_ns=round(statistics.median(totals), 1),
        raw_ns=round(min(raws), 1),
    )


def summarize(results: list[HotResult]) -> str:
    lines = [
        "| codec | subscribers | burst | hub ns/delivery | flush ns/delivery | total (best)"
        " | total (median) | raw loop |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.codec} | {r.subscribers:,} | {r.burst} | {r.hub_ns:.0f} | {r.flush_ns:.0f} "
            f"| {r.total_ns:.0f} | {r.total_median_ns:.0f} | {r.raw_ns:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--bursts", default="1,10", help="publications per loop iteration")
    parser.add_argument("--publications", type=int, default=300)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated")
    parser.add_argument("--name", default="hotpath", help="results: bench/results/<name>.md")
    args = parser.parse_args()
    results = []
    for codec in args.codecs.split(","):
        for burst in (int(b) for b in args.bursts.split(",")):
            r = uvloop.run(measure(codec, args.subscribers, burst, args.publications, args.reps))
            print(r, flush=True)
            results.append(r)
    title = "Fan-out hot path in-process (ns of Python per delivery)"
    print(write_results(args.name, title, vars(args), results, summarize(results)))


if __name__ == "__main__":
    main()

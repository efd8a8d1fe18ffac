"""Fan-out benchmark: one channel, N subscribers, Squall against its peers in
the same run on the same machine, with the same load generator.

    python -m bench.run                        # default scenarios, 3 repetitions
    python -m bench.run --subscribers 1000 --peers squall,raw --reps 1

The server runs pinned to CPU 0, this load generator to CPU 1 (when the
machine has two). Measured per run: deliveries per second, server CPU
microseconds per delivery (user+sys of the server process from /proc, which
stays true when the generator is the bottleneck), publish-to-deliver
latency (the send time travels in the payload), lost and duplicated
publications, and whether the generator itself was the bottleneck.
Results: bench/results/fanout-<time>.json and bench/results/fanout.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.wsproto import (
    OFFSET,
    SEQ,
    CentrifugeJSON,
    CentrifugeProtobuf,
    HttpPublisher,
    PusherSubscriber,
    SSESubscriber,
    Subscriber,
    delimited,
    frame,
    until,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-0123456789abcdef-0123456789"
API_KEY = "bench-api-key-0123456789"
PROFILE = ""  # set by --profile NAME: Squall runs under py-spy
# A Pusher app (docs/pusher.md): its channels live in the namespace
# pusher-1234, so the Pusher channel "fanout" is Squall's "pusher-1234:fanout".
PUSHER_KEY = "bench-key"
PUSHER_NAMESPACE = "pusher-1234"

# The app's namespace is configured as the ``bench`` one (history, recovery,
# publishing clients) with what an app's namespace needs (presence) and has
# by default (join/leave); public, so the Squall publisher may publish to it
# without subscribing (an app's default namespace is private).
SQUALL_CONFIG = f"""
[limits]
commands_per_second = 1000000.0
command_burst = 1000000
max_connections = 100000
[namespaces.bench]
allow_publish = true
history_size = 100
history_ttl = 600.0
recover = true
[namespaces.{PUSHER_NAMESPACE}]
allow_publish = true
history_size = 100
history_ttl = 600.0
recover = true
presence = true
join_leave = true
[[pusher.apps]]
id = "1234"
key = "{PUSHER_KEY}"
secret = "bench-pusher-secret-0123456789"
"""


def centrifugo_config(port: int) -> dict[str, Any]:
    """Centrifugo with the setting of Squall's: the ``bench`` namespace keeps
    100 publications for 600 s with recovery on; clients may subscribe (and
    publish, for ``--publish ws``); publishing through the HTTP API takes the
    API key."""
    return {
        "client": {
            "token": {"hmac_secret_key": SECRET},
            "allowed_origins": ["*"],
        },
        "http_api": {"key": API_KEY},
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "error"},
        "usage_stats": {"disabled": True},
        # Its clients are gone by then: do not wait 30 s for them at exit.
        "shutdown": {"timeout": "3s"},
        "channel": {
            "namespaces": [
                {
                    "name": "bench",
                    "history_size": 100,
                    "history_ttl": "600s",
                    "force_recovery": True,
                    "allow_subscribe_for_client": True,
                    "allow_publish_for_client": True,
                }
            ]
        },
    }


def centrifugo_binary() -> Path:
    from tests.centrifuge_servers import centrifugo_binary

    return centrifugo_binary()


@dataclass
class Result:
    peer: str
    subscribers: int
    publications: int
    rate: float  # target publications per second (0: as fast as accepted)
    deliveries: int
    seconds: float
    deliveries_per_s: float
    cpu_us_per_delivery: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    lost: int
    duplicated: int
    client_bound: bool
    frames_per_delivery: float = 1.0  # < 1: several publications shared a frame
    burst: int = 1
    scenario: str = "fanout"
    publish: str = "ws"  # how publications went in: WebSocket, or the HTTP API


def raise_fd_limit(want: int) -> None:
    """Room for ``want`` sockets here and in the servers (they inherit it):
    the hard limit too where we may (CAP_SYS_RESOURCE), else exit with a
    clear message rather than fail halfway with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        if want > hard:
            sys.exit(
                f"bench: {want:,} open files needed, the hard limit is {hard:,} and this "
                "process may not raise it (CAP_SYS_RESOURCE; ulimit -Hn)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Peer:
    """How to start a peer and speak to it over WebSocket."""

    cmd: tuple[str, ...]  # "{port}" is replaced
    path: str = "/connection/websocket"
    sub: tuple[bytes, ...] = (b"sub",)  # what a subscriber sends after the handshake
    hello: tuple[bytes, ...] = ()  # what the publisher sends first
    wrap: tuple[bytes, bytes] = (b"", b"")  # around a publication's JSON
    client: type[Subscriber] = Subscriber  # what parses a subscriber's frames
    protocol: str = ""  # the WebSocket subprotocol subscribers ask for
    # Where a WebSocket publisher connects ("": ``path``) and what it speaks.
    publisher_path: str = ""


_SOCKETIO = dict(
    path="/socket.io/?EIO=4&transport=websocket",
    sub=(b"40", b'42["sub"]'),
    hello=(b"40",),
    wrap=(b'42["pub",', b"]"),
)
PEERS: dict[str, Peer] = {
    "raw_asyncio": Peer((sys.executable, "bench/peers/raw_asyncio.py", "{port}")),
    "plain_tornado": Peer((sys.executable, "bench/peers/plain_tornado.py", "{port}")),
    "python_socketio": Peer(
        (sys.executable, "bench/peers/python_socketio.py", "{port}"), **_SOCKETIO
    ),  # type: ignore[arg-type]
    "node_ws": Peer(("node", "bench/node/node_ws.mjs", "{port}")),
    "node_socketio": Peer(("node", "bench/node/node_socketio.mjs", "{port}"), **_SOCKETIO),  # type: ignore[arg-type]
    "squall": Peer((sys.executable, "-m", "server", "serve", "--port", "{port}")),
}
# Squall on Redis: one process, and two workers (CPU counts every Squall
# process and the Redis server).
PEERS["squall_redis"] = PEERS["squall_2workers"] = PEERS["squall"]
# Squall with subscribers on its Centrifugo endpoint (JSON, and Protobuf by
# subprotocol, as the SDKs ask); a WebSocket publisher speaks Squall's own
# protocol on /connection/websocket, so only the subscribers' codec differs.
_CENTRIFUGE = dict(path="/connection/centrifuge/websocket", publisher_path="/connection/websocket")
PEERS["squall_cf_json"] = Peer(PEERS["squall"].cmd, client=CentrifugeJSON, **_CENTRIFUGE)  # type: ignore[arg-type]
PEERS["squall_cf_protobuf"] = Peer(
    PEERS["squall"].cmd,
    client=CentrifugeProtobuf,
    protocol="centrifuge-protobuf",
    **_CENTRIFUGE,  # type: ignore[arg-type]
)
# Centrifugo itself (the binary tests/centrifuge_servers.py builds), one core
# (GOMAXPROCS=1), its subscribers speaking its JSON protocol.
PEERS["centrifugo"] = Peer(("{centrifugo}", "--config", "{config}"), client=CentrifugeJSON)
# Squall's subscribers on Server-Sent Events (the same publisher).
PEERS["squall_sse"] = Peer(
    PEERS["squall"].cmd,
    client=SSESubscriber,
    path="/connection/sse",
    publisher_path="/connection/websocket",
)
# Squall's subscribers speaking the Pusher protocol (pusher-js's URL) on a
# public channel of the bench's app; the same Squall publisher, on the
# app's namespace.
PEERS["squall_pusher"] = Peer(
    PEERS["squall"].cmd,
    client=PusherSubscriber,
    path=f"/app/{PUSHER_KEY}?protocol=7",
    publisher_path="/connection/websocket",
)
CODEC_PEERS = "squall,squall_cf_json,squall_cf_protobuf,centrifugo"
DEFAULT_PEERS = "raw_asyncio,plain_tornado,python_socketio,node_ws,node_socketio,squall"


def start_peer(
    peer: str,
    port: int,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    cmd = [c.replace("{port}", str(port)) for c in PEERS[peer].cmd] + list(args)
    if peer == "centrifugo":
        binary = centrifugo_binary()
        if not binary.exists():
            raise RuntimeError(f"no Centrifugo binary at {binary}: scripts/build-centrifugo.sh")
        config = workdir / "centrifugo.json"
        config.write_text(json.dumps(centrifugo_config(port)))
        cmd = [c.replace("{centrifugo}", str(binary)).replace("{config}", str(config)) for c in cmd]
        # One core, like Squall's one process (pinned to the same CPU).
        env["GOMAXPROCS"] = "1"
    if peer.startswith("squall"):
        config = workdir / "bench.toml"
        config.write_text(SQUALL_CONFIG)
        env.update(
            SQUALL_TOKEN_SECRET=SECRET,
            SQUALL_API_KEY=API_KEY,
            SQUALL_LOG_LEVEL=os.environ.get("SQUALL_LOG_LEVEL", "warning"),
        )
        cmd += ["--config", str(config), "--data-dir", str(workdir / "data")]
        if "--workers" in args:
            pin = []  # one worker per core
        if PROFILE:
            # Flame graph of the server's own hot path (py-spy samples it from
            # outside; the CPU figures of a profiled run are not comparable).
            out = RESULTS / f"flame-{PROFILE}.svg"
            cmd = [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--nonblocking",
                "-r",
                "250",
                "-o",
                str(out),
                "--",
                *cmd,
            ]
    # Centrifugo logs to stderr: kept in the run's directory.
    err = (workdir / "server.log").open("ab") if peer == "centrifugo" else None
    proc = subprocess.Popen([*pin, *cmd], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    if err is not None:
        err.close()
    deadline = time.monotonic() + 30
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = workdir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{peer} exited with {proc.returncode} {tail}".strip())
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{peer} did not start")


def stop_peer(proc: subprocess.Popen[bytes]) -> None:
    if PROFILE:
        # Stop the profiled server, not py-spy: py-spy writes its flame graph
        # when its child exits.
        for child in descendants(proc.pid):
            os.kill(child, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    proc.terminate()
    try:
        # A supervisor waits up to drain_grace + 5 s (15 s) for its workers.
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def squall_token(user: str) -> str:
    from server.auth import mint_token
    from server.config import AuthSettings

    return mint_token(AuthSettings(token_secret=SECRET), sub=user, ttl=3600)


def squall_channel(peer: str, channel: str = "") -> str:
    """The Squall channel of ``channel`` (c17, ...; empty: the fan-out
    channel): in the ``bench`` namespace, or the Pusher app's for the
    Pusher peer."""
    namespace = PUSHER_NAMESPACE if peer == "squall_pusher" else "bench"
    return f"{namespace}:{channel or 'fanout'}"


def hello(peer: str, user: str, channels: Sequence[str] = ()) -> list[bytes]:
    """What a subscriber sends once the handshake is done: to subscribe to
    ``channels`` (c17, ...) or, when none, to the one fan-out channel."""
    if PEERS[peer].client is PusherSubscriber:
        # Public channels: no auth. Sent once the connection is established.
        return [
            b'{"event":"pusher:subscribe","data":{"channel":"%s"}}' % name.encode()
            for name in (channels or ["fanout"])
        ]
    names = [f"bench:{channel}" for channel in channels] or ["bench:fanout"]
    if PEERS[peer].client is SSESubscriber:
        query = "&".join(f"channel={name}" for name in names)
        return [f"{query}&token={squall_token(user)}".encode()]
    if PEERS[peer].client is not Subscriber:
        return centrifuge_hello(peer, user, names)
    if not peer.startswith("squall"):
        sub = list(PEERS[peer].sub)
        if channels:
            form = b'42["sub","%s"]' if PEERS[peer].hello else b"sub:%s"
            sub[-1:] = [form % channel.encode() for channel in channels]
        return sub
    return [
        json.dumps(
            {"id": 1, "method": "connect", "params": {"token": squall_token(user)}}
        ).encode(),
        *(
            b'{"id":%d,"method":"subscribe","params":{"channel":"%s"}}' % (2 + i, name.encode())
            for i, name in enumerate(names)
        ),
    ]


def centrifuge_hello(peer: str, user: str, channels: Sequence[str]) -> list[bytes]:
    """Connect and subscribe commands in the Centrifugo protocol: JSON, or
    length-prefixed Protobuf (the generated module encodes them)."""
    token = squall_token(user)
    if PEERS[peer].client is CentrifugeProtobuf:
        from server.codecs import centrifuge_pb2 as pb

        connect = pb.Command(id=1, connect=pb.ConnectRequest(token=token))  # type: ignore[attr-defined]
        subscribes = [
            pb.Command(id=2 + i, subscribe=pb.SubscribeRequest(channel=name))  # type: ignore[attr-defined]
            for i, name in enumerate(channels)
        ]
        return [delimited(c.SerializeToString()) for c in [connect, *subscribes]]
    return [
        b'{"id":1,"connect":{"token":"%s"}}' % token.encode(),
        *(
            b'{"id":%d,"subscribe":{"channel":"%s"}}' % (2 + i, name.encode())
            for i, name in enumerate(channels)
        ),
    ]


def publisher_hello(peer: str) -> list[bytes]:
    if peer == "centrifugo":
        return [b'{"id":1,"connect":{"token":"%s"}}' % squall_token("publisher").encode()]
    if not peer.startswith("squall"):
        return list(PEERS[peer].hello)
    return hello("squall", "publisher")[:1]


def message(peer: str, n: int, pad: str, channel: str = "", publish: str = "ws") -> bytes:
    """Publication ``n`` (its number within its channel; 0: a warm-up) to
    ``channel`` (c17, ...) or, when empty, to the one fan-out channel: a
    WebSocket message in the peer's protocol, or with ``publish="http"`` the
    body of an HTTP API publish."""
    data: dict[str, Any] = (
        {"n": n, "t": time.time(), "pad": pad} if n else {"w": 1, "t": time.time()}
    )
    name = squall_channel(peer, channel)
    if publish == "http":
        return json.dumps({"channel": name, "data": data}, separators=(",", ":")).encode()
    if peer == "centrifugo":
        body = {"id": 10 + n, "publish": {"channel": name, "data": data}}
        return json.dumps(body, separators=(",", ":")).encode()
    if peer.startswith("squall"):
        body = {"id": 10 + n, "method": "publish", "params": {"channel": name, "data": data}}
        return json.dumps(body, separators=(",", ":")).encode()
    before, after = PEERS[peer].wrap
    if channel and PEERS[peer].hello:  # socket.io: the channel is a room
        data = {"ch": channel, "data": data}
    elif channel:
        before = channel.encode() + b"\n" + before  # the simple peers: "<channel>\n<payload>"
    return before + json.dumps(data, separators=(",", ":")).encode() + after


async def one_run(
    peer: str,
    subscribers: int,
    publications: int,
    rate: float,
    size: int,
    burst: int = 1,
    scenario: str = "fanout",
    channels: int = 0,
    per_subscriber: int = 1,
    publish: str = "ws",
) -> Result:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env: dict[str, str] = {}
        args: tuple[str, ...] = ()
        redis = None
        if peer in ("squall_redis", "squall_2workers"):
            from tests.services import RedisServer

            redis = RedisServer().start()
            env["SQUALL_BROKER_URL"] = redis.url
            if peer == "squall_2workers":
                args = ("--workers", "2")
        try:
            proc = start_peer(peer, port, Path(tmp), env, args)
            try:
                extra = [redis.proc.pid] if redis is not None and redis.proc else []

                def pids() -> list[int]:
                    return [proc.pid, *descendants(proc.pid), *extra]

                return await _measure(
                    loop,
                    peer,
                    port,
                    pids,
                    subscribers,
                    publications,
                    rate,
                    size,
                    burst,
                    scenario,
                    channels,
                    per_subscriber,
                    publish,
                )
            finally:
                stop_peer(proc)
        finally:
            if redis is not None:
                redis.stop()


def descendants(pid: int) -> list[int]:
    """Child processes (a supervisor's workers), from /proc."""
    out: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += [int(child), *descendants(int(child))]
    return out


async def _measure(
    loop: asyncio.AbstractEventLoop,
    peer: str,
    port: int,
    pids: Callable[[], list[int]],
    subscribers: int,
    publications: int,
    rate: float,
    size: int,
    burst: int,
    scenario: str,
    channels: int = 0,
    per_subscriber: int = 1,
    publish: str = "ws",
) -> Result:
    """Subscribe, warm up, publish, count; CPU of every process ``pids()``
    names (read when the measurement starts)."""
    ports = [port]
    path = PEERS[peer].path
    client = PEERS[peer].client

    def chan(i: int) -> str:
        return f"c{i % channels}" if channels else ""

    def chans(i: int) -> list[str]:
        """Subscriber i's channels: i, i + 1, ... (mod C)."""
        return [chan(i + j) for j in range(per_subscriber)] if channels else []

    stepwise = bool(PEERS[peer].hello)
    ready = asyncio.Event()
    waiting = [subscribers]

    def one_ready() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            ready.set()

    latencies: list[float] = []
    # With several channels a subscriber, publications are numbered across
    # all channels (each subscriber sees a rising subsequence); otherwise
    # within their channel, and Squall's own offsets are checked.
    numbered_globally = per_subscriber > 1
    seq = OFFSET if peer.startswith("squall") and not numbered_globally else SEQ
    subs: list[Subscriber] = []
    # Latency from up to 100 subscribers spread over the set (it costs the
    # generator a clock read per line).
    every = max(1, subscribers // 100)
    for i in range(subscribers):
        lat = latencies if i % every == 0 else None
        p = ports[i % len(ports)]
        _, protocol = await loop.create_connection(
            lambda i=i, lat=lat, p=p: client(
                path,
                f"127.0.0.1:{p}",
                hello(peer, f"u{i}", chans(i)),
                seq,
                lat,
                one_ready,
                stepwise,
                PEERS[peer].protocol,
            ),
            "127.0.0.1",
            p,
        )
        subs.append(protocol)
        if i % 500 == 499:
            await asyncio.sleep(0)  # let handshakes progress
    await asyncio.wait_for(ready.wait(), 60 + subscribers / 200)
    pub_ready = asyncio.Event()
    publisher: Subscriber | HttpPublisher
    if publish == "http":
        # The server's HTTP API, one keep-alive connection, as a backend would.
        header = f"Authorization: apikey {API_KEY}"
        if peer == "centrifugo":
            header = f"X-API-Key: {API_KEY}"
        _, publisher = await loop.create_connection(
            lambda: HttpPublisher(f"127.0.0.1:{port}", "/api/publish", header, pub_ready.set),
            "127.0.0.1",
            port,
        )
    else:
        # Centrifugo's publisher speaks its protocol, and answers its pings.
        speaker = CentrifugeJSON if peer == "centrifugo" else Subscriber
        _, publisher = await loop.create_connection(
            lambda: speaker(
                PEERS[peer].publisher_path or path,
                f"127.0.0.1:{port}",
                publisher_hello(peer),
                SEQ,
                None,
                pub_ready.set,
                stepwise,
            ),
            "127.0.0.1",
            port,
        )
    await asyncio.wait_for(pub_ready.wait(), 10)
    assert publisher.transport is not None
    transport = publisher.transport
    if isinstance(publisher, HttpPublisher):
        send = publisher.publish
    else:

        def send(body: bytes) -> None:
            transport.write(frame(body))

    if PEERS[peer].hello and isinstance(publisher, Subscriber):
        # socket.io drops events sent before the namespace connect is
        # acknowledged: wait for the open packet and the "40" reply.
        for _ in range(200):
            if publisher.texts >= 2:
                break
            await asyncio.sleep(0.05)
    # Warm up until every subscriber heard something (Squall's warm-ups carry
    # offsets and count as publications; the peers' are marked "w"), again
    # every half second: a subscriber may still be joining its room.
    # Joining rooms is slow in some peers: 20 s, plus 1 s per 500 subscribers.
    for i in range(400 + subscribers // 25):
        if i % 10 == 0:
            for c in range(max(1, channels)):
                send(message(peer, 0, "", chan(c), publish))
        await asyncio.sleep(0.05)
        if all(s.count or s.warm for s in subs):
            break
    else:
        raise RuntimeError(f"{peer}: warm-up never reached every subscriber")
    await asyncio.sleep(0.3)
    for s in subs:
        # Measured publications continue from the last offset seen (Squall
        # numbers the warm-ups too); the simple peers count from 1.
        s.count = s.lost = s.dup = s.frames = 0
    latencies.clear()
    pad = "x" * size
    measured = pids()
    cpu0 = sum(cpu_seconds(pid) for pid in measured)
    own0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    # At a rate, publications go out ``burst`` at a time, ``rate`` per second
    # on average; with no rate, as fast as the socket takes them.
    interval = burst / rate if rate else 0.0
    for n in range(1, publications + 1):
        # Round robin over the channels; ``n`` counts within each channel.
        c = (n - 1) % max(1, channels)
        k = n if numbered_globally else (n - 1) // max(1, channels) + 1
        send(message(peer, k, pad, chan(c), publish))
        if interval and n % burst == 0:
            delay = t0 + (n // burst) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        elif not interval and n % 50 == 0:
            await asyncio.sleep(0)
    # What each subscriber should get.
    per_sub = publications // max(1, channels) * (per_subscriber if channels else 1)
    expected = per_sub * subscribers
    # A slow peer gets time to deliver everything (at 2,000 deliveries/s);
    # what has not arrived by then counts as lost.
    await until(lambda: sum(s.count for s in subs) >= expected, max(60.0, expected / 2000), 0.005)
    elapsed = time.perf_counter() - t0
    cpu = sum(cpu_seconds(pid) for pid in measured) - cpu0
    own = sum(os.times()[:2]) - own0
    delivered = sum(s.count for s in subs)
    lost = sum(max(0, per_sub - (s.count - s.dup)) for s in subs)
    refused = publisher.errors if isinstance(publisher, HttpPublisher) else []
    for s in [*subs, publisher]:
        if s.transport is not None:
            s.transport.close()
    if refused:
        raise RuntimeError(f"{peer}: publishes refused: {refused[:3]!r}")
    lat = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3)

    return Result(
        peer=peer,
        subscribers=subscribers,
        publications=publications,
        rate=rate,
        deliveries=delivered,
        seconds=round(elapsed, 3),
        deliveries_per_s=round(delivered / elapsed, 1),
        cpu_us_per_delivery=round(cpu * 1e6 / max(delivered, 1), 3),
        p50_ms=pct(0.5),
        p99_ms=pct(0.99),
        p999_ms=pct(0.999),
        lost=lost,
        duplicated=sum(s.dup for s in subs),
        client_bound=own > 0.9 * elapsed,
        frames_per_delivery=round(sum(s.frames for s in subs) / max(delivered, 1), 3),
        burst=burst,
        scenario=scenario
        + (f", {channels:,} channels" if channels else "")
        + (f", {per_subscriber} a subscriber" if channels and per_subscriber > 1 else "")
        + (", HTTP API" if publish == "http" else ""),
        publish=publish,
    )


def summarize(results: list[Result]) -> str:
    Key = tuple[str, int, float, int]  # scenario, subscribers, rate, burst
    groups: dict[tuple[Key, str], list[Result]] = {}
    for r in results:
        groups.setdefault(((r.scenario, r.subscribers, r.rate, r.burst), r.peer), []).append(r)
    raw = {
        key: statistics.median(x.cpu_us_per_delivery for x in rs)
        for (key, peer), rs in groups.items()
        if peer == "raw_asyncio"
    }
    lines = [
        "| scenario | subscribers | rate | burst | peer | deliveries/s (median, range) "
        "| CPU µs/delivery (median, range) | × raw | frames/delivery | p50 ms | p99 ms | p99.9 ms "
        "| lost | dup | client-bound |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |",
    ]
    for (key, peer), rs in sorted(groups.items()):
        scenario, n, rate, burst = key
        dps = [x.deliveries_per_s for x in rs]
        cpus = [x.cpu_us_per_delivery for x in rs]
        cpu = statistics.median(cpus)
        ratio = f"{cpu / raw[key]:.2f}" if raw.get(key) else "–"

        def med(f: str, rs: list[Result] = rs) -> float:
            return float(statistics.median(getattr(x, f) for x in rs))

        lines.append(
            f"| {scenario} | {n:,} | {rate or 'max'} | {burst} | {peer} "
            f"| {statistics.median(dps):,.0f} ({min(dps):,.0f}–{max(dps):,.0f}) "
            f"| {cpu:.2f} ({min(cpus):.2f}–{max(cpus):.2f}) | {ratio} "
            f"| {med('frames_per_delivery'):.3f} | {med('p50_ms'):.1f} | {med('p99_ms'):.1f} "
            f"| {med('p999_ms'):.1f} | {sum(x.lost for x in rs)} | {sum(x.duplicated for x in rs)} "
            f"| {sum(x.client_bound for x in rs)}/{len(rs)} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """What ran: Python packages and Node libraries of every peer."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("tornado", "uvloop", "orjson", "python-socketio", "python-engineio", "redis"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        out["node"] = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        out["node"] = "missing"
    for lib in ("ws", "socket.io"):
        pkg = ROOT / "bench" / "node" / "node_modules" / lib / "package.json"
        out[f"node {lib}"] = json.loads(pkg.read_text())["version"] if pkg.exists() else "missing"
    from tests.centrifuge_servers import CENTRIFUGO_VERSION

    try:
        # A `go install` build calls itself v0.0.0: the version built is ours.
        built = subprocess.run(
            [str(centrifugo_binary()), "version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        out["centrifugo"] = f"{CENTRIFUGO_VERSION} ({built})"
    except OSError:
        out["centrifugo"] = "missing"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"of: {', '.join(PEERS)}")
    parser.add_argument("--subscribers", default="100,1000")
    parser.add_argument("--publications", type=int, default=2000)
    parser.add_argument(
        "--rate", type=float, default=0, help="publications/s; 0: as fast as accepted"
    )
    parser.add_argument(
        "--burst", type=int, default=1, help="at a rate: publications sent back to back"
    )
    parser.add_argument("--size", type=int, default=100, help="padding bytes per publication")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--channels",
        type=int,
        default=0,
        help="subscriber i takes channel i %% C; publications go round robin",
    )
    parser.add_argument(
        "--per-subscriber",
        type=int,
        default=1,
        help="with --channels: subscriber i takes channels i .. i+K-1 (mod C), so one "
        "process holds C channels x K subscribers on C connections",
    )
    parser.add_argument(
        "--publish",
        choices=("ws", "http"),
        default="ws",
        help="publish over WebSocket (each peer's own protocol) or the server's HTTP API "
        "(Squall and Centrifugo)",
    )
    parser.add_argument("--scenario", default="", help="name in the results (default: from rate)")
    parser.add_argument("--name", default="fanout", help="results file: bench/results/<name>.md")
    parser.add_argument("--profile", default="", help="run Squall under py-spy: flame-NAME.svg")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    scenario = args.scenario or ("burst" if not args.rate else f"rate{args.burst}")
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results: list[Result] = []
    failures: list[str] = []
    for n in [int(x) for x in args.subscribers.split(",")]:
        for rep in range(args.reps):
            for peer in peers:
                try:
                    r = uvloop.run(
                        one_run(
                            peer,
                            n,
                            args.publications,
                            args.rate,
                            args.size,
                            args.burst,
                            scenario,
                            args.channels,
                            args.per_subscriber,
                            args.publish,
                        )
                    )
                except (RuntimeError, TimeoutError, OSError) as exc:
                    # One peer failing (too slow to take N subscribers, say)
                    # is a result too; the others still run.
                    print(f"{peer:16} subs={n:6} rep={rep} FAILED: {exc!r}", flush=True)
                    failures.append(f"{peer}, {n:,} subscribers: {exc!r}")
                    continue
                print(
                    f"{peer:16} subs={n:6} rep={rep} {r.deliveries_per_s:12,.0f}/s "
                    f"{r.cpu_us_per_delivery:7.2f} µs/delivery p99={r.p99_ms:.1f}ms "
                    f"frames/delivery={r.frames_per_delivery:.3f} lost={r.lost} dup={r.duplicated}"
                    f"{' CLIENT-BOUND' if r.client_bound else ''}",
                    flush=True,
                )
                results.append(r)
    table = summarize(results)
    if failures:
        table += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    print(write_results(args.name, f"Fan-out ({scenario})", vars(args), results, table))


def write_results(
    kind: str, title: str, args: dict[str, Any], results: list[Any], table: str
) -> str:
    """bench/results/<kind>-<time>.json (every run) and <kind>.md (the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {
        "time": stamp,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "versions": versions(),
        "args": args,
    }
    rows = [asdict(r) for r in results]
    (RESULTS / f"{kind}-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": rows}, indent=2)
    )
    plots = ""
    try:
        from bench.plot import plot

        plots = "\n".join(f"![{p.stem}]({p.name})" for p in plot(kind, title, rows))
    except ImportError:
        plots = "(no plots: pip install matplotlib)"
    (RESULTS / f"{kind}.md").write_text(
        f"# {title}\n\n```\n{json.dumps(meta, indent=1)}\n```\n\n{table}\n\n{plots}\n"
    )
    return table


if __name__ == "__main__":
    main()

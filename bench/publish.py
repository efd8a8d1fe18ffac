"""The publish path: how many publications a second a server takes, and its
CPU per publication, to 10,000 channels (round robin) with history on, with
no subscribers and with 2 a channel; Squall against Centrifugo in the same
run (issue 17).

    python -m bench.publish                          # 3 repetitions, 8 s each
    python -m bench.publish --subscribers 0 --reps 1 --paths single,batch
    python -m bench.publish --profile publish        # flame-publish-<path>.svg

Paths:

- ``single``: one ``POST /api/publish`` a publication, under ``wrk`` (one
  thread, 32 keep-alive connections; its Lua script rotates the channel per
  request);
- ``batch``: ``POST /api/batch`` of 100 publications to 100 different
  channels a request (rotating), under ``wrk``; Squall's body is
  ``{"commands": [{"method": "publish", "params": {...}}]}``, Centrifugo's
  ``{"commands": [{"publish": {...}}]}``;
- ``stream``: Squall's API stream (``GET /api/connection/websocket``), one
  WebSocket, frames of 100 commands pipelined with at most ``--window``
  frames unanswered (``bench.wsproto.ApiStreamPublisher``); Squall only;
- ``client``: one client WebSocket (a token; Squall's protocol, or
  Centrifugo's for Centrifugo) publishing one command a frame, as the SDKs
  do, at most 100 × ``--window`` unanswered (``bench.wsproto.ClientPublisher``).

Peers: ``squall`` (embedded broker), ``squall_redis`` (one process on a
Redis server of its own; CPU counts Redis too), ``centrifugo`` (memory
engine, GOMAXPROCS=1) and ``centrifugo_redis`` (its Redis engine, on a Redis
server of its own, CPU counted the same way), started as ``bench.run`` starts them: the server
pinned to CPU 0, the load generator (wrk, or this process) on CPU 1, history
on in the ``bench`` namespace (100 publications, 600 s, recovery).

Per run: publications/s, server CPU µs per publication (user+sys from /proc
over the measured window), errors (non-2xx answers, answers carrying an
``"error"``, socket errors; for the stream, error replies), deliveries per
publication with subscribers, and whether the generator was the bottleneck
(its CPU over 90 % of the wall time: *client-bound*). Results:
bench/results/publish-<time>.json and publish.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import run
from bench.run import (
    API_KEY,
    PEERS,
    cpu_seconds,
    descendants,
    free_port,
    hello,
    publisher_hello,
    raise_fd_limit,
    start_peer,
    stop_peer,
    write_results,
)
from bench.wsproto import (
    OFFSET,
    ApiStreamPublisher,
    BatchPublisher,
    ClientPublisher,
    frame,
    until,
)

CHANNELS = 10_000
BATCH = 100  # publications a batch request, and commands an API stream frame
CONNECTIONS = 32  # wrk's keep-alive connections
# What each publication carries besides its channel (about 100 bytes of JSON).
DATA = '{"text":"hello from the publish bench","pad":"' + "x" * 48 + '"}'
PATHS = ("single", "batch", "stream", "client")
PUBLISH_PEERS = ("squall", "squall_redis", "centrifugo", "centrifugo_redis")


@dataclass
class PublishResult:
    peer: str
    path: str
    subscribers: int  # a channel
    seconds: float
    publications: int
    publications_per_s: float
    requests_per_s: float  # HTTP requests (single, batch) or frames (stream)
    cpu_us_per_publication: float
    errors: int
    deliveries_per_publication: float
    p50_ms: float  # a request's latency (wrk); 0 for the stream
    p99_ms: float
    client_bound: bool
    generator_cpu: float  # the generator's CPU over the wall time


# ---- wrk ---------------------------------------------------------------------

# One Lua state a wrk thread: the bodies are built once, in ``init``; each
# request takes the next. ``response`` counts answers that are not a
# success (wrk reads the bodies only when it is defined).
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["{header}"] = "{value}"
local bodies = {{}}
local i = 0
local threads = {{}}
local item = [=[{item}]=]
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  errors = 0
  for k = 0, {requests} - 1 do
    local parts = {{}}
    for j = 0, {per} - 1 do
      parts[j + 1] = string.format(item, k * {per} + j)
    end
    bodies[k + 1] = [=[{before}]=] .. table.concat(parts, ",") .. [=[{after}]=]
  end
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, "{path}", nil, bodies[i])
end
function response(status, headers, body)
  if status ~= 200 or string.find(body, '"error"', 1, true) then
    errors = errors + 1
  end
end
function done(summary, latency, requests)
  local e = 0
  for _, t in ipairs(threads) do
    e = e + t:get("errors")
  end
  io.write("BODY_ERRORS " .. e .. "\\n")
end
"""


def lua_script(peer: str, path: str) -> str:
    """The wrk script of ``path`` (single, batch) for ``peer``: channel
    bench:c<k> rotates over CHANNELS, per request or within a batch."""
    centrifugo = peer == "centrifugo"
    header, value = ("X-API-Key", API_KEY) if centrifugo else ("Authorization", f"apikey {API_KEY}")
    publish = '{"channel":"bench:c%d","data":' + DATA + "}"
    if path == "single":
        item, per, before, after, url = publish, 1, "", "", "/api/publish"
    else:
        item = ('{"publish":%s}' if centrifugo else '{"method":"publish","params":%s}') % publish
        per, before, after, url = BATCH, '{"commands":[', "]}", "/api/batch"
    return LUA.format(
        header=header,
        value=value,
        item=item,
        requests=CHANNELS // per,
        per=per,
        before=before,
        after=after,
        path=url,
    )


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if m is None:
        return 0.0
    value, unit = m.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


async def wrk(url: str, seconds: float, script: Path) -> dict[str, Any]:
    """Run wrk on CPU 1; its figures and its own CPU time."""
    pin = ["taskset", "-c", "1"] if (os.cpu_count() or 1) > 1 else []
    cmd = [*pin, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout", "10s"]
    cmd.append("--latency")
    cmd += ["-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = out_b.decode()
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk: no result: {out[-500:]} {err_b.decode()[-500:]}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    body = re.search(r"BODY_ERRORS (\d+)", out)
    if sock or bad or (body and body.group(1) != "0"):
        print(f"  wrk: {' '.join(x.group(0) for x in (sock, bad, body) if x)}", flush=True)
    return {
        "rps": float(m.group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50": _ms(m50.group(1)) if (m50 := re.search(r"(?m)^\s+50%\s+(\S+)", out)) else 0.0,
        "p99": _ms(m99.group(1)) if (m99 := re.search(r"(?m)^\s+99%\s+(\S+)", out)) else 0.0,
        # A non-2xx answer is counted by wrk and by the script: once here.
        "errors": max(int(bad.group(1)) if bad else 0, int(body.group(1)) if body else 0)
        + (sum(int(x) for x in sock.groups()) if sock else 0),
        "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


# ---- subscribers -------------------------------------------------------------


async def subscribe(peer: str, port: int, per_channel: int) -> list[Any]:
    """CHANNELS connections, connection i on channels i .. i+K-1 (mod
    CHANNELS): K subscribers a channel. Returns them once every one has
    received a warm-up publication (a batch pass over every channel, again
    every 2 s)."""
    loop = asyncio.get_running_loop()
    client = PEERS[peer].client
    ready = [0]

    def one_ready() -> None:
        ready[0] += 1

    subs: list[Any] = []
    for i in range(CHANNELS):
        chans = [f"c{(i + j) % CHANNELS}" for j in range(per_channel)]
        _, sub = await loop.create_connection(
            lambda i=i, chans=chans: client(  # type: ignore[misc]
                PEERS[peer].path,
                f"127.0.0.1:{port}",
                hello(peer, f"u{i}", chans),
                OFFSET,
                None,
                one_ready,
            ),
            "127.0.0.1",
            port,
        )
        subs.append(sub)
        if i % 500 == 499:
            await asyncio.sleep(0)
    if not await until(lambda: ready[0] >= CHANNELS, 120):
        raise RuntimeError(f"{peer}: {ready[0]} of {CHANNELS} subscribers connected")
    await warm_up(peer, port, lambda: all(s.count for s in subs))
    return subs


async def warm_up(peer: str, port: int, done: Callable[[], bool] = lambda: True) -> None:
    """One publication to every channel (batches of BATCH on one keep-alive
    connection), again every 2 s until ``done()``: every channel and its
    history exist before the measurement, so it measures steady state."""
    loop = asyncio.get_running_loop()
    header = f"X-API-Key: {API_KEY}" if peer == "centrifugo" else f"Authorization: apikey {API_KEY}"
    pub_ready = asyncio.Event()
    _, pub = await loop.create_connection(
        lambda: BatchPublisher(f"127.0.0.1:{port}", "/api/batch", header, pub_ready.set),
        "127.0.0.1",
        port,
    )
    await asyncio.wait_for(pub_ready.wait(), 10)
    one = '{"channel":"bench:c%d","data":{"w":1}}'
    wrap = '{"publish":' if peer == "centrifugo" else '{"method":"publish","params":'
    item = wrap + one + "}"
    try:
        for _ in range(30):
            for k in range(CHANNELS // BATCH):
                cmds = ",".join(item % (k * BATCH + j) for j in range(BATCH))
                pub.publish(b'{"commands":[%s]}' % cmds.encode())
            await until(lambda: pub.answered >= pub.sent, 30)
            if await until(done, 2.0):
                break
        else:
            raise RuntimeError(f"{peer}: the warm-up never reached every subscriber")
        if pub.errors or pub.answered < pub.sent:
            raise RuntimeError(f"{peer}: warm-up refused or unanswered: {pub.errors[:2]!r}")
    finally:
        if pub.transport is not None:
            pub.transport.close()


# ---- one run -----------------------------------------------------------------


async def one_run(
    peer: str, path: str, per_channel: int, seconds: float, window: int
) -> PublishResult:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env: dict[str, str] = {}
        redis = None
        # centrifugo_redis: Centrifugo with its Redis engine, the peer of
        # squall_redis (Redis's CPU counts for both).
        base = "centrifugo" if peer == "centrifugo_redis" else peer
        if peer in ("squall_redis", "centrifugo_redis"):
            from tests.services import RedisServer

            redis = RedisServer().start()
            env["SQUALL_BROKER_URL"] = redis.url
            env["CENTRIFUGO_ENGINE_TYPE"] = "redis"
            env["CENTRIFUGO_ENGINE_REDIS_ADDRESS"] = redis.url
        try:
            proc = await asyncio.to_thread(start_peer, base, port, Path(tmp), env)
            try:
                extra = [redis.proc.pid] if redis is not None and redis.proc else []
                pids = [proc.pid, *descendants(proc.pid), *extra]
                subs = await subscribe(base, port, per_channel) if per_channel else []
                if not subs:
                    await warm_up(base, port)

                def delivered() -> int:
                    return sum(s.count for s in subs)

                try:
                    if path in ("stream", "client"):
                        r = await _stream(
                            base, port, pids, seconds, window, delivered, client=path == "client"
                        )
                    else:
                        r = await _wrk(base, path, port, pids, seconds, Path(tmp), delivered)
                finally:
                    for s in subs:
                        if s.transport is not None:
                            s.transport.close()
                r.subscribers = per_channel
                r.peer = peer
                return r
            finally:
                await asyncio.to_thread(stop_peer, proc)
        finally:
            if redis is not None:
                redis.stop()


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


async def _wrk(
    peer: str,
    path: str,
    port: int,
    pids: list[int],
    seconds: float,
    tmp: Path,
    delivered: Callable[[], int],
) -> PublishResult:
    script = tmp / f"{path}.lua"
    script.write_text(lua_script(peer, path))
    url = f"http://127.0.0.1:{port}/"
    await wrk(url, 1, script)  # warm-up: every channel and its history exist
    own0 = sum(os.times()[:2])
    cpu0, t0, d0 = _cpu(pids), time.perf_counter(), delivered()
    w = await wrk(url, seconds, script)
    cpu, elapsed, d = _cpu(pids) - cpu0, time.perf_counter() - t0, delivered() - d0
    # This process reads the subscribers' deliveries meanwhile, on the same CPU.
    gen = (w["cpu"] + sum(os.times()[:2]) - own0) / seconds
    per = 1 if path == "single" else BATCH
    publications = w["requests"] * per
    return PublishResult(
        peer=peer,
        path=path,
        subscribers=0,
        seconds=round(elapsed, 3),
        publications=publications,
        publications_per_s=round(w["rps"] * per, 1),
        requests_per_s=round(w["rps"], 1),
        cpu_us_per_publication=round(cpu * 1e6 / max(publications, 1), 3),
        errors=w["errors"],
        deliveries_per_publication=round(d / max(publications, 1), 3),
        p50_ms=round(w["p50"], 3),
        p99_ms=round(w["p99"], 3),
        client_bound=gen > 0.9,
        generator_cpu=round(gen, 3),
    )


def stream_frames() -> list[bytes]:
    """CHANNELS // BATCH masked frames of BATCH publish commands, together
    one publication to every channel (ids 1 .. CHANNELS, reused each pass:
    the server does not check them for uniqueness)."""
    out = []
    for k in range(CHANNELS // BATCH):
        lines = [
            f'{{"id":{c + 1},"method":"publish","params":{{"channel":"bench:c{c}","data":{DATA}}}}}'
            for c in range(k * BATCH, (k + 1) * BATCH)
        ]
        out.append(frame("\n".join(lines).encode()))
    return out


def client_frames(peer: str) -> list[bytes]:
    """CHANNELS masked frames of one publish command each, in the client
    protocol of ``peer`` (ids from 2: 1 is the connect)."""
    out = []
    for c in range(CHANNELS):
        publish = f'{{"channel":"bench:c{c}","data":{DATA}}}'
        if peer == "centrifugo":
            line = f'{{"id":{c + 2},"publish":{publish}}}'
        else:
            line = f'{{"id":{c + 2},"method":"publish","params":{publish}}}'
        out.append(frame(line.encode()))
    return out


async def _stream(
    peer: str,
    port: int,
    pids: list[int],
    seconds: float,
    window: int,
    delivered: Callable[[], int],
    *,
    client: bool = False,
) -> PublishResult:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    host = f"127.0.0.1:{port}"
    pub: ApiStreamPublisher
    if client:
        # One client connection (a token, the bench namespace allows
        # client publishes), one publish command a frame, as SDKs send them.
        _, pub = await loop.create_connection(
            lambda: ClientPublisher(
                "/connection/websocket",
                host,
                publisher_hello(peer),
                client_frames(peer),
                window * BATCH,
                ready.set,
            ),
            "127.0.0.1",
            port,
        )
    else:
        _, pub = await loop.create_connection(
            lambda: ApiStreamPublisher(host, API_KEY, stream_frames(), BATCH, window, ready.set),
            "127.0.0.1",
            port,
        )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        pub.start()
        await asyncio.sleep(1)  # warm-up: every channel and its history exist
        own0 = sum(os.times()[:2])
        cpu0, t0, n0, d0 = _cpu(pids), time.perf_counter(), pub.answered, delivered()
        await asyncio.sleep(seconds)
        cpu, elapsed, n = _cpu(pids) - cpu0, time.perf_counter() - t0, pub.answered - n0
        d = delivered() - d0
        gen = (sum(os.times()[:2]) - own0) / elapsed
        pub.stop()
        # Every command sent gets its reply (bounded wait).
        await until(lambda: pub.answered >= pub.commands or pub.gone, 30)
        errors = pub.failed + (pub.commands - pub.answered)
        if pub.errors:
            print(f"  {peer} {'client' if client else 'stream'} errors: {pub.errors[:2]!r}")
    finally:
        if pub.transport is not None:
            pub.transport.close()
    return PublishResult(
        peer=peer,
        path="client" if client else "stream",
        subscribers=0,
        seconds=round(elapsed, 3),
        publications=n,
        publications_per_s=round(n / elapsed, 1),
        requests_per_s=round(n / (1 if client else BATCH) / elapsed, 1),
        cpu_us_per_publication=round(cpu * 1e6 / max(n, 1), 3),
        errors=errors,
        deliveries_per_publication=round(d / max(n, 1), 3),
        p50_ms=0.0,
        p99_ms=0.0,
        client_bound=gen > 0.9,
        generator_cpu=round(gen, 3),
    )


# ---- the table ---------------------------------------------------------------


def summarize(results: list[PublishResult]) -> str:
    groups: dict[tuple[int, str, str], list[PublishResult]] = {}
    for r in results:
        groups.setdefault((r.subscribers, PATHS.index(r.path), r.peer), []).append(r)  # type: ignore[arg-type]
    lines = [
        "| subscribers a channel | path | peer | publications/s (median, range) "
        "| requests/s | CPU µs/publication (median, range) | p50 ms | p99 ms "
        "| deliveries/publication | errors | client-bound |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (subs, _, peer), rs in sorted(groups.items()):
        pps = [r.publications_per_s for r in rs]
        cpus = [r.cpu_us_per_publication for r in rs]

        def med(f: str, rs: list[PublishResult] = rs) -> float:
            return float(statistics.median(getattr(r, f) for r in rs))

        lines.append(
            f"| {subs} | {rs[0].path} | {peer} "
            f"| {statistics.median(pps):,.0f} ({min(pps):,.0f}–{max(pps):,.0f}) "
            f"| {med('requests_per_s'):,.0f} "
            f"| {statistics.median(cpus):.2f} ({min(cpus):.2f}–{max(cpus):.2f}) "
            f"| {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
            f"| {med('deliveries_per_publication'):.2f} | {sum(r.errors for r in rs)} "
            f"| {sum(r.client_bound for r in rs)}/{len(rs)} |"
        )
    return "\n".join(lines) + "\n\n" + targets(results)


def targets(results: list[PublishResult]) -> str:
    """Issue 17's targets, from the medians, for each Squall peer and number
    of subscribers measured beside Centrifugo."""

    def rate(peer: str, path: str, subs: int) -> float | None:
        xs = [
            r.publications_per_s
            for r in results
            if r.peer == peer and r.path == path and r.subscribers == subs
        ]
        return statistics.median(xs) if xs else None

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [
        "| subscribers a channel | Squall peer | Centrifugo peer | target | Squall | Centrifugo "
        "| ratio | verdict |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for subs in sorted({r.subscribers for r in results}):
        for peer in ("squall", "squall_redis"):
            # Squall on Redis against Centrifugo on Redis when it ran.
            cf = "centrifugo"
            if peer == "squall_redis" and rate("centrifugo_redis", "single", subs):
                cf = "centrifugo_redis"
            cf_single = rate(cf, "single", subs)
            cf_batch = rate(cf, "batch", subs)
            single = rate(peer, "single", subs)
            batch = rate(peer, "batch", subs)
            stream = rate(peer, "stream", subs)
            rows: list[tuple[str, float | None, float | None, float]] = [
                ("single request ≥ 0.35× Centrifugo's single", single, cf_single, 0.35),
                ("batch of 100 ≥ Centrifugo's single", batch, cf_single, 1.0),
                ("batch of 100 ≥ ½ Centrifugo's batch of 100", batch, cf_batch, 0.5),
                ("API stream ≥ Centrifugo's single", stream, cf_single, 1.0),
            ]
            for name, ours, theirs, need in rows:
                if ours is None or not theirs:
                    continue
                ratio = ours / theirs
                lines.append(
                    f"| {subs} | {peer} | {cf} | {name} | {ours:,.0f}/s | {theirs:,.0f}/s "
                    f"| {ratio:.2f}× | {verdict(ratio >= need)} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=",".join(PUBLISH_PEERS))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--subscribers", default="0,2", help="subscribers a channel")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--reps-subscribed", type=int, default=0, help="repetitions with subscribers (0: --reps)"
    )
    parser.add_argument("--window", type=int, default=8, help="stream: frames unanswered")
    parser.add_argument("--name", default="publish", help="results file: bench/results/<name>.md")
    parser.add_argument(
        "--profile",
        default="",
        help="run the first Squall peer of --peers under py-spy (default: the embedded "
        "broker), once a path: flame-NAME-<path>.svg",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is missing: make bench-deps installs it (apt-get install wrk)")
    peers = args.peers.split(",")
    paths = args.paths.split(",")
    bad = [p for p in peers if p not in PUBLISH_PEERS] + [p for p in paths if p not in PATHS]
    if bad:
        parser.error(f"unknown {bad}; peers: {PUBLISH_PEERS}, paths: {PATHS}")
    if args.profile:
        # One Squall peer under py-spy (the embedded broker unless --peers
        # names squall_redis).
        peers = [next((p for p in peers if p.startswith("squall")), "squall")]
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    raise_fd_limit(CHANNELS + 5000)
    results: list[PublishResult] = []
    failures: list[str] = []
    for subs in [int(x) for x in args.subscribers.split(",")]:
        reps = args.reps_subscribed if subs and args.reps_subscribed else args.reps
        if args.profile:
            reps = 1
        for rep in range(reps):
            for path in paths:
                for peer in peers:
                    if path == "stream" and peer.startswith("centrifugo"):
                        continue  # Squall's own API stream
                    if args.profile:
                        run.PROFILE = f"{args.profile}-{path}"
                    try:
                        r = uvloop.run(one_run(peer, path, subs, args.seconds, args.window))
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        print(
                            f"{peer:14} {path:6} subs={subs} rep={rep} FAILED: {exc!r}", flush=True
                        )
                        failures.append(f"{peer}, {path}, {subs} a channel: {exc!r}")
                        continue
                    finally:
                        run.PROFILE = ""
                    print(
                        f"{peer:14} {path:6} subs={subs} rep={rep} "
                        f"{r.publications_per_s:10,.0f} pub/s "
                        f"{r.cpu_us_per_publication:8.2f} µs/pub "
                        f"errors={r.errors} deliveries/pub={r.deliveries_per_publication:.2f} "
                        f"gen={r.generator_cpu:.2f}{' CLIENT-BOUND' if r.client_bound else ''}",
                        flush=True,
                    )
                    results.append(r)
    table = summarize(results)
    if failures:
        table += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    if args.profile:
        print(table)
        print("flame graphs: " + ", ".join(f"flame-{args.profile}-{p}.svg" for p in paths))
        return
    title = f"Publishing to {CHANNELS:,} channels: single requests, batches, the API stream"
    print(write_results(args.name, title, vars(args), results, table))


if __name__ == "__main__":
    main()

"""The stock Pusher Channels JavaScript SDK (``pusher-js`` on npm, its Node
build) against Squall's Pusher endpoint ``/app/<key>`` (issue 15).

The scenarios live in ``tests/js/pusher_sdk.mjs``; each runs the SDK with its
own options and its own authorization flow (``channelAuthorization.customHandler``,
signing with the app's secret as a Pusher server SDK would), checks its
expectations step by step and exits non-zero on the first that does not
hold. This test holds a real Squall (``make_server``, one Pusher app) and
answers the script's requests over stdin/stdout JSON lines: publishing a
Pusher event through Squall's own HTTP API (the envelope of
``server/pusher.py``), a plain Squall publication, restarting the server
on the same port, and, for the encrypted channels, triggering an event with
Pusher's own Python server SDK (PyPI ``pusher``, which encrypts it with the
app's encryption master key) through Squall's Pusher HTTP API. What the SDK
saw is then checked once more here.

The app id is numeric (``1234``), as Pusher's server SDKs require.

``PusherSdkRun`` and ``restart`` also serve the Java SDK's test
(``test_sdk_pusher_java.py``); ``PusherSdkRun`` and ``server_sdk`` the
cluster's (``test_pusher_cluster.py``: two nodes behind HAProxy).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pusher
import pytest
import tornado.httpserver
import tornado.netutil

from server.app import make_app, max_body_size
from server.node import Node
from tests.conftest import Running, ServerFactory
from tests.services import ROOT, require

JS_DIR = ROOT / "tests" / "js"
SCRIPT = JS_DIR / "pusher_sdk.mjs"

APP_ID = "1234"
APP_KEY = "app-key"
APP_SECRET = "app-secret-0123456789"
# Pusher channel `x` of the app is Squall channel `pusher-1234:x`.
NAMESPACE = f"pusher-{APP_ID}"
# The app's end-to-end encryption key (32 bytes): the server SDK and the
# app's auth endpoint have it; Squall never does.
ENCRYPTION_MASTER_KEY_BASE64 = base64.b64encode(
    hashlib.sha256(b"squall pusher-js encrypted channels").digest()
).decode()
PUSHER_CONFIG: dict[str, Any] = {
    "pusher": {
        "apps": [
            {
                "id": APP_ID,
                "key": APP_KEY,
                "secret": APP_SECRET,
                "enable_client_messages": True,
            }
        ]
    }
}

SCENARIOS = [
    "public",
    "private",
    "presence",
    "presence_same_user",
    "client_events",
    "bad_signature",
    "unknown_key",
    "reconnect",
    "encrypted",
]
# A whole scenario; the reconnect one may wait out one of the SDK's 15 s
# connection timeouts while the server is down.
RUN_TIMEOUT = 60.0
RUN_TIMEOUT_RECONNECT = 90.0
# SDK_ECHO=1 (with pytest -s): every line of the program as it comes.
ECHO = os.environ.get("SDK_ECHO") == "1"


async def restart(run: Running) -> None:
    """Stop the node (its clients are told to go) and its listener, then
    start a new node with the same settings on the same port: what a client
    sees of a server restart. The fixture's teardown closes the new one."""
    run.http.stop()
    await run.node.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(run.http.close_all_connections(), 5)
    node = Node(run.settings)
    await node.start()
    sockets = tornado.netutil.bind_sockets(run.port, "127.0.0.1")
    http = tornado.httpserver.HTTPServer(make_app(node), max_body_size=max_body_size(node))
    http.add_sockets(sockets)
    run.node, run.http = node, http


@contextlib.contextmanager
def server_sdk(port: int, host: str = "127.0.0.1") -> Iterator[pusher.Pusher]:
    """Pusher's Python server SDK pointed at a Squall (or a balancer in front
    of some), with the app's encryption master key; its HTTP sessions closed
    afterwards. It is synchronous: call it with ``asyncio.to_thread``."""
    client = pusher.Pusher(
        app_id=APP_ID,
        key=APP_KEY,
        secret=APP_SECRET,
        host=host,
        port=port,
        ssl=False,
        encryption_master_key_base64=ENCRYPTION_MASTER_KEY_BASE64,
    )
    try:
        yield client
    finally:
        client._pusher_client.http.session.close()
        client._authentication_client.http.session.close()


def sdk_trigger(port: int, channel: str, event: str, data: Any) -> Any:
    """Trigger one event with the server SDK (encrypted by it on a
    ``private-encrypted-`` channel); what the HTTP API answered."""
    with server_sdk(port) as client:
        return client.trigger(channel, event, data)


def sdk_authenticate(channel: str, socket_id: str) -> dict[str, str]:
    """The server SDK's authorization of a socket for a channel, JSON-ready
    (it gives the shared secret of an encrypted channel as bytes)."""
    with server_sdk(0) as client:
        reply = client.authenticate(channel=channel, socket_id=socket_id)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in reply.items()}


async def _pump(stream: asyncio.StreamReader | None, lines: asyncio.Queue[str | None]) -> None:
    assert stream is not None
    while True:
        raw = await stream.readline()
        if not raw:
            break
        await lines.put(raw.decode(errors="replace").rstrip("\n"))
    await lines.put(None)


class PusherSdkRun:
    """One run of an SDK scenario program (pusher-js under Node, or the Java
    SDK in a JVM) against ``server``: answers its requests, keeps its
    transcript. The program prints ``{"event": ...}`` lines, and
    ``{"request": {"op": ...}, "id": N}`` lines that get one
    ``{"id": N, "result"|"error": ...}`` line back on its stdin; it ends with
    ``done`` (exit 0) or ``fail`` and a reason (exit 1)."""

    def __init__(
        self,
        server: Running,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: Path = JS_DIR,
    ) -> None:
        self.server = server
        self.cwd = cwd
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **env}
        self.transcript: list[str] = []
        self.stderr: list[str] = []
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def run(self, timeout: float) -> list[dict[str, Any]]:
        """Serve the program until it says ``done``; its events, in order."""
        self.proc = proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        errors: asyncio.Queue[str | None] = asyncio.Queue()
        pumps = [
            asyncio.ensure_future(_pump(proc.stdout, lines)),
            asyncio.ensure_future(_pump(proc.stderr, errors)),
        ]
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.fail(f"no 'done' within {timeout} s", errors)
                try:
                    line = await asyncio.wait_for(lines.get(), remaining)
                except TimeoutError:
                    continue
                if line is None:
                    code = await asyncio.wait_for(proc.wait(), 10)
                    self.fail(f"the program exited ({code}) before 'done'", errors)
                self.transcript.append(line)
                if ECHO:
                    print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # the SDK's own console output
                if not isinstance(message, dict):
                    continue
                if "request" in message:
                    await self.answer(message["id"], message["request"])
                elif message.get("event") == "fail":
                    self.fail(message.get("reason", "?"), errors)
                elif message.get("event") == "done":
                    break
                else:
                    events.append(message)
            code = await asyncio.wait_for(proc.wait(), 15)
            if code != 0:
                self.fail(f"exit status {code} after 'done'", errors)
            return events
        finally:
            if proc.returncode is None:
                proc.kill()  # our own child, by its PID
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 10)
            if proc.stdin is not None:
                proc.stdin.close()
            # The pipes end with the program: read them out, so that the
            # transport closes (cancel only what does not end in time).
            _, late = await asyncio.wait(pumps, timeout=10)
            for pump in late:
                pump.cancel()

    async def answer(self, request_id: int, request: dict[str, Any]) -> None:
        try:
            reply: dict[str, Any] = {"id": request_id, "result": await self.perform(request)}
        except Exception as exc:  # the program reports it as a failed expectation
            reply = {"id": request_id, "error": f"{type(exc).__name__}: {exc}"}
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(reply).encode() + b"\n")
        await self.proc.stdin.drain()

    async def perform(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        api = self.server.api()
        if op == "publish":
            data = request["data"]
            if not isinstance(data, str):
                data = orjson.dumps(data).decode()
            envelope = {"event": request["event"], "data": data}
            return await api.publish(f"{NAMESPACE}:{request['channel']}", envelope)
        if op == "publish_raw":
            return await api.publish(f"{NAMESPACE}:{request['channel']}", request["data"])
        if op == "restart":
            await restart(self.server)
            self.restarts += 1
            return {"restarted": True}
        if op == "trigger_encrypted":
            return await asyncio.to_thread(
                sdk_trigger, self.server.port, request["channel"], request["event"], request["data"]
            )
        if op == "authenticate":
            return sdk_authenticate(request["channel"], request["socket_id"])
        raise ValueError(f"unknown request {op!r}")

    def fail(self, why: str, errors: asyncio.Queue[str | None]) -> NoReturn:
        while not errors.empty():
            line = errors.get_nowait()
            if line is not None:
                self.stderr.append(line)
        report = "\n".join(
            [
                f"{self.name} failed: {why}",
                "--- program output ---",
                *self.transcript[-120:],
                "--- program stderr ---",
                *self.stderr[-60:],
            ]
        )
        pytest.fail(report, pytrace=False)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def node_and_sdk() -> str:
    """Node and the pusher-js package, or a loud skip (a failure under
    SQUALL_REQUIRE_SERVICES=1)."""
    node = shutil.which("node")
    require("node", node is not None, "install Node.js 20+")
    require(
        "the pusher-js npm package",
        (JS_DIR / "node_modules" / "pusher-js" / "package.json").exists(),
        "make test runs npm ci in tests/js",
    )
    assert node is not None
    return node


@pytest.fixture
def node() -> str:
    """Checked before any server starts."""
    return node_and_sdk()


async def run_scenario(node: str, server: Running, scenario: str) -> list[dict[str, Any]]:
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(server.port),
        "KEY": APP_KEY,
        "SECRET": APP_SECRET,
        "SCENARIO": scenario,
        "ENCRYPTION_MASTER_KEY_BASE64": ENCRYPTION_MASTER_KEY_BASE64,
    }
    run = PusherSdkRun(server, f"pusher-js scenario {scenario!r}", [node, str(SCRIPT)], env)
    timeout = RUN_TIMEOUT_RECONNECT if scenario == "reconnect" else RUN_TIMEOUT
    return await run.run(timeout)


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_pusher_js_sdk(node: str, make_server: ServerFactory, scenario: str) -> None:
    """The script asserts each step; here what it saw is checked once more
    at the level a user would notice."""
    server = await make_server(PUSHER_CONFIG)
    events = await run_scenario(node, server, scenario)
    assert named(events, "start")[0]["sdk"].startswith("pusher-js 8.")
    if scenario == "public":
        data = [e["data"] for e in named(events, "alice.my-channel.my-event")]
        assert data == [{"n": 1}]
        assert [e["data"] for e in named(events, "alice.my-channel.message")] == [
            {"hello": "squall"}
        ]
        assert len(named(events, "alice.other-channel.sentinel")) == 1
    elif scenario == "private":
        assert [e["data"] for e in named(events, "alice.private-room.secret-event")] == [{"s": 1}]
        assert len(named(events, "alice.authorize")) == 1
    elif scenario == "presence":
        ch = "presence-room"
        [bob_view] = [e["data"] for e in named(events, f"bob.{ch}.pusher:subscription_succeeded")]
        assert bob_view["count"] == 2
        assert sorted(bob_view["members"]) == ["alice", "bob"]
        assert [e["data"]["id"] for e in named(events, f"alice.{ch}.pusher:member_added")] == [
            "bob"
        ]
        assert [e["data"]["id"] for e in named(events, f"alice.{ch}.pusher:member_removed")] == [
            "bob"
        ]
    elif scenario == "presence_same_user":
        ch = "presence-lobby"
        assert len(named(events, f"alice.{ch}.pusher:member_added")) == 1
        assert len(named(events, f"alice.{ch}.pusher:member_removed")) == 1
    elif scenario == "client_events":
        assert [e["data"] for e in named(events, "bob.private-chat.client-typing")] == [
            {"who": "alice"}
        ]
        assert [e["data"] for e in named(events, "alice.private-chat.client-typing")] == [
            {"who": "bob"}
        ]
        assert named(events, "alice.presence-chat.client-moved") == []
    elif scenario == "bad_signature":
        [refusals] = [e["refusals"] for e in named(events, "refusals")]
        assert [r["channel"] for r in refusals] == ["private-forged", "presence-forged"]
        for refusal in refusals:
            assert refusal["subscription_error"] or refusal["pusher_error"], refusal
        assert named(events, "alice.private-forged.pusher:subscription_succeeded") == []
        assert named(events, "alice.presence-forged.pusher:subscription_succeeded") == []
    elif scenario == "unknown_key":
        assert named(events, "codes")[0]["codes"][0] == 4001
        connecting = [e for e in named(events, "eve.state") if e["current"] == "connecting"]
        assert len(connecting) == 1
    elif scenario == "encrypted":
        ch = "private-encrypted-vault"
        payload = {"msg": "top secret", "n": 1, "text": "h\u00e9llo \u2713"}
        assert [e["data"] for e in named(events, f"alice.{ch}.secret")] == [payload]
        assert [e["data"] for e in named(events, f"bob.{ch}.secret")] == [payload]
        assert [e["data"] for e in named(events, f"bob.{ch}.note")] == ["plain words, not JSON"]
        # What travelled was the server SDK's ciphertext, which Squall cannot read.
        [wire] = [e["data"] for e in named(events, "wire")]
        assert sorted(wire) == ["ciphertext", "nonce"]
        assert "top secret" not in json.dumps(wire)
        [refusal] = [e["error"] for e in named(events, "server_refusal")]
        assert refusal["type"] == "PusherError", refusal
        assert "encrypted" in refusal["data"]["message"], refusal
        assert named(events, f"bob.{ch}.client-leak") == []
    else:
        assert named(events, "server.restarted")[0]["restarted"] is True
        news = [e["data"]["n"] for e in named(events, "alice.news.headline")]
        assert news == [1, 2]
        assert [e["data"] for e in named(events, "alice.private-news.headline")] == [{"n": 2}]
        succeeded = named(events, "alice.private-news.pusher:subscription_succeeded")
        assert len(succeeded) == 2

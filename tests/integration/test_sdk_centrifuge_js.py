"""The stock Centrifugo JavaScript SDK (``centrifuge`` on npm, under Node,
JSON and Protobuf) against Squall's Centrifugo-protocol endpoint and, as the
reference, against Centrifugo itself: the same scenario must pass on both.

The scenarios live in ``tests/js/centrifuge_sdk.mjs``; this test holds the
server and the token secret and answers the script's requests (tokens,
publishing over the HTTP API, restarting the server) over stdin/stdout JSON
lines. The ``cent_server`` fixture (tests/integration/conftest.py) runs each
case on both servers; ``-k squall`` or ``-k centrifugo`` picks one.

The recovery scenario restarts the server between going offline and coming
back only on Squall: Centrifugo's memory engine loses history on a restart
(Squall's ``durable`` namespace is in its durable log), so on Centrifugo the
client only misses 5 publications while offline.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from typing import IO, Any, NoReturn

import jwt
import pytest

from tests.centrifuge_servers import CentServer
from tests.services import ROOT, require

JS_DIR = ROOT / "tests" / "js"
SCRIPT = JS_DIR / "centrifuge_sdk.mjs"
SCENARIOS = ["session", "recovery", "private", "invalid_token"]
# A whole scenario, restart included; the session one waits out two token refreshes.
RUN_TIMEOUT = 90.0


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\n"))
    lines.put(None)


class SdkRun:
    """One run of the scenario script; answers its requests, keeps its transcript."""

    def __init__(self, server: CentServer, protocol: str, scenario: str) -> None:
        node = shutil.which("node")
        require("node", node is not None, "install Node.js 20+")
        require(
            "the centrifuge npm package",
            (JS_DIR / "node_modules" / "centrifuge").exists(),
            "make test runs npm ci in tests/js",
        )
        assert node is not None
        self.server = server
        self.transcript: list[str] = []
        env = {**os.environ, "URL": server.ws_url, "PROTOCOL": protocol, "SCENARIO": scenario}
        self.proc = subprocess.Popen(
            [node, str(SCRIPT)],
            cwd=JS_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.lines: queue.Queue[str | None] = queue.Queue()
        errors: queue.Queue[str | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=_pump, args=(self.proc.stderr, errors), daemon=True),
        ]
        self.errors = errors
        for thread in self.threads:
            thread.start()

    def run(self, timeout: float = RUN_TIMEOUT) -> list[dict[str, Any]]:
        """Serve the script until it says ``done``; its events, in order."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.fail(f"no 'done' within {timeout} s")
                try:
                    line = self.lines.get(timeout=remaining)
                except queue.Empty:
                    continue
                if line is None:
                    self.fail(f"the script exited ({self.proc.wait(timeout=10)}) before 'done'")
                self.transcript.append(line)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # the SDK's own console output (SDK_DEBUG=1)
                if "request" in message:
                    self.answer(message["id"], message["request"])
                elif message.get("event") == "fail":
                    self.fail(message.get("reason", "?"))
                elif message.get("event") == "done":
                    break
                else:
                    events.append(message)
            assert self.proc.wait(timeout=10) == 0, self.report("exit status")
            return events
        finally:
            self.close()

    def answer(self, request_id: int, request: dict[str, Any]) -> None:
        try:
            reply: dict[str, Any] = {"id": request_id, "result": self.perform(request)}
        except Exception as exc:  # the script reports it as a failed expectation
            reply = {"id": request_id, "error": f"{type(exc).__name__}: {exc}"}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(reply).encode() + b"\n")
        self.proc.stdin.flush()

    def perform(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        server = self.server
        if op == "token":
            token = server.token(request["user"], ttl=request["ttl"])
            return {"token": token, "exp": _exp(token)}
        if op == "bad_token":
            now = int(time.time())
            claims = {"sub": request["user"], "iat": now, "exp": now + 3600}
            return {"token": jwt.encode(claims, "not-the-server-secret-0123456789abc", "HS256")}
        if op == "sub_token":
            token = server.sub_token(request["user"], request["channel"], ttl=request["ttl"])
            return {"token": token, "exp": _exp(token)}
        if op == "publish":
            return server.publish(request["channel"], request["data"])
        if op == "restart":
            # Only where history survives it (see the module docstring).
            if server.durable:
                server.restart()
            return {"restarted": server.durable}
        raise ValueError(f"unknown request {op!r}")

    def fail(self, why: str) -> NoReturn:
        pytest.fail(self.report(why), pytrace=False)

    def report(self, why: str) -> str:
        self.close()
        stderr = []
        while not self.errors.empty():
            line = self.errors.get()
            if line is not None:
                stderr.append(line)
        return "\n".join(
            [
                f"SDK scenario failed on {self.server.name}: {why}",
                "--- script output ---",
                *self.transcript[-80:],
                "--- script stderr ---",
                *stderr[-40:],
                "--- server log (tail) ---",
                self.server.log()[-3000:],
            ]
        )

    def close(self) -> None:
        """Kill the script (by its PID) if it still runs; release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for thread in self.threads:
            thread.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


@pytest.mark.parametrize("protocol", ["json", "protobuf"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_centrifuge_js_sdk(cent_server: CentServer, protocol: str, scenario: str) -> None:
    """The script asserts the scenario step by step and exits non-zero on the
    first failed expectation; here, what it saw is checked once more at the
    level a user would notice."""
    events = SdkRun(cent_server, protocol, scenario).run()
    if scenario == "session":
        assert len(_named(events, "getToken")) == 3
        assert _named(events, "alice.disconnected")[-1]["ctx"] == {
            "code": 0,
            "reason": "disconnect called",
        }
        assert len(_named(events, "alice.connected")) == 1
    elif scenario == "recovery":
        subscribed = _named(events, "carol.sub.subscribed")
        assert [(s["ctx"]["wasRecovering"], s["ctx"]["recovered"]) for s in subscribed] == [
            (False, False),
            (True, True),
        ]
        data = [p["ctx"]["data"]["n"] for p in _named(events, "carol.sub.publication")]
        assert data == [0, 1, 2, 3, 4, 5, "sentinel"]
        assert _named(events, "server.restarted")[0]["restarted"] is cent_server.durable
    elif scenario == "private":
        assert len(_named(events, "dave.sub.subscribed")) == 1
        assert [u["ctx"] for u in _named(events, "dave.bare.unsubscribed")] == [
            {"channel": "secret:x", "code": 103, "reason": "permission denied"}
        ]
    else:
        assert [d["ctx"] for d in _named(events, "eve.disconnected")] == [
            {"code": 3500, "reason": "invalid token"}
        ]
        assert len(_named(events, "eve.connecting")) == 1

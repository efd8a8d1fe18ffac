"""The real Java/Android SDK, centrifuge-java (Protobuf protocol), against
Squall's Centrifugo-protocol endpoint and, as the reference, against
Centrifugo v6 itself, on the same setup (tests/centrifuge_servers.py).

The SDK runs in a JVM (tests/java/centrifuge, built once into the cache by
scripts/build-java-sdk-tests.sh) and speaks JSON lines with this harness: it
prints what the SDK reports, and when it needs the harness (a connection
token; publications made while it is offline) it prints a request line and
waits for the reply line. It checks its own expectations and ends with
``done`` or ``fail`` and a reason; every wait on either side has a deadline.

The scenario: connect with a token; subscribe to ``durable:log``; publish
from the SDK and receive it; presence (in ``chat:java``: ``durable`` has no
presence) lists the client; disconnect; the harness publishes 5 over HTTP;
connect again: the subscription says it was recovering and recovered, and
exactly the 5 missed publications arrive, in order, before the next live
one; history holds them all; the connection then stays up across server
pings. On Squall the server is also restarted while the client is away
(``durable`` is in its durable log); on Centrifugo it is not, because its
memory engine loses history on a restart.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from tests.centrifuge_servers import PING_INTERVAL, CentServer
from tests.services import java_scenario_jar, require, stop_process

MAIN_CLASS = "squall.centrifuge.Scenario"
CHANNEL = "durable:log"
PRESENCE_CHANNEL = "chat:java"
USER = "java-user"
OFFLINE = 5
# The JVM's own deadline for the whole scenario, and ours a little longer.
DEADLINE = 100.0
# The longest the harness waits for any one line (a step inside is 15 s).
LINE_TIMEOUT = 40.0


def scenario_jar() -> Path:
    return java_scenario_jar("centrifuge")


class Scenario:
    """The JVM running the scenario, and the lines it printed."""

    def __init__(self, java: str, jar: Path, server: CentServer, log: Path) -> None:
        self.server = server
        self.log_path = log
        self.transcript: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._log: BinaryIO = log.open("wb")
        self.proc = subprocess.Popen(
            [java, "-Xmx256m", "-XX:+UseSerialGC", "-cp", str(jar), MAIN_CLASS,
             "--url", server.ws_url, "--user", USER,
             "--channel", CHANNEL, "--presence-channel", PRESENCE_CHANNEL,
             "--offline", str(OFFLINE), "--ping-interval", str(PING_INTERVAL),
             "--deadline", str(DEADLINE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the test is ending
        self.lines.put(None)

    def next(self, deadline: float) -> dict[str, Any]:
        """The next JSON line, or a failure at the deadline or on exit."""
        timeout = min(LINE_TIMEOUT, deadline - time.monotonic())
        try:
            line = self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            self.fail(f"no line from the SDK scenario for {timeout:.0f} s")
        if line is None:
            self.proc.wait(timeout=10)
            self.fail(f"the SDK scenario exited with code {self.proc.returncode} before done")
        self.transcript.append(line)
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            self.fail(f"the SDK scenario printed a line that is not JSON: {line!r}")
        return message

    def reply(self, answer: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(answer).encode() + b"\n")
        self.proc.stdin.flush()

    def fail(self, reason: str) -> None:
        self._log.flush()
        pytest.fail(
            f"{reason}\n--- SDK scenario transcript ---\n" + "\n".join(self.transcript)
            + f"\n--- JVM stderr ---\n{self.log_path.read_text(errors='replace')[-4000:]}"
            + f"\n--- {self.server.name} log ---\n{self.server.log()[-4000:]}"
        )  # fmt: skip

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop_process(self.proc, timeout=5)
        self._reader.join(timeout=5)
        self._log.close()


@pytest.fixture
def java_scenario() -> tuple[str, Path]:
    """The java binary and the built scenario, checked before any server starts."""
    java = shutil.which("java")
    jar = scenario_jar()
    require(
        "the centrifuge-java SDK scenario (Java 17 + Maven)",
        java is not None and jar.exists(),
        "make test builds it with Maven: scripts/build-java-sdk-tests.sh",
    )
    assert java is not None
    return java, jar


def publish_offline(server: CentServer, channel: str, count: int) -> dict[str, Any]:
    """Publish ``count`` over the HTTP API while the SDK is away; on a server
    with a durable log (Squall) restart it too."""
    published = []
    for seq in range(1, count + 1):
        data = {"seq": seq, "text": f"missed {seq}"}
        answer = server.publish(channel, data)
        published.append({"data": data, "offset": answer["result"]["offset"]})
    if server.durable:
        server.restart()
    return {"publications": published, "restarted": server.durable}


def test_java_sdk_connects_publishes_and_recovers(
    java_scenario: tuple[str, Path], cent_server: CentServer, tmp_path: Path
) -> None:
    server = cent_server
    scenario = Scenario(*java_scenario, server, tmp_path / "jvm.log")
    deadline = time.monotonic() + DEADLINE + 20
    recovered: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    step = ""
    try:
        while True:
            message = scenario.next(deadline)
            request = message.get("request")
            if request == "token":
                scenario.reply({"token": server.token(message["user"])})
            elif request == "publish_offline":
                try:
                    answer = publish_offline(server, message["channel"], message["count"])
                except Exception as error:
                    scenario.reply({"error": repr(error)})
                    raise
                sent = answer["publications"]
                scenario.reply(answer)
            elif request is not None:
                scenario.fail(f"unknown request {request!r}")
            event = message.get("event")
            if event == "step":
                step = message["name"]
            elif event == "publication" and step == "recover":
                recovered.append(message)
            elif event == "fail":
                scenario.fail(f"the SDK scenario failed: {message['reason']}")
            elif event == "done":
                break
        scenario.proc.wait(timeout=15)
        if scenario.proc.returncode != 0:
            scenario.fail(f"the SDK scenario exited with code {scenario.proc.returncode}")
        # What the user saw after coming back: the missed ones in order, then
        # the next live one, nothing twice.
        assert [json.loads(p["data"]) for p in recovered[:OFFLINE]] == [s["data"] for s in sent]
        assert [p["offset"] for p in recovered[:OFFLINE]] == [s["offset"] for s in sent]
        assert [json.loads(p["data"]) for p in recovered[OFFLINE:]] == [
            {"from": "java", "n": "after"}
        ]
    finally:
        scenario.close()

"""The real Java/Android Pusher SDK, pusher-websocket-java
(``com.pusher:pusher-java-client`` from Maven Central), on the JVM against
Squall's Pusher endpoint ``/app/<key>`` (issue 15).

The SDK runs in a JVM (tests/java/pusher, built once into the cache by
scripts/build-java-sdk-tests.sh) and speaks the same JSON lines as the
pusher-js scenarios (``PusherSdkRun`` in test_sdk_pusher_js.py): it prints
what the SDK reports, asks this harness to publish events (Squall's HTTP API,
the Pusher envelope), checks its own expectations and ends with ``done`` or
``fail`` and a reason; every wait on either side has a deadline.

The scenario: connect; a public channel and an event; a private channel
authorized by the SDK's ``ChannelAuthorizer`` (signing locally with the app's
secret) and an event; a presence channel: its member list, a second user's
client added (``userSubscribed``), that client's client event reaching the
first with its user id and not echoed back, an event to both, and the second
user removed (``userUnsubscribed``) when it disconnects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory
from tests.integration.test_sdk_pusher_js import (
    APP_KEY,
    APP_SECRET,
    PUSHER_CONFIG,
    PusherSdkRun,
    named,
)
from tests.services import ROOT, java_scenario_jar, require

JAVA_SOURCES = ROOT / "tests" / "java" / "pusher"
MAIN_CLASS = "squall.pusher.Scenario"
# The JVM's own deadline for the whole scenario, and ours a little longer.
DEADLINE = 90


def scenario_jar() -> Path:
    return java_scenario_jar("pusher")


@pytest.fixture
def java_scenario() -> tuple[str, Path]:
    """The java binary and the built scenario, checked before any server starts."""
    java = shutil.which("java")
    jar = scenario_jar()
    require(
        "the pusher-java-client SDK scenario (Java 17 + Maven)",
        java is not None and jar.exists(),
        "make test builds it with Maven: scripts/build-java-sdk-tests.sh",
    )
    assert java is not None
    return java, jar


def _data(event: dict[str, Any]) -> Any:
    return json.loads(event["data"])


async def test_pusher_java_sdk_public_private_presence(
    java_scenario: tuple[str, Path], make_server: ServerFactory
) -> None:
    java, jar = java_scenario
    server = await make_server(PUSHER_CONFIG)
    argv = [
        java, "-Xmx256m", "-XX:+UseSerialGC", "-cp", str(jar), MAIN_CLASS,
        "--host", "127.0.0.1", "--port", str(server.port),
        "--key", APP_KEY, "--secret", APP_SECRET, "--deadline", str(DEADLINE),
    ]  # fmt: skip
    run = PusherSdkRun(server, "pusher-java-client scenario", argv, {}, cwd=JAVA_SOURCES)
    events = await run.run(DEADLINE + 20)

    assert named(events, "start")[0]["sdk"].startswith("pusher-java-client 2.")
    assert [s["name"] for s in named(events, "step")] == [
        "public",
        "private",
        "presence",
        "member_removed",
    ]
    received = named(events, "java.event")
    by_name = {(e["channel"], e["name"]): e for e in received}
    assert _data(by_name["java-public", "my-event"]) == {"n": 1}
    assert _data(by_name["private-java", "secret-event"]) == {"s": 1}
    moved = by_name["presence-java", "client-moved"]
    assert (_data(moved), moved["user_id"]) == ({"x": 1}, "java-peer")
    assert [e["id"] for e in named(events, "java.member_added")] == ["java-peer"]
    assert [e["id"] for e in named(events, "java.member_removed")] == ["java-peer"]
    assert [e for e in named(events, "peer.event") if e["name"] == "client-moved"] == []
    socket_id = named(events, "connected")[0]["socket_id"]
    authorized = [(e["channel"], e["socket_id"]) for e in named(events, "java.authorize")]
    assert authorized == [("private-java", socket_id), ("presence-java", socket_id)]

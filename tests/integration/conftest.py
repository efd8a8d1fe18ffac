"""Fixtures for the Centrifugo-protocol tests: Squall and the reference
server (Centrifugo v6) as processes on one setup (tests/centrifuge_servers.py).
Each is started for one test and stopped by its PID afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.centrifuge_servers import SERVERS, CentrifugoServer, CentServer, SquallServer

S = TypeVar("S", bound=CentServer)


def _running(server: S) -> Iterator[S]:
    """Start ``server``, hand it out, stop it (even when starting failed)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def centrifugo() -> Iterator[CentrifugoServer]:
    """Centrifugo v6.9.1, started (skips loudly when it is not built)."""
    yield from _running(CentrifugoServer())


@pytest.fixture
def squall_cent() -> Iterator[SquallServer]:
    """A Squall process with the Centrifugo-compatible setup, started."""
    yield from _running(SquallServer())


@pytest.fixture(params=["squall", "centrifugo"])
def cent_server(request: pytest.FixtureRequest) -> Iterator[CentServer]:
    """Either server, started: a scenario using it runs on both."""
    yield from _running(SERVERS[request.param]())

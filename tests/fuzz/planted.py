"""A bug planted in the HTTP API for the harness's own tests: ``install``
makes the ``channels`` API method raise. The atheris child calls it
(``FUZZ_ATHERIS_SETUP=tests.fuzz.planted:install``); the test patches the
parent, which replays the crash, with ``broken`` itself."""

from __future__ import annotations

from typing import Any

from handlers.api import ApiMethods


async def broken(self: ApiMethods, body: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("planted")


def install() -> None:
    ApiMethods.channels = broken  # type: ignore[method-assign]

"""Background steps that must not be lost: each runs as a task that is kept
(so it is not garbage-collected mid-way), logged if it fails, and cancelled
on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any


class BackgroundTasks:
    __slots__ = ("_log", "_tasks", "_what")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()
        self._log = log
        self._what = what

    def spawn(self, step: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(step)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s failed", self._what, exc_info=task.exception())

    async def cancel_all(self, timeout: float = 5.0) -> None:
        """Cancel every step and wait for them, at most ``timeout`` seconds:
        a client library stuck in a connect that ignores cancellation must
        not hold up shutdown."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            self._log.warning("%s did not stop within %.0fs: %r", self._what, timeout, task)
        for task in tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()

"""Pusher webhooks: what happened on an app's channels, POSTed to the URLs
the app configures (``[[pusher.apps.webhooks]]``; ``docs/pusher.md``).

Events: ``channel_occupied`` / ``channel_vacated`` (the channel's first
subscriber came / its last left, across the cluster), ``member_added`` /
``member_removed`` (a presence channel's user: first connection in, last
out) and ``client_event``. Each is raised once per cluster, by the node
where it happened (Redis says atomically who made a channel occupied or
vacated), so a cluster of N nodes does not send it N times.

A URL gets ``{"time_ms": ..., "events": [...]}`` with ``X-Pusher-Key`` and
``X-Pusher-Signature`` (hex HMAC-SHA256 of the body with the app's secret),
events gathered for ``pusher.webhook_batch_delay`` seconds (at most
``MAX_BATCH`` a request), in order, one request in flight per URL. A failed
request (no answer, not 2xx) is retried ``pusher.webhook_retries`` times,
``pusher.webhook_retry_delay`` seconds apart, doubling; then its events are
dropped with a warning. Raising an event is an append: it never waits, so
it never holds up a publication; past ``MAX_PENDING`` waiting events a URL
drops its oldest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import orjson
import tornado.httpclient

from server.config import PusherApp, PusherSettings, PusherWebhook
from server.pusher import sign

log = logging.getLogger("squall.pusher.webhooks")

MAX_BATCH = 100
MAX_PENDING = 10_000
TIMEOUT = 10.0


class _Target:
    """One webhook URL of one app: its queue and its one sender task."""

    __slots__ = ("_pending", "_sender", "_task", "app", "events", "url")

    def __init__(self, sender: WebhookSender, app: PusherApp, hook: PusherWebhook) -> None:
        self._sender = sender
        self.app = app
        self.url = hook.url
        self.events = frozenset(hook.events)
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, event: dict[str, Any]) -> None:
        if self.events and event["name"] not in self.events:
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self._sender.dropped += 1
        self._pending.append(event)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(self._sender.batch_delay)  # gather a batch
                count = min(len(self._pending), MAX_BATCH)
                batch = [self._pending.popleft() for _ in range(count)]
                await self._deliver(batch)
        finally:
            self._task = None

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        sender = self._sender
        body = orjson.dumps({"time_ms": int(time.time() * 1000), "events": batch})
        headers = {
            "Content-Type": "application/json",
            "X-Pusher-Key": self.app.key,
            "X-Pusher-Signature": sign(self.app.secret, body.decode()),
        }
        delay = sender.retry_delay
        why = ""
        for attempt in range(sender.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                response = await sender.http.fetch(
                    self.url,
                    method="POST",
                    body=body,
                    headers=headers,
                    raise_error=False,
                    connect_timeout=TIMEOUT,
                    request_timeout=TIMEOUT,
                )
            except Exception as exc:  # no answer at all: retried like a 5xx
                why = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= response.code < 300:
                sender.sent += len(batch)
                return
            why = f"HTTP {response.code}"
        sender.dropped += len(batch)
        log.warning(
            "pusher app %s: webhook %s failed %d times (%s): %d events dropped",
            self.app.id,
            self.url,
            sender.retries + 1,
            why,
            len(batch),
        )

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class WebhookSender:
    """The webhooks of every Pusher app of this process, by namespace."""

    def __init__(self, settings: PusherSettings) -> None:
        self.batch_delay = settings.webhook_batch_delay
        self.retries = settings.webhook_retries
        self.retry_delay = settings.webhook_retry_delay
        self.sent = 0
        self.dropped = 0
        self.http = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        self._targets: dict[str, list[_Target]] = {}
        for app in settings.apps:
            targets = [_Target(self, app, hook) for hook in app.webhooks]
            if targets:
                self._targets[app.namespace] = targets

    def __bool__(self) -> bool:
        return bool(self._targets)

    def wants(self, namespace: str) -> bool:
        return namespace in self._targets

    def raise_event(self, namespace: str, event: dict[str, Any]) -> None:
        """Queue ``event`` for the webhooks of the app owning ``namespace``."""
        for target in self._targets.get(namespace, ()):
            target.add(event)

    async def close(self) -> None:
        for targets in self._targets.values():
            for target in targets:
                target.cancel()
        self.http.close()

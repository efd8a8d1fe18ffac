"""The campaign's clients: subscribers on Squall's own Python client
(server/client.py), publishers over the HTTP API and over WebSocket, each
recording what it did and saw into the run's ``History``.

``RecordingClient`` changes nothing in how the client behaves (reconnect,
backoff, recovery, its duplicate guard): it only observes, by wrapping the
points where the library connects, loses its connection, answers a
(re)subscribe and hands out a publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import tornado.httpclient
import tornado.websocket

from server.client import (
    ApiClient,
    ApiError,
    Client,
    ConnectionClosed,
    ReplyError,
    Subscription,
    SubscriptionEnded,
)

from .history import History


class RecordingClient(Client):
    def __init__(self, url: str, *, sid: str, history: History, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.sid = sid
        self.recorder = history
        self.drainers: list[asyncio.Task[None]] = []

    async def _open(self) -> dict[str, Any]:
        result = await super()._open()
        self.recorder.record("cn", s=self.sid, node=self.node, n=self.connects)
        return result

    def _fail_waiters(self, error: BaseException) -> None:
        # Called by the reader when the connection ends, and by close().
        if not self._closing:
            self.recorder.record("dc", s=self.sid, code=self.close_code, reason=self.close_reason)
        super()._fail_waiters(error)

    def _finish(self, error: BaseException) -> None:
        if not self._closing:
            self.recorder.record("cl", s=self.sid, err=repr(error)[:200])
        super()._finish(error)

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_result: Callable[[Any], Awaitable[None]] | None = None,
    ) -> Any:
        if method != "subscribe" or on_result is None or params is None:
            return await super().call(method, params, on_result=on_result)
        requested = self.recorder.now()
        hook = on_result

        async def recording_hook(result: dict[str, Any]) -> None:
            # Recorded before the replayed publications are delivered.
            self.recorder.record(
                "sr",
                s=self.sid,
                c=params["channel"],
                rc=bool(params.get("recover")),
                fo=params.get("offset"),
                fe=params.get("epoch"),
                rd=result.get("recovered"),
                o=result.get("offset"),
                e=result.get("epoch"),
                n=len(result.get("publications", [])),
                tq=requested,
            )
            await hook(result)

        return await super().call(method, params, on_result=recording_hook)

    async def _subscribe(self, sub: Subscription, *, recover: bool) -> None:
        try:
            await super()._subscribe(sub, recover=recover)
        except BaseException as exc:
            self.recorder.record("sf", s=self.sid, c=sub.channel, rc=recover, err=repr(exc)[:200])
            raise

    async def _deliver(self, sub: Subscription, pub: dict[str, Any]) -> None:
        accepted = not (sub.epoch == pub["epoch"] and pub["offset"] <= sub.offset)
        data = pub.get("data")
        pub_id = data.get("id") if isinstance(data, dict) else None
        self.recorder.record(
            "dl",
            s=self.sid,
            c=sub.channel,
            o=pub["offset"],
            e=pub["epoch"],
            i=pub_id,
            a=1 if accepted else 0,
        )
        await super()._deliver(sub, pub)

    def start_draining(self, sub: Subscription) -> None:
        """The application: read every publication handed out."""

        async def drain() -> None:
            try:
                async for _ in sub:
                    pass
            except SubscriptionEnded as exc:
                # The server refused the subscription for good: the
                # application is told (here: it is recorded) and stops.
                self.recorder.record("sf", s=self.sid, c=sub.channel, rc=True, err=repr(exc)[:200])

        self.drainers.append(asyncio.get_running_loop().create_task(drain()))

    async def shutdown(self) -> None:
        await self.close()
        for task in self.drainers:
            task.cancel()
        for task in self.drainers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def start_subscriber(
    url: str,
    token: str,
    sid: str,
    channels: list[str],
    history: History,
    *,
    attempts: int = 20,
) -> RecordingClient:
    """Connect and subscribe (retrying the first connect, which faults do not
    disturb: they start once every subscriber is in)."""
    client = RecordingClient(
        url,
        sid=sid,
        history=history,
        token=token,
        min_backoff=0.1,
        max_backoff=3.0,
        command_timeout=10.0,
        max_reconnects=10_000,
    )
    for attempt in range(attempts):
        try:
            await client.connect()
            break
        except (OSError, ConnectionClosed, TimeoutError, tornado.httpclient.HTTPClientError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    for channel in channels:
        sub = await client.subscribe(channel)
        client.start_draining(sub)
    return client


class Publisher:
    """Publishes ``{"id": ..., "n": ...}`` to random channels at a steady rate,
    recording each attempt and its outcome. ``via`` is "http" (the server
    API through HAProxy) or "ws" (a client's publish command)."""

    def __init__(
        self,
        name: str,
        via: str,
        history: History,
        channels: list[str],
        rate: float,
        rng: random.Random,
        *,
        api_url: str,
        api_key: str,
        ws_url: str,
        token: str,
        timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.via = via
        self.recorder = history
        self.channels = channels
        self.interval = 1.0 / rate
        self.rng = rng
        self.api = ApiClient(api_url, api_key, timeout=timeout)
        self.ws_url = ws_url
        self.token = token
        self.timeout = timeout
        self.client: Client | None = None
        self.sent = 0

    async def _ws(self) -> Client:
        if self.client is not None and self.client._failed is None:
            return self.client
        if self.client is not None:
            await self.client.close()
        self.client = Client(
            self.ws_url,
            token=self.token,
            min_backoff=0.1,
            max_backoff=2.0,
            command_timeout=self.timeout,
            max_reconnects=10_000,
        )
        await self.client.connect()
        return self.client

    async def publish_one(self) -> None:
        channel = self.rng.choice(self.channels)
        pub_id = f"{self.name}-{self.sent}"
        data = {"id": pub_id, "n": self.sent}
        self.sent += 1
        self.recorder.record("pa", p=self.name, i=pub_id, c=channel, via=self.via)
        try:
            if self.via == "http":
                result = await self.api.publish(channel, data)
            else:
                client = await self._ws()
                result = await client.publish(channel, data)
        except ApiError as exc:
            # 599: no answer (timeout, connection lost): it may have happened.
            # 502/504 from HAProxy: the node may have got it. Otherwise the
            # server answered with an error: it did not happen.
            # A 503 whose message says the commands "may have run" (Redis's
            # connection broke after the publish was sent), or that too few
            # replicas acknowledged it, is an unknown outcome too.
            if exc.status in (599, 502, 504) or _maybe_made(str(exc)):
                self.recorder.record("pu", i=pub_id, err=str(exc)[:200])
            else:
                self.recorder.record("pf", i=pub_id, err=str(exc)[:200])
            return
        except ReplyError as exc:
            kind = "pu" if _maybe_made(str(exc)) else "pf"
            self.recorder.record(kind, i=pub_id, err=str(exc)[:200])
            return
        except tornado.websocket.WebSocketClosedError as exc:
            # Client.call found the socket closed before sending: not sent.
            # (The library lets this out instead of its ConnectionClosed.)
            self.recorder.record("pf", i=pub_id, err=f"not sent: {exc!r}"[:200])
            return
        except (
            ConnectionClosed,
            TimeoutError,
            OSError,
            orjson.JSONDecodeError,  # an HTML error page from HAProxy
            tornado.httpclient.HTTPClientError,
        ) as exc:
            self.recorder.record("pu", i=pub_id, err=repr(exc)[:200])
            return
        except Exception as exc:  # anything else: recorded, the campaign goes on
            self.recorder.record("pu", i=pub_id, err=f"unexpected: {exc!r}"[:200])
            return
        self.recorder.record("pk", i=pub_id, o=result["offset"], e=result["epoch"])

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            await self.publish_one()
            next_at = max(next_at + self.interval, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _maybe_made(message: str) -> bool:
    """An error answer that says the publication may exist (docs/api.md)."""
    return any(words in message for words in ("may have run", "may still be", "in the durable log"))

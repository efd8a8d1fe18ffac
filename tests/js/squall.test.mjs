// Unit tests of static/squall.js under Node's test runner, with a fake
// WebSocket that plays the server's part of docs/protocol.md.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Squall, backoff, encodePositions, shouldReconnect } from "../../static/squall.js";

class FakeSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.instances.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.serverClose(code, reason);
  }
  // Server side:
  push(...messages) {
    this.onmessage?.({ data: messages.map((m) => JSON.stringify(m)).join("\n") });
  }
  reply(method, result, extra = []) {
    const cmd = this.sent.find((c) => c.method === method && !c.answered);
    cmd.answered = true;
    this.push({ id: cmd.id, result }, ...extra);
    return cmd;
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const pub = (offset, data, epoch = "e1") => ({ offset, epoch, data, time: 0 });

function client(extra = {}) {
  FakeSocket.instances = [];
  return new Squall("ws://x/connection/websocket", {
    token: "t",
    WebSocket: FakeSocket,
    minReconnectDelay: 1,
    maxReconnectDelay: 5,
    ...extra,
  });
}

test("close codes: 3000-3499 and network failures reconnect, others stop", () => {
  for (const code of [3001, 3008, 3499, 1006, undefined]) assert.ok(shouldReconnect(code), code);
  for (const code of [3500, 3503, 1000, 1009, 4000]) assert.ok(!shouldReconnect(code), code);
});

test("backoff grows exponentially, is capped, and jittered", () => {
  assert.equal(backoff(1, 100, 10000, () => 1), 100);
  assert.equal(backoff(4, 100, 10000, () => 1), 800);
  assert.equal(backoff(30, 100, 10000, () => 1), 10000);
  assert.equal(backoff(4, 100, 10000, () => 0), 400);
});

test("SSE positions encode as the server's Last-Event-ID", () => {
  assert.equal(encodePositions({ "chat:a": { offset: 4, epoch: "xY" } }), "chat%3Aa=4.xY");
});

test("connect, subscribe, receive in order without duplicates", async () => {
  const squall = client();
  const got = [];
  squall.subscribe("news", { publication: (p) => got.push(p.offset) });
  squall.connect();
  await tick(10);
  const ws = FakeSocket.instances[0];
  assert.deepEqual(ws.sent[0], { id: 1, method: "connect", params: { token: "t" } });
  ws.reply("connect", { client: "c1", expires: false });
  assert.equal(squall.state, "connected");
  const sub = ws.sent.find((c) => c.method === "subscribe");
  assert.deepEqual(sub.params, { channel: "news" });
  ws.reply("subscribe", { offset: 0, epoch: "e1" });
  ws.push({ push: "pub", channel: "news", pub: pub(1, "a") }, { push: "pub", channel: "news", pub: pub(2, "b") });
  ws.push({ push: "pub", channel: "news", pub: pub(2, "b") });
  assert.deepEqual(got, [1, 2]);
  squall.disconnect();
});

test("reconnects on 3008 and recovers from the last offset, no gap, no repeat", async () => {
  const squall = client();
  const got = [];
  const states = [];
  squall.on("state", (e) => states.push(e.state));
  squall.subscribe("news", { publication: (p) => got.push(p.offset) });
  squall.connect();
  await tick(10);
  let ws = FakeSocket.instances[0];
  ws.reply("connect", { client: "c1", expires: false });
  ws.reply("subscribe", { offset: 3, epoch: "e1" });
  ws.push({ push: "pub", channel: "news", pub: pub(4, "x") });
  ws.serverClose(3008, "slow");
  await tick(20);
  ws = FakeSocket.instances[1];
  assert.ok(ws, "reconnected");
  ws.reply("connect", { client: "c2", expires: false });
  const resub = ws.sent.find((c) => c.method === "subscribe");
  assert.deepEqual(resub.params, { channel: "news", recover: true, offset: 4, epoch: "e1" });
  // The reply carries what was missed; a live publication follows in the same frame.
  ws.reply("subscribe", { offset: 6, epoch: "e1", recovered: true, publications: [pub(4, "x"), pub(5, "y"), pub(6, "z")] }, [
    { push: "pub", channel: "news", pub: pub(7, "w") },
  ]);
  assert.deepEqual(got, [4, 5, 6, 7]);
  assert.deepEqual(states, ["connecting", "connected", "connecting", "connected"]);
  squall.disconnect();
});

test("does not reconnect on 3503 and reports it", async () => {
  const squall = client();
  const seen = [];
  squall.on("disconnected", (e) => seen.push(e));
  squall.connect();
  await tick(10);
  FakeSocket.instances[0].reply("connect", { client: "c1", expires: false });
  FakeSocket.instances[0].serverClose(3503, "force disconnect");
  await tick(20);
  assert.equal(FakeSocket.instances.length, 1);
  assert.equal(squall.state, "disconnected");
  assert.deepEqual(seen.map((e) => [e.code, e.reconnect]), [[3503, false]]);
});

test("getToken is asked on every connect and to refresh before expiry", async () => {
  let n = 0;
  const squall = client({ token: undefined, getToken: async () => `tok${++n}` });
  squall.connect();
  await tick(10);
  const ws = FakeSocket.instances[0];
  assert.equal(ws.sent[0].params.token, "tok1");
  ws.reply("connect", { client: "c1", expires: true, ttl: 1 });
  await tick(1100);
  const refresh = ws.sent.find((c) => c.method === "refresh");
  assert.ok(refresh, "refreshed before expiry");
  assert.equal(refresh.params.token, "tok2");
  squall.disconnect();
});

test("errors reject commands with the server's code", async () => {
  const squall = client();
  squall.connect();
  await tick(10);
  const ws = FakeSocket.instances[0];
  ws.reply("connect", { client: "c1", expires: false });
  const p = squall.publish("news", 1);
  const cmd = ws.sent.find((c) => c.method === "publish");
  ws.push({ id: cmd.id, error: { code: 103, message: "permission denied" } });
  await assert.rejects(p, (e) => e.code === 103);
  squall.disconnect();
});

test("falls back to SSE after WebSocket fails twice, resuming from positions", async () => {
  class DeadSocket {
    // Never opens: a proxy that blocks WebSockets.
    constructor() {
      this.readyState = 0;
      setTimeout(() => this.onclose?.({ code: 1006, reason: "" }));
    }
    close() {}
  }
  class FakeEventSource {
    static last = null;
    constructor(url) {
      this.url = url;
      FakeEventSource.last = this;
    }
    close() {}
  }
  FakeSocket.instances = [];
  const squall = new Squall("ws://x/connection/websocket", {
    token: "t", WebSocket: DeadSocket, EventSource: FakeEventSource,
    minReconnectDelay: 1, maxReconnectDelay: 2,
  });
  const got = [];
  squall.subscribe("news", { publication: (p) => got.push(p.data) }, { since: { offset: 2, epoch: "e1" } });
  squall.connect();
  await tick(50);
  const es = FakeEventSource.last;
  assert.ok(es, "SSE opened");
  const url = new URL(es.url);
  assert.equal(url.pathname, "/connection/sse");
  assert.deepEqual(url.searchParams.getAll("channel"), ["news"]);
  assert.equal(url.searchParams.get("last_event_id"), "news=2.e1");
  es.onmessage({ data: JSON.stringify({ push: "connect", client: "c9", expires: false }) });
  es.onmessage({ data: JSON.stringify({ push: "subscribe", channel: "news", offset: 3, epoch: "e1", recovered: true }) });
  es.onmessage({ data: JSON.stringify({ push: "pub", channel: "news", pub: pub(3, "c") }) });
  assert.equal(squall.transport, "sse");
  assert.deepEqual(got, ["c"]);
  await assert.rejects(squall.publish("news", 1), /SSE/);
  squall.disconnect();
});

test("search, then subscribe from a hit: the hit and what follows, then live", async () => {
  const squall = client();
  squall.connect();
  await tick(10);
  const ws = FakeSocket.instances[0];
  ws.reply("connect", { client: "c1", expires: false });
  const found = squall.search("banana", { channel: "chat:r", limit: 1 });
  const cmd = ws.sent.find((c) => c.method === "search");
  assert.deepEqual(cmd.params, { query: "banana", channel: "chat:r", limit: 1 });
  const hit = { channel: "chat:r", offset: 7, epoch: "e1", time: 1, data: "banana" };
  ws.reply("search", { hits: [hit], cursor: null });
  const { hits } = await found;
  const got = [];
  squall.subscribe(
    hits[0].channel,
    { publication: (p) => got.push(p.offset) },
    { since: { offset: hits[0].offset - 1, epoch: hits[0].epoch } },
  );
  const sub = ws.sent.find((c) => c.method === "subscribe");
  assert.deepEqual(sub.params, { channel: "chat:r", recover: true, offset: 6, epoch: "e1" });
  ws.reply("subscribe", { offset: 8, epoch: "e1", recovered: true, publications: [pub(7, "a"), pub(8, "b")] });
  ws.push({ push: "pub", channel: "chat:r", pub: pub(8, "b") }, { push: "pub", channel: "chat:r", pub: pub(9, "c") });
  assert.deepEqual(got, [7, 8, 9]);
  squall.disconnect();
});

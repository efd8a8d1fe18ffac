// A client written from docs/protocol.md alone, with only the `ws` package:
// what a mobile developer would build. Exits 0 when every step behaved as
// the document says.
//   node protocol_client.mjs <ws url> <http url> <token> <new token> <api key>
import assert from "node:assert/strict";
import WebSocket from "ws";

const [wsUrl, httpUrl, token, newToken, apiKey] = process.argv.slice(2);

function open() {
  const ws = new WebSocket(wsUrl);
  const inbox = [];
  const waiters = [];
  let nextId = 0;
  ws.on("message", (frame) => {
    for (const line of frame.toString().split("\n")) {
      if (!line) continue;
      inbox.push(JSON.parse(line));
    }
    while (waiters.length) waiters.shift()();
  });
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
  const next = async (predicate) => {
    const deadline = Date.now() + 5000;
    for (;;) {
      const i = inbox.findIndex(predicate);
      if (i >= 0) return inbox.splice(i, 1)[0];
      if (Date.now() > deadline) throw new Error(`timed out; inbox: ${JSON.stringify(inbox)}`);
      await new Promise((r) => { waiters.push(r); setTimeout(r, 100); });
    }
  };
  const call = async (method, params) => {
    const id = ++nextId;
    ws.send(JSON.stringify({ id, method, params }));
    return next((m) => m.id === id);
  };
  const ready = new Promise((resolve, reject) => { ws.on("open", resolve); ws.on("error", reject); });
  return { ws, call, next, closed, ready };
}

async function api(method, body) {
  const res = await fetch(`${httpUrl}/api/${method}`, {
    method: "POST",
    headers: { Authorization: `apikey ${apiKey}` },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  assert.ok(res.ok, JSON.stringify(json));
  return json.result;
}

// connect, subscribe, receive
let c = open();
await c.ready;
const connected = await c.call("connect", { token });
assert.equal(typeof connected.result.client, "string");
assert.equal(connected.result.expires, true);
const sub = await c.call("subscribe", { channel: "chat:lobby" });
let { offset, epoch } = sub.result;
for (const text of ["one", "two", "three"]) await api("publish", { channel: "chat:lobby", data: { text } });
for (const text of ["one", "two", "three"]) {
  const push = await c.next((m) => m.push === "pub");
  assert.equal(push.pub.offset, offset + 1);
  assert.equal(push.pub.data.text, text);
  offset = push.pub.offset;
}

// drop the connection, miss two, come back and recover them
c.ws.terminate();
await api("publish", { channel: "chat:lobby", data: { text: "four" } });
await api("publish", { channel: "chat:lobby", data: { text: "five" } });
c = open();
await c.ready;
await c.call("connect", { token });
const recovered = await c.call("subscribe", { channel: "chat:lobby", recover: true, offset, epoch });
assert.equal(recovered.result.recovered, true);
assert.deepEqual(recovered.result.publications.map((p) => p.data.text), ["four", "five"]);

// publish as a client, refresh the token
const mine = await c.call("publish", { channel: "chat:lobby", data: { text: "six" } });
assert.equal(mine.result.offset, offset + 3);
const refreshed = await c.call("refresh", { token: newToken });
assert.ok(refreshed.result.ttl > 0);
const bad = await c.call("subscribe", { channel: "no such channel" });
assert.equal(bad.error.code, 107);

// the back end disconnects the user: close code in the do-not-reconnect range
await api("disconnect", { user: "mobile" });
const { code } = await c.closed;
assert.equal(code, 3503);
console.log("protocol client: all steps ok");

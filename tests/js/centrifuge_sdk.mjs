// The stock Centrifugo JavaScript SDK (`centrifuge` on npm) against a server
// that claims the Centrifugo client protocol: Centrifugo itself (the
// reference) or Squall. One scenario per run:
//
//   URL=ws://... PROTOCOL=json|protobuf SCENARIO=NAME node centrifuge_sdk.mjs
//
// SCENARIO is one of: session, recovery, private, invalid_token.
//
// The harness (tests/integration/test_sdk_centrifuge_js.py) holds the server
// and the token secret. Both sides speak JSON lines:
//   stdout  {"event": NAME, ...}                 what the SDK did, for the log
//           {"request": {"op": ...}, "id": N}    the harness must act, then
//   stdin   {"id": N, "result": ...}             answer (or {"id": N, "error": "..."})
//           {"event": "done"}                    last line: every expectation held
//           {"event": "fail", "reason": "..."}   and exit code 1 otherwise
// Harness operations: token {user, ttl} -> {token, exp}; bad_token {user} ->
// {token} (signed with another secret); sub_token {user, channel, ttl} ->
// {token, exp}; publish {channel, data} -> the API's answer; restart -> {restarted}
// (false where the server's history would not survive one).
import { inspect } from "node:util";
import { ask, check, emit, equal, fail, sleep, until, within, WAIT_MS } from "./sdk_harness.mjs";
import WebSocket from "ws";

const URL = process.env.URL;
const PROTOCOL = process.env.PROTOCOL || "json";
const SCENARIO = process.env.SCENARIO;
const DEBUG = process.env.SDK_DEBUG === "1";

const sdk = await import(PROTOCOL === "protobuf" ? "centrifuge/build/protobuf" : "centrifuge");
const { Centrifuge } = sdk;

// ---- payloads: JSON values over JSON, JSON bytes over Protobuf --------------

function encode(value) {
  return PROTOCOL === "protobuf" ? new TextEncoder().encode(JSON.stringify(value)) : value;
}

function decode(data) {
  return PROTOCOL === "protobuf" ? JSON.parse(new TextDecoder().decode(data)) : data;
}

// ---- recording what the SDK does ------------------------------------------------

const CLIENT_EVENTS = ["state", "connecting", "connected", "disconnected", "error"];
const SUB_EVENTS = ["state", "subscribing", "subscribed", "unsubscribed", "publication", "join", "leave", "error"];

// Every event of a client or subscription, in order, printed as it happens.
function record(emitter, names, label) {
  const log = [];
  for (const name of names) {
    emitter.on(name, (ctx) => {
      const entry = { name, ctx, at: Date.now() };
      if (name === "publication") entry.value = decode(ctx.data);
      log.push(entry);
      emit(`${label}.${name}`, { ctx: name === "publication" ? { ...ctx, data: entry.value } : ctx });
    });
  }
  log.of = (name) => log.filter((e) => e.name === name);
  return log;
}

function client(options) {
  const centrifuge = new Centrifuge(URL, { websocket: WebSocket, debug: DEBUG, ...options });
  return centrifuge;
}

// ---- scenarios ------------------------------------------------------------------

const scenarios = {};

// a) getToken (and its refresh), subscribe, publish from the SDK, presence,
// presence stats, history; a second user's join and leave.
scenarios.session = async () => {
  const TTL = 3;
  const tokens = []; // {calledAt, exp} for every getToken call
  const alice = client({
    getToken: async () => {
      const calledAt = Date.now() / 1000;
      // Two short-lived tokens, then a long one: a third call proves the
      // server accepted the refreshed token and told the SDK its new ttl.
      const ttl = tokens.length < 2 ? TTL : 3600;
      const entry = { calledAt, exp: null };
      tokens.push(entry);
      const { token, exp } = await ask("token", { user: "alice", ttl });
      entry.exp = exp;
      emit("getToken", { call: tokens.length, calledAt, ttl, exp });
      return token;
    },
  });
  const events = record(alice, CLIENT_EVENTS, "alice");
  alice.connect();
  await within(alice.ready(WAIT_MS), WAIT_MS + 1000, "alice to connect");
  const connected = events.of("connected")[0].ctx;
  check(typeof connected.client === "string" && connected.client.length > 0, "connected context has a client id", connected);
  equal(connected.transport, "websocket", "transport");

  const sub = alice.newSubscription("chat:room");
  const subEvents = record(sub, SUB_EVENTS, "alice.sub");
  sub.subscribe();
  await until(() => subEvents.of("subscribed").length === 1, "alice subscribed to chat:room");
  const subscribed = subEvents.of("subscribed")[0].ctx;
  check(subscribed.recoverable === true && subscribed.positioned === true, "chat:room is recoverable and positioned", subscribed);
  check(subscribed.wasRecovering === false && subscribed.recovered === false, "a first subscribe is no recovery", subscribed);
  check(typeof subscribed.streamPosition?.epoch === "string", "subscribed has a stream position", subscribed);

  const message = { text: "hello from the SDK", n: 1 };
  const published = await within(sub.publish(encode(message)), WAIT_MS, "sub.publish");
  emit("publish.result", { result: published });
  await until(() => subEvents.of("publication").length === 1, "alice's own publication");
  const pub = subEvents.of("publication")[0];
  equal(pub.value, message, "publication data");
  equal(pub.ctx.channel, "chat:room", "publication channel");
  check(pub.ctx.info && pub.ctx.info.user === "alice" && pub.ctx.info.client === connected.client,
    "a client's publication carries its info (user, client)", pub.ctx);
  check(typeof pub.ctx.offset === "number" && pub.ctx.offset > 0, "a publication in a history channel has an offset", pub.ctx);

  // A second user: alice sees bob join, presence counts both, then bob leave.
  const bobToken = (await ask("token", { user: "bob", ttl: 3600 })).token;
  const bob = client({ token: bobToken });
  const bobEvents = record(bob, CLIENT_EVENTS, "bob");
  bob.connect();
  await within(bob.ready(WAIT_MS), WAIT_MS + 1000, "bob to connect");
  const bobClient = bobEvents.of("connected")[0].ctx.client;
  const bobSub = bob.newSubscription("chat:room");
  bobSub.subscribe();
  await within(bobSub.ready(WAIT_MS), WAIT_MS + 1000, "bob subscribed");
  await until(() => subEvents.of("join").some((e) => e.ctx.info.client === bobClient), "alice to see bob join");
  const join = subEvents.of("join").find((e) => e.ctx.info.client === bobClient).ctx;
  equal([join.channel, join.info.user], ["chat:room", "bob"], "join context");

  const presence = await within(sub.presence(), WAIT_MS, "sub.presence");
  emit("presence.result", { result: presence });
  const clients = presence.clients;
  check(clients[connected.client]?.user === "alice", "presence lists alice's client", presence);
  check(clients[bobClient]?.user === "bob", "presence lists bob's client", presence);
  equal(clients[connected.client].client, connected.client, "presence entry's client id");
  equal(Object.keys(clients).length, 2, "presence size");
  const stats = await within(sub.presenceStats(), WAIT_MS, "sub.presenceStats");
  emit("presenceStats.result", { result: stats });
  equal(stats, { numClients: 2, numUsers: 2 }, "presence stats");

  const history = await within(sub.history({ limit: 10 }), WAIT_MS, "sub.history");
  emit("history.result", { result: { ...history, publications: history.publications.map((p) => ({ ...p, data: decode(p.data) })) } });
  equal(history.publications.length, 1, "history length");
  const [first] = history.publications;
  equal(decode(first.data), message, "history publication data");
  equal(first.offset, pub.ctx.offset, "history publication offset");
  equal(history.offset, pub.ctx.offset, "history top offset");
  equal(history.epoch, subscribed.streamPosition.epoch, "history epoch");

  bob.disconnect();
  await until(() => subEvents.of("leave").some((e) => e.ctx.info.client === bobClient), "alice to see bob leave");
  const leave = subEvents.of("leave").find((e) => e.ctx.info.client === bobClient).ctx;
  equal([leave.channel, leave.info.user], ["chat:room", "bob"], "leave context");
  const statsAfter = await within(sub.presenceStats(), WAIT_MS, "sub.presenceStats after bob left");
  equal(statsAfter, { numClients: 1, numUsers: 1 }, "presence stats after bob left");

  // The refreshes: the SDK asked for a new token before each short-lived one
  // expired (give or take the second a JWT's exp is rounded to, and half a
  // second of scheduling), and kept the connection the whole time.
  await until(() => tokens.length >= 3 && tokens[2].exp !== null, "the SDK to refresh its token twice", 4 * TTL * 1000 + WAIT_MS);
  for (let i = 1; i < tokens.length; i++) {
    check(tokens[i].calledAt <= tokens[i - 1].exp + 1.5, `getToken call ${i + 1} came before token ${i} expired`, tokens);
  }
  // Still connected past the second token's expiry, and still served.
  await until(() => Date.now() / 1000 > tokens[1].exp + 1, "the refreshed tokens' expiry to pass", 2 * TTL * 1000 + WAIT_MS);
  const statsLater = await within(sub.presenceStats(), WAIT_MS, "sub.presenceStats after the refreshes");
  equal(statsLater, { numClients: 1, numUsers: 1 }, "presence stats after the refreshes");
  equal(alice.state, "connected", "alice's state after the refreshes");
  equal(events.of("connecting").length, 1, "connecting events (the first connect only)");
  equal(events.of("connected").length, 1, "connected events (one connection throughout)");
  equal(events.of("disconnected").length, 0, "disconnected events");
  equal(subEvents.of("subscribed").length, 1, "subscribed events (no resubscribe)");
  equal(subEvents.of("unsubscribed").length, 0, "unsubscribed events");
  equal(tokens.length, 3, "getToken calls");
  alice.disconnect();
};

// b) Offline, then back: the subscription recovers exactly what it missed.
scenarios.recovery = async () => {
  const CHANNEL = "durable:log";
  const { token } = await ask("token", { user: "carol", ttl: 3600 });
  const carol = client({ token });
  const events = record(carol, CLIENT_EVENTS, "carol");
  const sub = carol.newSubscription(CHANNEL);
  const subEvents = record(sub, SUB_EVENTS, "carol.sub");
  sub.subscribe();
  carol.connect();
  await until(() => subEvents.of("subscribed").length === 1, "carol subscribed");
  const first = subEvents.of("subscribed")[0].ctx;
  check(first.recoverable === true && first.positioned === true, "first subscribe: recoverable, positioned", first);
  check(first.wasRecovering === false && first.recovered === false, "first subscribe: no recovery", first);

  await ask("publish", { channel: CHANNEL, data: { n: 0 } });
  await until(() => subEvents.of("publication").length === 1, "the live publication n=0");
  equal(subEvents.of("publication")[0].value, { n: 0 }, "live publication");

  carol.disconnect();
  await until(() => events.of("disconnected").length === 1, "carol's disconnected event");
  equal(events.of("disconnected")[0].ctx, { code: 0, reason: "disconnect called" }, "disconnected context");
  equal(sub.state, "subscribing", "a subscription's state while its client is offline");

  for (let n = 1; n <= 5; n++) await ask("publish", { channel: CHANNEL, data: { n } });
  const { restarted } = await ask("restart", {}, 60000);
  emit("server.restarted", { restarted });

  carol.connect();
  await until(() => subEvents.of("subscribed").length === 2, "carol to resubscribe");
  const again = subEvents.of("subscribed")[1].ctx;
  check(again.wasRecovering === true && again.recovered === true, "resubscribe recovered", again);
  check(again.recoverable === true && again.positioned === true, "still recoverable, positioned", again);
  // Centrifugo answers a recovery with the position recovered from (the
  // publications delivered after it move it), in the same epoch.
  equal(again.streamPosition, { offset: 1, epoch: first.streamPosition.epoch }, "stream position of the recovered subscribe");
  check(again.hasRecoveredPublications === true, "the recovered subscribe has publications", again);
  // The 5 missed ones, then a live sentinel: anything repeated would come before it.
  await ask("publish", { channel: CHANNEL, data: { n: "sentinel" } });
  await until(() => subEvents.of("publication").some((e) => e.value.n === "sentinel"), "the sentinel publication");
  const values = subEvents.of("publication").map((e) => e.value.n);
  equal(values, [0, 1, 2, 3, 4, 5, "sentinel"], "publications received (live, recovered, live)");
  const offsets = subEvents.of("publication").map((e) => e.ctx.offset);
  for (let i = 1; i < offsets.length; i++) check(offsets[i] === offsets[i - 1] + 1, "offsets one apart", offsets);
  equal(events.of("connecting").length, 2, "connecting events (two connect() calls)");
  equal(events.of("connected").length, 2, "connected events");
  equal(subEvents.of("unsubscribed").length, 0, "unsubscribed events");
  carol.disconnect();
};

// c) A private channel: with a subscription token (from the Subscription's
// getToken) subscribing works; without one the server refuses.
scenarios.private = async () => {
  const CHANNEL = "secret:x";
  const { token } = await ask("token", { user: "dave", ttl: 3600 });
  const dave = client({ token });
  const events = record(dave, CLIENT_EVENTS, "dave");
  dave.connect();
  await within(dave.ready(WAIT_MS), WAIT_MS + 1000, "dave to connect");

  let tokenCalls = 0;
  const sub = dave.newSubscription(CHANNEL, {
    getToken: async (ctx) => {
      tokenCalls++;
      emit("sub.getToken", { ctx });
      equal(ctx.channel, CHANNEL, "subscription getToken context channel");
      return (await ask("sub_token", { user: "dave", channel: CHANNEL, ttl: 3600 })).token;
    },
  });
  const subEvents = record(sub, SUB_EVENTS, "dave.sub");
  sub.subscribe();
  await until(() => subEvents.of("subscribed").length === 1 || subEvents.of("unsubscribed").length > 0,
    "the subscription with a token to settle");
  check(subEvents.of("subscribed").length === 1, "subscribed with a subscription token", subEvents);
  equal(tokenCalls, 1, "subscription getToken calls");
  await ask("publish", { channel: CHANNEL, data: { secret: 1 } });
  await until(() => subEvents.of("publication").length === 1, "a publication on the private channel");
  equal(subEvents.of("publication")[0].value, { secret: 1 }, "private publication");
  sub.unsubscribe();
  dave.removeSubscription(sub);

  // No token: the server refuses; the SDK gives up on the subscription (no retry).
  const bare = dave.newSubscription(CHANNEL);
  const bareEvents = record(bare, SUB_EVENTS, "dave.bare");
  bare.subscribe();
  const refused = await within(bare.ready(WAIT_MS).then(() => null, (err) => err), WAIT_MS + 1000, "bare.ready()");
  emit("bare.ready.rejected", { error: refused && { code: refused.code, message: refused.message } });
  check(refused !== null, "ready() of a subscription without a token rejects");
  await until(() => bareEvents.of("unsubscribed").length === 1, "the refused subscription's unsubscribed event");
  equal(bareEvents.of("unsubscribed")[0].ctx, { channel: CHANNEL, code: 103, reason: "permission denied" },
    "unsubscribed context of a refused subscription");
  // The SDK's own code for "the subscription went unsubscribed" (errorCodes.subscriptionUnsubscribed).
  equal([refused.code, refused.message], [7, "unsubscribed"], "ready() rejection");
  // Long enough for a resubscribe the SDK would make after its minimum delay (500 ms).
  await sleep(1500);
  equal(bareEvents.of("subscribing").length, 1, "subscribing events (no retry)");
  equal(bareEvents.of("subscribed").length, 0, "subscribed events");
  equal(bareEvents.of("error").length, 0, "subscription error events");
  equal(bare.state, "unsubscribed", "state of the refused subscription");
  equal(dave.state, "connected", "the connection survives the refusal");
  equal(events.of("disconnected").length, 0, "disconnected events");
  dave.disconnect();
};

// d) A connection token with a bad signature: the server closes with a
// 3500-range code, and the SDK does not try again.
scenarios.invalid_token = async () => {
  const { token } = await ask("bad_token", { user: "eve" });
  const eve = client({ token, minReconnectDelay: 100, maxReconnectDelay: 500 });
  const events = record(eve, CLIENT_EVENTS, "eve");
  eve.connect();
  await until(() => events.of("disconnected").length === 1, "eve's disconnected event");
  equal(events.of("disconnected")[0].ctx, { code: 3500, reason: "invalid token" }, "disconnected context");
  // A reconnect would come within maxReconnectDelay (500 ms); wait well past it.
  await sleep(3000);
  equal(events.of("connecting").length, 1, "connecting events (the connect() call only)");
  equal(events.of("connected").length, 0, "connected events");
  equal(events.of("disconnected").length, 1, "disconnected events");
  equal(eve.state, "disconnected", "final state");
  emit("eve.errors", { errors: events.of("error").map((e) => e.ctx) });
};

// ---- run --------------------------------------------------------------------------

if (!URL || !scenarios[SCENARIO]) fail(`usage: URL=... PROTOCOL=json|protobuf SCENARIO=${Object.keys(scenarios).join("|")}`);
emit("start", { scenario: SCENARIO, protocol: PROTOCOL, url: URL, sdk: sdk.Centrifuge.name });
try {
  await scenarios[SCENARIO]();
} catch (err) {
  fail(inspect(err));
}
emit("done");
process.exit(0);

// The stock Pusher Channels JavaScript SDK (`pusher-js` on npm, its Node
// build) against Squall's Pusher endpoint (`/app/<key>`). One scenario per run:
//
//   HOST=127.0.0.1 PORT=N KEY=app-key SECRET=... SCENARIO=NAME node pusher_sdk.mjs
//
// SCENARIO is one of: public, private, presence, presence_same_user,
// client_events, bad_signature, unknown_key, reconnect, encrypted, and
// presence_cluster (HOST:PORT is then a balancer in front of several nodes:
// tests/integration/test_pusher_cluster.py).
//
// Private and presence channels are authorized with the SDK's own flow
// (channelAuthorization.customHandler); the handler signs here, with the
// app's secret, exactly as a Pusher server SDK would:
//   auth = KEY + ":" + hex HMAC-SHA256(SECRET, socket_id:channel[:channel_data])
// and, for private-encrypted- channels, the channel's key as the server SDKs
// derive it from the app's encryption master key (ENCRYPTION_MASTER_KEY_BASE64,
// 32 bytes; the server itself never sees it):
//   shared_secret = base64 SHA256(utf8(channel) || master_key_bytes)
//
// The harness (tests/integration/test_sdk_pusher_js.py) holds the server.
// Both sides speak JSON lines:
//   stdout  {"event": NAME, ...}                 what the SDK did, for the log
//           {"request": {"op": ...}, "id": N}    the harness must act, then
//   stdin   {"id": N, "result": ...}             answer (or {"id": N, "error": "..."})
//           {"event": "done"}                    last line: every expectation held
//           {"event": "fail", "reason": "..."}   and exit code 1 otherwise
// Harness operations (channels are Pusher channel names):
//   publish {channel, event, data}  a Pusher event (data: a string), published
//                                   through Squall's HTTP API in the envelope
//   publish_raw {channel, data}     a plain Squall publication (any JSON value)
//   restart {}                      stop the server, start it again on the same port
//   trigger_encrypted {channel, event, data}
//                                   the event triggered by Pusher's Python server
//                                   SDK (PyPI `pusher`, with the master key), which
//                                   encrypts it, through Squall's Pusher HTTP API
//   authenticate {channel, socket_id}
//                                   that SDK's own channel authorization ({auth,
//                                   shared_secret}), to check ours against it
// and, in the cluster's harness (presence_cluster):
//   nodes_of {socket_ids: {label: id}}
//                                   the index of the node each socket lives on
//   trigger {channel, event, data, via}
//                                   the event triggered by the Python server SDK
//                                   through the balancer (via "balancer") or
//                                   straight to node `via` (an index)
//   channel_info {channel}          that SDK's channel_info (user_count,
//                                   subscription_count) and users_info: {info, users}
import { createHash, createHmac } from "node:crypto";
import { createRequire } from "node:module";
import { inspect } from "node:util";
import { ask, check, emit, equal, fail, plain, sleep, until, within, WAIT_MS } from "./sdk_harness.mjs";
import Pusher from "pusher-js";

const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT);
const KEY = process.env.KEY;
const SECRET = process.env.SECRET;
const SCENARIO = process.env.SCENARIO;
const MASTER_KEY_BASE64 = process.env.ENCRYPTION_MASTER_KEY_BASE64 || "";
const DEBUG = process.env.SDK_DEBUG === "1";
// A reconnect after a restart: pusher-js waits 1 s after a close, and a
// connection attempt that fails while the server is down is only retried
// after its 15 s timeout.
const RECONNECT_MS = 40000;
const SDK_VERSION = createRequire(import.meta.url)("pusher-js/package.json").version;

// The SDK's log goes to stderr (stdout is the harness's).
Pusher.log = DEBUG ? (...args) => process.stderr.write(`[pusher-js] ${args.map(String).join(" ")}\n`) : () => {};

// ---- signing, as the app's server would -------------------------------------------

function sign(secret, message) {
  return createHmac("sha256", secret).update(message).digest("hex");
}

// The key of an encrypted channel, as Pusher's server SDKs derive it.
function sharedSecret(channelName) {
  const master = Buffer.from(MASTER_KEY_BASE64, "base64");
  check(master.length === 32, "ENCRYPTION_MASTER_KEY_BASE64 is 32 bytes of base64", MASTER_KEY_BASE64);
  return createHash("sha256").update(Buffer.concat([Buffer.from(channelName, "utf8"), master])).digest("base64");
}

function channelAuth({ socketId, channelName }, { user, secret = SECRET, claimed } = {}) {
  if (channelName.startsWith("private-encrypted-")) {
    return { auth: `${KEY}:${sign(secret, `${socketId}:${channelName}`)}`, shared_secret: sharedSecret(channelName) };
  }
  if (!channelName.startsWith("presence-")) {
    return { auth: `${KEY}:${sign(secret, `${socketId}:${channelName}`)}` };
  }
  // `claimed`: channel_data other than the one signed (a forged member).
  const signed = JSON.stringify({ user_id: user.id, user_info: user.info });
  const channel_data = claimed === undefined ? signed : JSON.stringify(claimed);
  return { auth: `${KEY}:${sign(secret, `${socketId}:${channelName}:${signed}`)}`, channel_data };
}

// ---- clients, and what they observe -----------------------------------------------

// A log of entries {name, data, ...} with a filter by name.
function newLog() {
  const log = [];
  log.of = (name) => log.filter((e) => e.name === name);
  return log;
}

// Members of a presence channel as the SDK holds them.
function members(channel) {
  const list = {};
  channel.members.each((m) => (list[m.id] = m.info));
  return { count: channel.members.count, me: channel.members.me, members: list };
}

class SdkClient {
  // user: {id, info} for presence channels; auth(params) may override the signing.
  constructor(label, { key = KEY, user, auth } = {}) {
    this.label = label;
    this.user = user || { id: label, info: { name: label } };
    this.states = newLog(); // state_change {previous, current}
    this.errors = newLog(); // connection 'error' events
    this.frames = newLog(); // every event the connection received (name, channel, data)
    this.sent = newLog(); // every event the SDK sent (name, channel, the keys of its data)
    this.authCalls = []; // the customHandler's params, in order
    this.channels = {};
    this.pusher = new Pusher(key, {
      wsHost: HOST,
      wsPort: PORT,
      forceTLS: false,
      enabledTransports: ["ws"],
      disableStats: true,
      cluster: "mt1",
      channelAuthorization: {
        customHandler: (params, callback) => {
          this.authCalls.push({ socketId: params.socketId, channelName: params.channelName });
          emit(`${label}.authorize`, { params });
          try {
            callback(null, auth ? auth(params, this.user) : channelAuth(params, { user: this.user }));
          } catch (err) {
            callback(err, null);
          }
        },
      },
    });
    const connection = this.pusher.connection;
    const onState = (change) => {
      this.states.push({ name: change.current, previous: change.previous, at: Date.now() });
      emit(`${label}.state`, { ...change, socket_id: connection.socket_id });
    };
    // The constructor already started connecting (initialized -> connecting)
    // before anything could be bound: that first change is recorded here.
    if (connection.state !== "initialized") onState({ previous: "initialized", current: connection.state });
    connection.bind("state_change", onState);
    connection.bind("error", (error) => {
      this.errors.push({ name: "error", data: error });
      emit(`${label}.error`, { error: serializeError(error) });
    });
    connection.bind("message", (message) => {
      this.frames.push({ name: message.event, channel: message.channel, data: message.data });
      emit(`${label}.recv`, { message });
    });
    // What the SDK sends (the channel layer's pusher:subscribe, client events, ...).
    const sendEvent = connection.send_event.bind(connection);
    connection.send_event = (name, data, channel) => {
      this.sent.push({ name, channel, keys: definedKeys(data) });
      emit(`${label}.send`, { name, channel, data: name === "pusher:subscribe" ? { ...data, auth: "<sig>" } : data });
      return sendEvent(name, data, channel);
    };
  }

  get state() {
    return this.pusher.connection.state;
  }

  get socketId() {
    return this.pusher.connection.socket_id;
  }

  async connected(ms = WAIT_MS) {
    await until(() => this.state === "connected", `${this.label} to connect`, ms);
    const id = this.socketId;
    // Pusher's socket id: two decimal numbers joined by a dot.
    check(typeof id === "string" && /^\d+\.\d+$/.test(id), `${this.label}'s socket_id is Pusher-shaped`, id);
    return id;
  }

  // Subscribe; every event of the channel (the SDK's `pusher:*` ones included) is recorded.
  subscribe(name) {
    const channel = this.pusher.subscribe(name);
    const log = newLog();
    channel.bind_global((event, data) => {
      const entry = { name: event, data: event === "pusher:subscription_succeeded" && channel.members ? members(channel) : data };
      log.push(entry);
      emit(`${this.label}.${name}.${event}`, { data: entry.data });
    });
    this.channels[name] = { channel, log };
    return { channel, log };
  }

  async subscribed(name, times = 1, ms = WAIT_MS) {
    const { log } = this.channels[name];
    await until(
      () => log.of("pusher:subscription_succeeded").length >= times || log.of("pusher:subscription_error").length > 0,
      `${this.label} subscribed to ${name}`,
      ms,
    );
    const errors = log.of("pusher:subscription_error");
    check(errors.length === 0, `${this.label}'s subscription to ${name} succeeds`, errors);
    return log.of("pusher:subscription_succeeded")[times - 1].data;
  }

  events(name, event) {
    return this.channels[name].log.of(event);
  }

  disconnect() {
    this.pusher.disconnect();
  }
}

function definedKeys(data) {
  return data && typeof data === "object" ? Object.keys(data).filter((k) => data[k] !== undefined).sort() : [];
}

function serializeError(error) {
  if (error instanceof Error) return { message: error.message };
  try {
    return plain(error);
  } catch {
    return inspect(error);
  }
}

// The code of a Pusher error as pusher-js reports it: a pusher:error event
// ({type: "PusherError", data: {code, message}}) or a close code in a
// handshake ({type: "WebSocketError", error: {type: "PusherError", data}}).
function pusherErrorCode(error) {
  const inner = error && error.type === "WebSocketError" ? error.error : error;
  return inner && inner.type === "PusherError" && inner.data ? inner.data.code : undefined;
}

async function publish(channel, event, data) {
  return ask("publish", { channel, event, data: typeof data === "string" ? data : JSON.stringify(data) });
}

// ---- scenarios ------------------------------------------------------------------

const scenarios = {};

// A public channel: subscribe, receive events (JSON data decoded, other text
// kept), a plain Squall publication as `message`, and nothing after unsubscribe.
scenarios.public = async () => {
  const alice = new SdkClient("alice");
  const socketId = await alice.connected();
  emit("connected", { socket_id: socketId });
  alice.subscribe("my-channel");
  const succeeded = await alice.subscribed("my-channel");
  emit("subscribed", { data: succeeded });
  check(alice.channels["my-channel"].channel.subscribed === true, "channel.subscribed");
  equal(alice.authCalls, [], "no authorization for a public channel");

  await publish("my-channel", "my-event", { n: 1 });
  await until(() => alice.events("my-channel", "my-event").length === 1, "my-event n=1");
  equal(alice.events("my-channel", "my-event")[0].data, { n: 1 }, "my-event data (JSON decoded by the SDK)");

  await publish("my-channel", "text-event", "plain text, not JSON");
  await until(() => alice.events("my-channel", "text-event").length === 1, "text-event");
  equal(alice.events("my-channel", "text-event")[0].data, "plain text, not JSON", "text-event data");

  // A Squall publication that is no Pusher envelope reaches Pusher clients as `message`.
  await ask("publish_raw", { channel: "my-channel", data: { hello: "squall" } });
  await until(() => alice.events("my-channel", "message").length === 1, "the plain publication as `message`");
  equal(alice.events("my-channel", "message")[0].data, { hello: "squall" }, "message data");

  // Unsubscribe, then subscribe to another channel: its subscription_succeeded
  // shows the server has read the unsubscribe (one socket, in order).
  alice.pusher.unsubscribe("my-channel");
  alice.subscribe("other-channel");
  await alice.subscribed("other-channel");
  const framesBefore = alice.frames.length;
  await publish("my-channel", "my-event", { n: 2 });
  await publish("other-channel", "sentinel", { last: true });
  await until(() => alice.events("other-channel", "sentinel").length === 1, "the sentinel on other-channel");
  const late = alice.frames.slice(framesBefore).filter((f) => f.channel === "my-channel");
  equal(late, [], "frames for my-channel after unsubscribing");
  equal(alice.state, "connected", "state");
  equal(alice.errors.length, 0, "connection errors");
  // Pusher answers a public or private subscription with empty data (members are for presence channels).
  equal(succeeded, {}, "pusher:subscription_succeeded data of a public channel");
  alice.disconnect();
};

// A private channel: the SDK asks the custom handler (with this socket's id),
// and the signed subscription is accepted.
scenarios.private = async () => {
  const alice = new SdkClient("alice");
  const socketId = await alice.connected();
  alice.subscribe("private-room");
  const succeeded = await alice.subscribed("private-room");
  equal(alice.authCalls, [{ socketId, channelName: "private-room" }], "authorization requests");
  await publish("private-room", "secret-event", { s: 1 });
  await until(() => alice.events("private-room", "secret-event").length === 1, "secret-event");
  equal(alice.events("private-room", "secret-event")[0].data, { s: 1 }, "secret-event data");
  equal(alice.errors.length, 0, "connection errors");
  equal(succeeded, {}, "pusher:subscription_succeeded data of a private channel");
  alice.disconnect();
};

// A presence channel with two users: the member list on subscribing,
// member_added, an event to both, member_removed when one disconnects.
scenarios.presence = async () => {
  const CH = "presence-room";
  const alice = new SdkClient("alice", { user: { id: "alice", info: { name: "Alice" } } });
  const bob = new SdkClient("bob", { user: { id: "bob", info: { name: "Bob", role: "tester" } } });
  await alice.connected();
  alice.subscribe(CH);
  equal(await alice.subscribed(CH), {
    count: 1,
    me: { id: "alice", info: { name: "Alice" } },
    members: { alice: { name: "Alice" } },
  }, "alice's members on subscribing");

  await bob.connected();
  bob.subscribe(CH);
  equal(await bob.subscribed(CH), {
    count: 2,
    me: { id: "bob", info: { name: "Bob", role: "tester" } },
    members: { alice: { name: "Alice" }, bob: { name: "Bob", role: "tester" } },
  }, "bob's members on subscribing");

  await until(() => alice.events(CH, "pusher:member_added").length === 1, "alice to see bob added");
  equal(alice.events(CH, "pusher:member_added")[0].data, { id: "bob", info: { name: "Bob", role: "tester" } }, "member_added");
  equal(members(alice.channels[CH].channel).count, 2, "alice's member count after bob came");
  equal(bob.events(CH, "pusher:member_added").length, 0, "bob is not told of himself");

  await publish(CH, "announce", { to: "all" });
  await until(() => alice.events(CH, "announce").length === 1 && bob.events(CH, "announce").length === 1, "announce on both");
  equal(bob.events(CH, "announce")[0].data, { to: "all" }, "announce data");

  bob.disconnect();
  await until(() => alice.events(CH, "pusher:member_removed").length === 1, "alice to see bob removed");
  equal(alice.events(CH, "pusher:member_removed")[0].data, { id: "bob", info: { name: "Bob", role: "tester" } }, "member_removed");
  equal(members(alice.channels[CH].channel), {
    count: 1,
    me: { id: "alice", info: { name: "Alice" } },
    members: { alice: { name: "Alice" } },
  }, "alice's members after bob left");
  equal(alice.events(CH, "pusher:member_added").length, 1, "member_added events");
  equal(alice.errors.length + bob.errors.length, 0, "connection errors");
  alice.disconnect();
};

// Pusher counts users, not connections: a user's second connection adds no
// member, and only its last one leaving removes it.
scenarios.presence_same_user = async () => {
  const CH = "presence-lobby";
  const alice = new SdkClient("alice", { user: { id: "alice", info: { name: "Alice" } } });
  const carolA = new SdkClient("carol1", { user: { id: "carol", info: { name: "Carol" } } });
  const carolB = new SdkClient("carol2", { user: { id: "carol", info: { name: "Carol" } } });
  await alice.connected();
  alice.subscribe(CH);
  await alice.subscribed(CH);
  await carolA.connected();
  carolA.subscribe(CH);
  await carolA.subscribed(CH);
  await until(() => alice.events(CH, "pusher:member_added").length === 1, "alice to see carol added");

  await carolB.connected();
  carolB.subscribe(CH);
  const second = await carolB.subscribed(CH);
  equal(second.count, 2, "members seen by carol's second connection (users, not connections)");
  // carol's first connection leaves: carol stays (her second one is there).
  carolA.disconnect();
  // A sentinel: anything about carol before it would have come first.
  await publish(CH, "sentinel", {});
  await until(() => alice.events(CH, "sentinel").length === 1, "the sentinel");
  equal(alice.events(CH, "pusher:member_added").length, 1, "member_added events (carol once)");
  equal(alice.events(CH, "pusher:member_removed").length, 0, "member_removed while carol has a connection");
  carolB.disconnect();
  await until(() => alice.events(CH, "pusher:member_removed").length === 1, "alice to see carol removed");
  equal(alice.events(CH, "pusher:member_removed")[0].data, { id: "carol", info: { name: "Carol" } }, "member_removed");
  equal(members(alice.channels[CH].channel).count, 1, "alice's member count at the end");
  alice.disconnect();
};

// Client events: from one client to the others on a private channel, never
// back to the sender; on a presence channel they carry the sender's user_id.
scenarios.client_events = async () => {
  const CH = "private-chat";
  const alice = new SdkClient("alice", { user: { id: "alice", info: { name: "Alice" } } });
  const bob = new SdkClient("bob", { user: { id: "bob", info: { name: "Bob" } } });
  await Promise.all([alice.connected(), bob.connected()]);
  alice.subscribe(CH);
  bob.subscribe(CH);
  await Promise.all([alice.subscribed(CH), bob.subscribed(CH)]);

  check(alice.channels[CH].channel.trigger("client-typing", { who: "alice" }) === true, "trigger() sent the event");
  await until(() => bob.events(CH, "client-typing").length === 1, "bob to get alice's client event");
  equal(bob.events(CH, "client-typing")[0].data, { who: "alice" }, "client event data");
  // A server event after it: alice's own, were it echoed, would come first.
  await publish(CH, "sentinel", { n: 1 });
  await until(() => alice.events(CH, "sentinel").length === 1, "the sentinel on alice");
  equal(alice.events(CH, "client-typing").length, 0, "client events echoed to their sender");

  check(bob.channels[CH].channel.trigger("client-typing", { who: "bob" }) === true, "bob's trigger() sent");
  await until(() => alice.events(CH, "client-typing").length === 1, "alice to get bob's client event");
  equal(alice.events(CH, "client-typing")[0].data, { who: "bob" }, "bob's client event data");
  await publish(CH, "sentinel", { n: 2 });
  await until(() => bob.events(CH, "sentinel").length === 2, "the second sentinel on bob");
  equal(bob.events(CH, "client-typing").length, 1, "bob's client events (his own not echoed)");

  // Presence: the receiver learns who sent it (metadata.user_id).
  const PCH = "presence-chat";
  alice.subscribe(PCH);
  bob.subscribe(PCH);
  await Promise.all([alice.subscribed(PCH), bob.subscribed(PCH)]);
  const got = [];
  bob.channels[PCH].channel.bind("client-moved", (data, metadata) => got.push({ data, metadata }));
  check(alice.channels[PCH].channel.trigger("client-moved", { x: 1 }) === true, "presence trigger() sent");
  await until(() => got.length === 1, "bob to get alice's client event on the presence channel");
  equal(got[0], { data: { x: 1 }, metadata: { user_id: "alice" } }, "presence client event with its sender's user_id");
  await publish(PCH, "sentinel", {});
  await until(() => alice.events(PCH, "sentinel").length === 1, "the sentinel on alice's presence channel");
  equal(alice.events(PCH, "client-moved").length, 0, "presence client events echoed to their sender");
  equal(alice.errors.length + bob.errors.length, 0, "connection errors");
  alice.disconnect();
  bob.disconnect();
};

// Bad signatures: signed with another secret, and a presence member who is
// not the one signed for. Each is refused for its channel alone; the
// connection stays, and a rightly signed subscription then works.
scenarios.bad_signature = async () => {
  const alice = new SdkClient("alice", {
    user: { id: "alice", info: { name: "Alice" } },
    auth: (params, user) => {
      if (params.channelName === "private-forged") {
        return channelAuth(params, { user, secret: "not-the-app-secret-0123456789" });
      }
      if (params.channelName === "presence-forged") {
        return channelAuth(params, { user, claimed: { user_id: "mallory", user_info: { name: "Mallory" } } });
      }
      return channelAuth(params, { user });
    },
  });
  await alice.connected();
  const refusals = [];
  for (const name of ["private-forged", "presence-forged"]) {
    const errorsBefore = alice.errors.length;
    alice.subscribe(name);
    await until(
      () => alice.events(name, "pusher:subscription_error").length > 0 || alice.errors.length > errorsBefore
        || alice.events(name, "pusher:subscription_succeeded").length > 0,
      `the server's answer to ${name}`,
    );
    equal(alice.events(name, "pusher:subscription_succeeded").length, 0, `${name} subscribed`);
    check(alice.channels[name].channel.subscribed === false, `${name}: channel.subscribed is false`);
    const refusal = {
      channel: name,
      subscription_error: alice.events(name, "pusher:subscription_error").map((e) => e.data),
      pusher_error: alice.errors.slice(errorsBefore).map((e) => e.data),
    };
    emit("refused", refusal);
    refusals.push(refusal);
  }
  // The connection is still there, and serves a rightly signed channel.
  alice.subscribe("private-fine");
  await alice.subscribed("private-fine");
  const framesBefore = alice.frames.length;
  await publish("private-forged", "leak", {});
  await publish("presence-forged", "leak", {});
  await publish("private-fine", "sentinel", {});
  await until(() => alice.events("private-fine", "sentinel").length === 1, "the sentinel on private-fine");
  const leaked = alice.frames.slice(framesBefore).filter((f) => f.channel && f.channel !== "private-fine");
  equal(leaked, [], "events of the refused channels");
  equal(alice.state, "connected", "state after the refusals");
  equal(alice.states.of("disconnected").length + alice.states.of("connecting").length, 1, "state changes (the first connecting only)");
  emit("refusals", { refusals });
  alice.disconnect();
};

// An app key the server does not know: pusher:error 4001 (or close code
// 4001), and the SDK does not try again.
scenarios.unknown_key = async () => {
  const eve = new SdkClient("eve", { key: "no-such-app-key" });
  await until(() => eve.errors.some((e) => pusherErrorCode(e.data) !== undefined), "eve's Pusher error");
  const codes = eve.errors.map((e) => pusherErrorCode(e.data)).filter((c) => c !== undefined);
  emit("codes", { codes });
  equal(codes[0], 4001, "the Pusher error code (4001: application does not exist)");
  await until(() => eve.state === "disconnected", "the SDK to give up (state disconnected)");
  // A reconnect would come within 1 s (backoff) or at once (retry); wait well past it.
  await sleep(3000);
  equal(eve.states.of("connecting").length, 1, "connecting state changes (the first connect only)");
  equal(eve.states.of("connected").length, 0, "connected state changes");
  equal(eve.state, "disconnected", "final state");
};

// The server restarts on the same port: the SDK reconnects on its own with a
// new socket id, subscribes again (the private channel re-authorized for the
// new socket), and receives events published after it is back.
scenarios.reconnect = async () => {
  const alice = new SdkClient("alice");
  const first = await alice.connected();
  alice.subscribe("news");
  alice.subscribe("private-news");
  await Promise.all([alice.subscribed("news"), alice.subscribed("private-news")]);
  await publish("news", "headline", { n: 1 });
  await until(() => alice.events("news", "headline").length === 1, "headline n=1");

  const statesBefore = alice.states.length;
  const { restarted } = await ask("restart", {}, 60000);
  emit("server.restarted", { restarted });
  check(restarted === true, "the harness restarted the server");
  await until(
    () => alice.states.slice(statesBefore).some((s) => s.name === "connected") && alice.state === "connected",
    "alice to reconnect after the restart",
    RECONNECT_MS,
  );
  const second = alice.socketId;
  check(second !== first, "a new socket id after reconnecting", { first, second });
  await Promise.all([alice.subscribed("news", 2), alice.subscribed("private-news", 2)]);
  equal(alice.authCalls, [
    { socketId: first, channelName: "private-news" },
    { socketId: second, channelName: "private-news" },
  ], "authorization requests (again for the new socket)");

  await publish("news", "headline", { n: 2 });
  await publish("private-news", "headline", { n: 2 });
  await until(() => alice.events("news", "headline").length === 2, "headline n=2 on news");
  await until(() => alice.events("private-news", "headline").length === 1, "headline n=2 on private-news");
  equal(alice.events("news", "headline").map((e) => e.data.n), [1, 2], "headlines on news");
  equal(alice.events("private-news", "headline")[0].data, { n: 2 }, "headline on private-news");
  emit("states", { states: alice.states.map((s) => s.name) });
  alice.disconnect();
};

// An end-to-end encrypted channel: Squall authorizes it like a private one
// and relays the server SDK's ciphertext; pusher-js decrypts it with the
// shared_secret of the app's authorization (derived here as the server SDKs
// do, and checked against Pusher's Python SDK). Client events are refused.
scenarios.encrypted = async () => {
  const CH = "private-encrypted-vault";
  const alice = new SdkClient("alice");
  const bob = new SdkClient("bob");
  const [aliceId, bobId] = await Promise.all([alice.connected(), bob.connected()]);
  alice.subscribe(CH);
  bob.subscribe(CH);
  const [succeeded] = await Promise.all([alice.subscribed(CH), bob.subscribed(CH)]);
  equal(succeeded, {}, "pusher:subscription_succeeded data of an encrypted channel");
  equal(alice.authCalls, [{ socketId: aliceId, channelName: CH }], "alice's authorization requests");
  equal(bob.authCalls, [{ socketId: bobId, channelName: CH }], "bob's authorization requests");
  // The SDK sends only `auth`: the channel's key never reaches the server.
  equal(alice.sent.of("pusher:subscribe").map((e) => e.keys), [["auth", "channel"]], "what alice's pusher:subscribe holds");

  // Our derivation is the server SDK's: its own authorization for alice's socket.
  const official = await ask("authenticate", { channel: CH, socket_id: aliceId });
  equal(channelAuth({ socketId: aliceId, channelName: CH }, {}), official, "auth and shared_secret as Pusher's Python SDK makes them");

  const payload = { msg: "top secret", n: 1, text: "h\u00e9llo \u2713" };
  equal(await ask("trigger_encrypted", { channel: CH, event: "secret", data: payload }), {}, "the HTTP API's answer");
  await until(
    () => alice.events(CH, "secret").length === 1 && bob.events(CH, "secret").length === 1,
    "the encrypted event on alice and bob",
  );
  equal(alice.events(CH, "secret")[0].data, payload, "alice's decrypted data");
  equal(bob.events(CH, "secret")[0].data, payload, "bob's decrypted data");
  // On the wire it was ciphertext: the server relayed what the SDK encrypted.
  const [wire] = alice.frames.of("secret");
  check(
    wire && wire.channel === CH && typeof wire.data === "object" && typeof wire.data.nonce === "string"
      && typeof wire.data.ciphertext === "string",
    "the frame carries {nonce, ciphertext}",
    wire,
  );
  check(!JSON.stringify(wire.data).includes("top secret"), "no plaintext on the wire", wire);
  emit("wire", { data: wire.data });

  // Text that is not JSON comes out as the same text.
  await ask("trigger_encrypted", { channel: CH, event: "note", data: "plain words, not JSON" });
  await until(() => bob.events(CH, "note").length === 1, "the encrypted text event on bob");
  equal(bob.events(CH, "note")[0].data, "plain words, not JSON", "bob's decrypted text");

  // Client events: the SDK itself refuses them on an encrypted channel ...
  let refusedBySdk = null;
  try {
    alice.channels[CH].channel.trigger("client-leak", { x: 1 });
  } catch (err) {
    refusedBySdk = err.message || String(err);
  }
  check(refusedBySdk !== null, "pusher-js refuses trigger() on an encrypted channel");
  emit("sdk_refusal", { message: refusedBySdk });
  // ... and the server refuses one sent past the SDK, with pusher:error.
  const errorsBefore = alice.errors.length;
  alice.pusher.send_event("client-leak", { x: 1 }, CH);
  await until(() => alice.errors.length > errorsBefore, "the server's pusher:error for the client event");
  const refusal = alice.errors[errorsBefore].data;
  check(refusal && refusal.type === "PusherError", "a pusher:error answers the client event", refusal);
  emit("server_refusal", { error: refusal });
  // An event after the refusal: the client event, had it been published, came first.
  await ask("trigger_encrypted", { channel: CH, event: "sentinel", data: { last: true } });
  await until(() => bob.events(CH, "sentinel").length === 1, "the sentinel on bob");
  equal(bob.frames.of("client-leak"), [], "client event frames delivered to bob");
  equal(alice.frames.of("client-leak"), [], "client event frames echoed to alice");
  equal([alice.state, bob.state], ["connected", "connected"], "states after the refusal");
  equal(bob.errors.length, 0, "bob's connection errors");
  alice.disconnect();
  bob.disconnect();
};

// Behind a balancer, on several nodes sharing Redis: clients on different
// nodes see one presence channel (members, member_added/removed), a client
// event crosses from one node to the other, and an event triggered through
// the HTTP API of any node (the Python server SDK) reaches everyone.
scenarios.presence_cluster = async () => {
  const CH = "presence-cluster";
  const people = {
    alice: { id: "alice", info: { name: "Alice" } },
    bob: { id: "bob", info: { name: "Bob" } },
    carol: { id: "carol", info: { name: "Carol" } },
  };
  const everyone = (labels) => Object.fromEntries(labels.map((l) => [l, people[l].info]));
  // One after the other, so that the balancer (leastconn) can spread them.
  const clients = {};
  const socketIds = {};
  for (const label of ["alice", "bob", "carol"]) {
    clients[label] = new SdkClient(label, { user: people[label] });
    socketIds[label] = await clients[label].connected();
  }
  const { alice, bob, carol } = clients;
  const nodes = await ask("nodes_of", { socket_ids: socketIds });
  emit("nodes", { nodes, socket_ids: socketIds });
  check(
    Number.isInteger(nodes.alice) && Number.isInteger(nodes.bob) && nodes.alice !== nodes.bob,
    "alice and bob are on different nodes",
    nodes,
  );

  // Members across nodes, and member_added from the other node.
  alice.subscribe(CH);
  equal(await alice.subscribed(CH), { count: 1, me: people.alice, members: everyone(["alice"]) }, "alice's members");
  bob.subscribe(CH);
  equal(await bob.subscribed(CH), {
    count: 2,
    me: people.bob,
    members: everyone(["alice", "bob"]),
  }, "bob's members (alice is on the other node)");
  await until(() => alice.events(CH, "pusher:member_added").length === 1, "alice to see bob added (from the other node)");
  equal(alice.events(CH, "pusher:member_added")[0].data, people.bob, "alice's member_added");
  carol.subscribe(CH);
  equal(await carol.subscribed(CH), {
    count: 3,
    me: people.carol,
    members: everyone(["alice", "bob", "carol"]),
  }, "carol's members");
  await until(
    () => alice.events(CH, "pusher:member_added").length === 2 && bob.events(CH, "pusher:member_added").length === 1,
    "alice and bob to see carol added",
  );
  equal(alice.events(CH, "pusher:member_added")[1].data, people.carol, "alice's second member_added");
  equal(bob.events(CH, "pusher:member_added")[0].data, people.carol, "bob's member_added");
  equal(bob.events(CH, "pusher:member_added").length + carol.events(CH, "pusher:member_added").length, 1, "member_added for those already there");

  // The HTTP API counts the cluster, whichever node answers.
  const counted = await ask("channel_info", { channel: CH });
  equal(counted, {
    info: { occupied: true, user_count: 3, subscription_count: 3 },
    users: ["alice", "bob", "carol"],
  }, "channel_info and users_info through the balancer");

  // A client event from alice's node to bob's, with alice's user id; not echoed.
  const got = { bob: [], carol: [] };
  for (const label of ["bob", "carol"]) {
    clients[label].channels[CH].channel.bind("client-wave", (data, metadata) => got[label].push({ data, metadata }));
  }
  check(alice.channels[CH].channel.trigger("client-wave", { from: "alice" }) === true, "alice's trigger() sent");
  await until(() => got.bob.length === 1 && got.carol.length === 1, "bob and carol to get alice's client event");
  equal(got.bob[0], { data: { from: "alice" }, metadata: { user_id: "alice" } }, "bob's client event (across nodes)");
  equal(got.carol[0], got.bob[0], "carol's client event");
  await ask("trigger", { channel: CH, event: "sentinel", data: { n: 1 }, via: "balancer" });
  await until(() => alice.events(CH, "sentinel").length === 1, "the sentinel on alice");
  equal(alice.events(CH, "client-wave").length, 0, "client events echoed to their sender");

  // Events triggered by the server SDK: through the balancer, then at each node.
  const vias = ["balancer", ...new Set([nodes.alice, nodes.bob, nodes.carol])];
  for (const via of vias) {
    const reply = await ask("trigger", { channel: CH, event: "announce", data: { via }, via });
    equal(reply, {}, `the HTTP API's answer (via ${via})`);
  }
  await until(
    () => ["alice", "bob", "carol"].every((l) => clients[l].events(CH, "announce").length === vias.length),
    "every announce on every client",
  );
  for (const label of ["alice", "bob", "carol"]) {
    equal(clients[label].events(CH, "announce").map((e) => e.data.via), vias, `${label}'s announces, in order`);
  }

  // Leaving: member_removed on the other nodes, the member lists shrink.
  carol.disconnect();
  await until(
    () => alice.events(CH, "pusher:member_removed").length === 1 && bob.events(CH, "pusher:member_removed").length === 1,
    "alice and bob to see carol removed",
  );
  equal(alice.events(CH, "pusher:member_removed")[0].data, people.carol, "alice's member_removed");
  equal(bob.events(CH, "pusher:member_removed")[0].data, people.carol, "bob's member_removed");
  bob.disconnect();
  await until(() => alice.events(CH, "pusher:member_removed").length === 2, "alice to see bob removed (from the other node)");
  equal(alice.events(CH, "pusher:member_removed")[1].data, people.bob, "alice's second member_removed");
  equal(members(alice.channels[CH].channel), { count: 1, me: people.alice, members: everyone(["alice"]) }, "alice's members at the end");
  equal(alice.errors.length + bob.errors.length + carol.errors.length, 0, "connection errors");
  alice.disconnect();
  emit("socket_ids", { socket_ids: socketIds });
};

// ---- run --------------------------------------------------------------------------

if (!PORT || !KEY || !SECRET || !scenarios[SCENARIO]) {
  fail(`usage: HOST=... PORT=... KEY=... SECRET=... SCENARIO=${Object.keys(scenarios).join("|")} node pusher_sdk.mjs`);
}
emit("start", { scenario: SCENARIO, host: HOST, port: PORT, key: KEY, sdk: `pusher-js ${SDK_VERSION}` });
try {
  await scenarios[SCENARIO]();
} catch (err) {
  fail(inspect(err));
}
emit("done");
process.exit(0);

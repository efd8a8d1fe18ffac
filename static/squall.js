// Squall browser client: a dependency-free ES module.
//
//   import { Squall } from "/static/squall.js";
//   const squall = new Squall("ws://host/connection/websocket", { getToken });
//   const sub = squall.subscribe("chat:lobby", { publication: (pub) => show(pub.data) });
//   squall.connect();
//
// It reconnects with exponential backoff and jitter when the server's close
// code says so (3000-3499, or the network), recovers every subscription from
// its last offset after each reconnect and never hands out an offset twice,
// refreshes the token before it expires (with `getToken`), and falls back to
// Server-Sent Events when a WebSocket cannot be opened. docs/protocol.md is
// the protocol it speaks.

const RECONNECT_CODES = [1001, 1005, 1006, 1011, 1012, 1013];

/** Whether a close code asks the client to come back. */
export function shouldReconnect(code) {
  if (code === undefined || code === null || RECONNECT_CODES.includes(code)) return true;
  return code >= 3000 && code < 3500;
}

/** Delay before reconnect attempt `attempt` (1, 2, ...): exponential, capped, jittered. */
export function backoff(attempt, min, max, random = Math.random) {
  const base = Math.min(max, min * 2 ** Math.min(attempt - 1, 20));
  return Math.round(base * (0.5 + random() / 2));
}

/** SSE resume position: what the server's Last-Event-ID parser reads. */
export function encodePositions(positions) {
  return Object.entries(positions)
    .map(([ch, p]) => `${encodeURIComponent(ch)}=${encodeURIComponent(`${p.offset}.${p.epoch}`)}`)
    .join("&");
}

export class SquallError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.reason = message;
  }
}

class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }
  emit(event, detail) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

export class Subscription extends Emitter {
  constructor(client, channel, options) {
    super();
    this.client = client;
    this.channel = channel;
    this.token = options.token ?? null;
    this.offset = options.since?.offset ?? null;
    this.epoch = options.since?.epoch ?? null;
    this.state = "unsubscribed"; // "subscribing" | "subscribed"
  }

  /** Stop receiving; the server is told when connected. */
  unsubscribe() {
    this.client._unsubscribe(this);
  }

  // Hand a publication out once: the de-duplication guard across recoveries.
  _deliver(pub) {
    if (this.epoch === pub.epoch && this.offset !== null && pub.offset <= this.offset) return;
    this.offset = pub.offset;
    this.epoch = pub.epoch;
    this.emit("publication", { channel: this.channel, ...pub });
  }
}

export class Squall extends Emitter {
  /**
   * @param {string} url WebSocket URL, e.g. "wss://host/connection/websocket".
   * @param {object} options token | getToken, sseUrl, minReconnectDelay,
   *   maxReconnectDelay, timeout, transports, WebSocket, EventSource.
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      timeout: 10000,
      transports: ["websocket", "sse"],
      sseUrl: url.replace(/^ws/, "http").replace(/\/connection\/websocket.*$/, "/connection/sse"),
      ...options,
    };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._EventSource = options.EventSource ?? globalThis.EventSource;
    this.token = options.token ?? null;
    this.state = "disconnected";
    this.transport = null; // "websocket" | "sse"
    this.client = null;
    this.subscriptions = new Map();
    this._nextId = 0;
    this._pending = new Map();
    this._attempt = 0;
    this._wsFailures = 0;
    this._timers = new Set();
    this._socket = null;
    this._wanted = false;
  }

  // ---- connection ------------------------------------------------------

  /** Open the connection (and keep it open until disconnect()). */
  connect() {
    if (this._wanted) return;
    this._wanted = true;
    this._open();
  }

  /** Close for good: no reconnect. */
  disconnect() {
    this._wanted = false;
    this._clearTimers();
    this._closeSocket(1000, "client disconnect");
    this._failPending();
    this._setState("disconnected", { code: 1000, reason: "client disconnect", reconnect: false });
  }

  _setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", { state, ...detail });
    if (state === "disconnected" || state === "connecting") {
      if (detail.code !== undefined) this.emit("disconnected", detail);
    }
  }

  _timer(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
  }

  async _token() {
    if (this.options.getToken) this.token = await this.options.getToken();
    return this.token;
  }

  _useSSE() {
    const t = this.options.transports;
    if (!t.includes("websocket") || !this._WebSocket) return t.includes("sse");
    return t.includes("sse") && this._wsFailures >= 2 && Boolean(this._EventSource);
  }

  async _open() {
    this._setState("connecting");
    let token;
    try {
      token = await this._token();
    } catch (error) {
      this.emit("error", { error });
      this._scheduleReconnect();
      return;
    }
    if (!this._wanted) return;
    if (this._useSSE()) this._openSSE(token);
    else this._openWebSocket(token);
  }

  _openWebSocket(token) {
    let opened = false;
    const ws = new this._WebSocket(this.url);
    this._socket = ws;
    this.transport = "websocket";
    ws.onopen = () => {
      opened = true;
      const onResult = (result) => this._onConnected(result);
      this._send("connect", token ? { token } : {}, onResult).catch((error) => {
        this.emit("error", { error });
      });
    };
    ws.onmessage = (event) => this._onFrame(event.data);
    ws.onclose = (event) => {
      if (this._socket !== ws) return;
      this._socket = null;
      if (!opened) this._wsFailures += 1;
      this._onClosed(event.code, event.reason);
    };
    ws.onerror = () => {}; // onclose follows with the code
  }

  _openSSE(token) {
    const params = new URLSearchParams();
    for (const channel of this.subscriptions.keys()) params.append("channel", channel);
    if (token) params.set("token", token);
    const positions = {};
    for (const sub of this.subscriptions.values()) {
      if (sub.epoch !== null && sub.offset !== null) {
        positions[sub.channel] = { offset: sub.offset, epoch: sub.epoch };
      }
    }
    if (Object.keys(positions).length) params.set("last_event_id", encodePositions(positions));
    const es = new this._EventSource(`${this.options.sseUrl}?${params}`);
    this._socket = es;
    this.transport = "sse";
    for (const sub of this.subscriptions.values()) sub.state = "subscribing";
    es.onmessage = (event) => this._onFrame(event.data);
    es.onerror = () => {
      if (this._socket !== es) return;
      // EventSource would retry on its own with a stale position: we manage
      // reconnects ourselves, like for WebSocket.
      es.close();
      this._socket = null;
      this._onClosed(undefined, "sse error");
    };
  }

  _closeSocket(code, reason) {
    const socket = this._socket;
    this._socket = null;
    if (!socket) return;
    try {
      if (this.transport === "sse") socket.close();
      else socket.close(code, reason);
    } catch {
      // already closed
    }
  }

  _onConnected(result) {
    this.client = result.client;
    this._attempt = 0;
    if (this.transport === "websocket") this._wsFailures = 0;
    this._setState("connected");
    this.emit("connected", { ...result, transport: this.transport });
    if (result.expires && this.options.getToken) {
      const ms = Math.max(1000, result.ttl * 1000 * 0.8);
      this._timer(() => this._refresh(), ms);
    }
    if (this.transport === "websocket") {
      for (const sub of this.subscriptions.values()) this._sendSubscribe(sub);
    }
  }

  async _refresh() {
    try {
      const token = await this._token();
      const result = await this._send("refresh", { token });
      this._timer(() => this._refresh(), Math.max(1000, result.ttl * 1000 * 0.8));
    } catch (error) {
      this.emit("error", { error });
    }
  }

  _onClosed(code, reason) {
    this._clearTimers();
    this._failPending();
    for (const sub of this.subscriptions.values()) {
      if (sub.state !== "unsubscribed") sub.state = "subscribing";
    }
    const reconnect = this._wanted && shouldReconnect(code);
    if (!reconnect) this._wanted = false;
    this._setState(reconnect ? "connecting" : "disconnected", { code, reason, reconnect });
    if (reconnect) this._scheduleReconnect();
  }

  _failPending() {
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(new SquallError(0, "connection closed"));
    }
    this._pending.clear();
  }

  _scheduleReconnect() {
    this._attempt += 1;
    const { minReconnectDelay, maxReconnectDelay } = this.options;
    this._timer(() => {
      if (this._wanted) this._open();
    }, backoff(this._attempt, minReconnectDelay, maxReconnectDelay));
  }

  // ---- messages --------------------------------------------------------

  _onFrame(frame) {
    for (const line of String(frame).split("\n")) {
      if (!line) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      if (msg.id !== undefined) this._onReply(msg);
      else this._onPush(msg);
    }
  }

  _onReply(msg) {
    const pending = this._pending.get(msg.id);
    if (!pending) return;
    this._pending.delete(msg.id);
    clearTimeout(pending.timer);
    if (msg.error) {
      pending.reject(new SquallError(msg.error.code, msg.error.message));
      return;
    }
    // Runs before the next line of the frame is read: a subscribe reply's
    // recovered publications go out before the live ones that follow it.
    pending.onResult?.(msg.result ?? {});
    pending.resolve(msg.result ?? {});
  }

  _onPush(msg) {
    const sub = msg.channel !== undefined ? this.subscriptions.get(msg.channel) : undefined;
    switch (msg.push) {
      case "pub":
        if (sub && sub.state !== "unsubscribed") sub._deliver(msg.pub);
        break;
      case "join":
      case "leave":
        sub?.emit(msg.push, msg.info);
        break;
      case "connect": // SSE
        this._onConnected(msg);
        break;
      case "subscribe": // SSE, or a server-side subscription
        if (sub) this._onSubscribed(sub, msg, this.transport === "sse");
        else this.emit("subscribed", msg);
        break;
      case "unsubscribe":
        if (sub) {
          sub.state = "unsubscribed";
          this.subscriptions.delete(sub.channel);
          sub.emit("unsubscribed", { code: msg.code, reason: msg.reason });
        }
        break;
      case "disconnect": // SSE: the stream ends
        this._closeSocket();
        this._onClosed(msg.reconnect ? 3000 : 3500, msg.reason);
        break;
      default:
        break;
    }
  }

  _send(method, params, onResult = null) {
    return new Promise((resolve, reject) => {
      if (this.transport !== "websocket" || !this._socket || this._socket.readyState !== 1) {
        const why = this.transport === "sse" ? "not available over SSE" : "not connected";
        reject(new SquallError(0, why));
        return;
      }
      const id = ++this._nextId;
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new SquallError(0, "timeout"));
      }, this.options.timeout);
      this._pending.set(id, { resolve, reject, timer, onResult });
      this._socket.send(JSON.stringify({ id, method, params }));
    });
  }

  /** Send a command once connected; rejects with SquallError on an error reply. */
  call(method, params = {}) {
    return this._send(method, params);
  }

  // ---- subscriptions ---------------------------------------------------

  /**
   * Subscribe to `channel`. `handlers`: { publication, subscribed, join,
   * leave, unsubscribed, error }. `options`: { token (private channels),
   * since: {offset, epoch} to start from a known position }.
   */
  subscribe(channel, handlers = {}, options = {}) {
    if (this.subscriptions.has(channel)) throw new SquallError(105, "already subscribed");
    const sub = new Subscription(this, channel, options);
    for (const [event, fn] of Object.entries(handlers)) sub.on(event, fn);
    this.subscriptions.set(channel, sub);
    sub.state = "subscribing";
    if (this.state === "connected") {
      if (this.transport === "websocket") this._sendSubscribe(sub);
      else this._reopenSSE();
    }
    return sub;
  }

  _reopenSSE() {
    this._closeSocket();
    this._open();
  }

  _sendSubscribe(sub) {
    const params = { channel: sub.channel };
    if (sub.token) params.token = sub.token;
    if (sub.epoch !== null && sub.offset !== null) {
      Object.assign(params, { recover: true, offset: sub.offset, epoch: sub.epoch });
    }
    this._send("subscribe", params, (result) => this._onSubscribed(sub, result)).then(
      () => {},
      (error) => {
        if (error.code === 0) return; // the connection went; resubscribed on reconnect
        sub.state = "unsubscribed";
        this.subscriptions.delete(sub.channel);
        sub.emit("error", { error });
      },
    );
  }

  _onSubscribed(sub, result, pubsFollow = false) {
    if (!this.subscriptions.has(sub.channel)) return;
    for (const pub of result.publications ?? []) sub._deliver(pub);
    // Continue from the stream's position: after a recovery it equals the
    // last recovered offset; after a gap (recovered: false) or a new epoch
    // it is where the live stream goes on. Over SSE the recovered
    // publications follow the subscribe event, and move the offset themselves.
    if (sub.epoch !== result.epoch || sub.offset === null) sub.offset = result.offset;
    else if (!pubsFollow) sub.offset = Math.max(sub.offset, result.offset);
    sub.epoch = result.epoch;
    sub.state = "subscribed";
    sub.emit("subscribed", {
      channel: sub.channel,
      offset: result.offset,
      epoch: result.epoch,
      recovered: result.recovered,
    });
  }

  _unsubscribe(sub) {
    if (!this.subscriptions.has(sub.channel)) return;
    this.subscriptions.delete(sub.channel);
    sub.state = "unsubscribed";
    if (this.state !== "connected") return;
    if (this.transport === "websocket") {
      this._send("unsubscribe", { channel: sub.channel }).catch(() => {});
    } else {
      this._reopenSSE();
    }
  }

  // ---- commands --------------------------------------------------------

  publish(channel, data) {
    return this._send("publish", { channel, data });
  }

  history(channel, options = {}) {
    return this._send("history", { channel, ...options });
  }

  /** Full-text search over the channels this client may subscribe to. To
   * continue live from a hit: subscribe(hit.channel, handlers,
   * { since: { offset: hit.offset - 1, epoch: hit.epoch } }). */
  search(query, options = {}) {
    return this._send("search", { query, ...options });
  }

  async presence(channel) {
    return (await this._send("presence", { channel })).presence;
  }
}

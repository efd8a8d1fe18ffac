// What the SDK scenario runners share (centrifuge_sdk.mjs, pusher_sdk.mjs):
// JSON lines to the Python harness on stdout, its answers on stdin, checks
// that end the run with a "fail" line, and bounded waits.
import { createInterface } from "node:readline";
import { inspect } from "node:util";

// The longest any single wait may take; the harness kills us after its own deadline.
export const WAIT_MS = 10000;

// ---- output -----------------------------------------------------------------

// Contexts hold Uint8Array payloads (protobuf) and 64-bit offsets: make them JSON.
export function plain(value) {
  if (value === undefined) return null;
  return JSON.parse(
    JSON.stringify(value, function (key, v) {
      const raw = this[key]; // before toJSON: a Buffer is still one
      if (typeof raw === "bigint") return Number(raw);
      if (raw instanceof Uint8Array) return { bytes: new TextDecoder().decode(raw) };
      if (v && typeof v === "object" && typeof v.toNumber === "function" && "low" in v) return v.toNumber();
      return v === undefined ? null : v;
    }),
  );
}

export function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...plain(fields) }) + "\n");
}

export function fail(reason) {
  emit("fail", { reason: String(reason) });
  process.exit(1);
}

process.on("unhandledRejection", (err) => fail(`unhandled rejection: ${inspect(err)}`));
process.on("uncaughtException", (err) => fail(`uncaught exception: ${inspect(err)}`));

export function check(condition, message, details) {
  if (!condition) fail(details === undefined ? message : `${message}: ${JSON.stringify(plain(details))}`);
}

// Objects compare whatever the order of their keys.
export function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]));
  }
  return value;
}

export function equal(actual, expected, message) {
  const a = JSON.stringify(canonical(plain(actual)));
  const e = JSON.stringify(canonical(plain(expected)));
  if (a !== e) fail(`${message}: got ${a}, expected ${e}`);
}

// ---- the harness --------------------------------------------------------------

const pending = new Map();
let requestId = 0;
createInterface({ input: process.stdin }).on("line", (line) => {
  if (!line.trim()) return;
  const reply = JSON.parse(line);
  const waiter = pending.get(reply.id);
  if (!waiter) fail(`reply to no request: ${line}`);
  pending.delete(reply.id);
  if (reply.error !== undefined) waiter.reject(new Error(`harness: ${reply.error}`));
  else waiter.resolve(reply.result);
});

export function ask(op, args = {}, timeout = 30000) {
  const id = ++requestId;
  const answer = new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
  process.stdout.write(JSON.stringify({ request: { op, ...args }, id }) + "\n");
  return within(answer, timeout, `the harness to answer ${op}`);
}

// ---- waiting --------------------------------------------------------------------

export function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  const named = promise.catch((err) => {
    throw new Error(`${what} failed: ${inspect(err)}`);
  });
  return Promise.race([named, timeout]).finally(() => clearTimeout(timer));
}

export async function until(predicate, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) fail(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

// Only for "nothing happens during this window" checks.
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

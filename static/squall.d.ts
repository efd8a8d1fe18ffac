// Types for static/squall.js, the Squall browser client.

export type State = "disconnected" | "connecting" | "connected";
export type Transport = "websocket" | "sse";

export interface ClientInfo {
  client: string;
  user: string;
  info?: unknown;
}

export interface Publication<T = unknown> {
  channel: string;
  offset: number;
  epoch: string;
  data: T;
  time: number;
  info?: ClientInfo;
}

export interface SquallOptions {
  /** A connection JWT. */
  token?: string;
  /** Called for a fresh token on every connect and before the token expires. */
  getToken?: () => Promise<string>;
  /** Default: the WebSocket URL with /connection/sse. */
  sseUrl?: string;
  /** Reconnect backoff bounds in ms (exponential with jitter). Default 500 / 20000. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Command timeout in ms. Default 10000. */
  timeout?: number;
  /** Transports in order of preference. Default ["websocket", "sse"]. */
  transports?: Transport[];
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
}

export interface StateEvent {
  state: State;
  code?: number;
  reason?: string;
  reconnect?: boolean;
}

export interface ConnectedEvent {
  client: string;
  version: string;
  node: string;
  expires: boolean;
  ttl?: number;
  transport: Transport;
}

export interface SubscribedEvent {
  channel: string;
  offset: number;
  epoch: string;
  /** Present after a recovery: false means publications were missed for good. */
  recovered?: boolean;
}

export interface SubscriptionHandlers<T = unknown> {
  publication?: (pub: Publication<T>) => void;
  subscribed?: (event: SubscribedEvent) => void;
  join?: (info: ClientInfo) => void;
  leave?: (info: ClientInfo) => void;
  unsubscribed?: (event: { code: number; reason: string }) => void;
  error?: (event: { error: SquallError }) => void;
}

export interface SearchHit<T = unknown> {
  channel: string;
  offset: number;
  epoch: string;
  /** Milliseconds since the epoch. */
  time: number;
  data: T;
  info?: ClientInfo;
}

export interface SubscribeOptions {
  /** Subscription JWT, for private namespaces. */
  token?: string;
  /** Start after this position (e.g. kept from an earlier page load). */
  since?: { offset: number; epoch: string };
}

export declare class SquallError extends Error {
  code: number;
  reason: string;
}

declare class Emitter {
  on(event: string, fn: (detail: any) => void): () => void;
  off(event: string, fn: (detail: any) => void): void;
}

export declare class Subscription<T = unknown> extends Emitter {
  readonly channel: string;
  /** The last offset handed out, and its epoch. */
  offset: number | null;
  epoch: string | null;
  state: "unsubscribed" | "subscribing" | "subscribed";
  unsubscribe(): void;
}

export declare class Squall extends Emitter {
  constructor(url: string, options?: SquallOptions);
  readonly state: State;
  readonly transport: Transport | null;
  readonly client: string | null;
  readonly subscriptions: Map<string, Subscription>;
  connect(): void;
  disconnect(): void;
  subscribe<T = unknown>(
    channel: string,
    handlers?: SubscriptionHandlers<T>,
    options?: SubscribeOptions,
  ): Subscription<T>;
  /** WebSocket only; rejects over SSE. */
  publish(channel: string, data: unknown): Promise<{ offset: number; epoch: string }>;
  history(
    channel: string,
    options?: {
      limit?: number;
      since?: { offset: number; epoch: string };
      until?: { offset: number; epoch: string };
      reverse?: boolean;
    },
  ): Promise<{ publications: Publication[]; offset: number; epoch: string }>;
  /** Full-text search (WebSocket only). Subscribe with `since: {offset:
   * hit.offset - 1, epoch: hit.epoch}` to replay from a hit and go on live. */
  search(
    query: string,
    options?: {
      channel?: string;
      user?: string;
      since?: number;
      until?: number;
      limit?: number;
      cursor?: string;
    },
  ): Promise<{ hits: SearchHit[]; cursor: string | null }>;
  presence(channel: string): Promise<Record<string, ClientInfo>>;
  call(method: string, params?: Record<string, unknown>): Promise<any>;
  on(event: "state", fn: (e: StateEvent) => void): () => void;
  on(event: "connected", fn: (e: ConnectedEvent) => void): () => void;
  on(event: "disconnected", fn: (e: StateEvent) => void): () => void;
  on(event: "error", fn: (e: { error: unknown }) => void): () => void;
}

export declare function shouldReconnect(code: number | undefined): boolean;
export declare function backoff(
  attempt: number,
  min: number,
  max: number,
  random?: () => number,
): number;
export declare function encodePositions(
  positions: Record<string, { offset: number; epoch: string }>,
): string;

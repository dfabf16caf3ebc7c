// Type declarations for ferry-client.js (Ferry's JavaScript client, `ferry.v1.json` only).

/** The WebSocket subprotocol the client speaks: `ferry.v1.json`. */
export declare const SUBPROTOCOL: 'ferry.v1.json';

export type FerryState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Where a reloaded page resumes from; `localStorage` fits. */
export interface FerryStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface FerryClientOptions {
  /**
   * A JWT, sent in `hello` (browsers cannot set headers on a WebSocket). A fixed token lasts
   * until its `exp`: then the server ends the session (`token_expired`) and the client stops.
   */
  token?: string;
  /**
   * Fetches a fresh token (takes precedence over `token`): before every connection, and to
   * refresh the session's token before it expires (at about 80% of the time left until the
   * server's `expiresAt`, at least 1 s before it), sent in an `auth` frame. A failed or refused
   * refresh is retried with backoff until expiry; an expired session reconnects with a fresh
   * token. After an `unauthorized` close it is tried once more at once (without `getToken`,
   * `unauthorized` stops the client).
   */
  getToken?: () => Promise<string> | string;
  /**
   * Which of the user's devices this client is, sent in every `hello`: 1 to 64 of
   * `A-Z a-z 0-9 . _ - :` (the constructor throws a TypeError otherwise). Each device has its
   * own acknowledged position in the inbox, so what this device has not acknowledged stays in
   * the inbox for it whatever the user's other devices acknowledge. Default: the device kept in
   * `storage`, or, with a `storage` and none kept yet, a new random one (`web-` and 16 hex
   * digits, stored at once, so a browser stays one device across reloads); without `storage`,
   * none: the user's `default` device.
   */
  device?: string;
  /** Persists `{ lastSeq, epoch, device }` on every delivery; read back at construction. */
  storage?: FerryStorage;
  /** Default `'ferry:' + url`. */
  storageKey?: string;
  /** Acks are cumulative and coalesced: at most one per interval. Default 250. */
  ackIntervalMs?: number;
  /** Reconnect backoff (jittered, exponential). Defaults 100 and 5000. */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /**
   * Application `ping` interval, default 20000 (never longer than the server's heartbeat).
   * A connection silent for two heartbeats is treated as dead and replaced.
   */
  pingIntervalMs?: number;
  /** A WebSocket constructor, when there is no global one (e.g. Node 20 without the flag). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
}

export interface FerryPosition {
  /** The highest seq delivered to the application in `epoch`, or skipped by a `gap` (0 for none). */
  lastSeq: number;
  epoch: string | null;
  /** The device sent in `hello` (see `FerryClientOptions.device`); null: the `default` device. */
  device: string | null;
}

export interface SendResult {
  id: string;
  seq: number;
  /** True when this id had already been stored (nothing new was written). */
  duplicate: boolean;
}

/** A rejected send, or a failure event: `code` is a PROTOCOL.md error code, or `closed`. */
export interface FerryError extends Error {
  code: string;
  id?: string;
}

export interface StateDetail {
  state: FerryState;
}
export interface WelcomeDetail {
  user: string;
  node: string;
  epoch: string;
  head: number;
  reset: boolean;
  heartbeatMs: number;
  /** When the session's token expires (its `exp`, unix seconds); null from older servers. */
  expiresAt: number | null;
  /** The device the server took this connection for (`default` when none was sent); null from older servers. */
  device: string | null;
  /**
   * Where delivery resumes (the position after this welcome): the server's `resume`, which is
   * the hello's `lastSeq`, or the position the server kept for this device when that is further
   * (the seqs between were acknowledged by another connection of the same device), or the end of
   * a `gap` event that follows at once; 0 after a reset.
   */
  resume: number;
}
export interface AuthedDetail {
  /** The refreshed token's `exp` (unix seconds): the session now lasts until then. */
  expiresAt: number;
}
export interface ResetDetail {
  previousEpoch: string | null;
  epoch: string;
}
export interface MessageDetail {
  seq: number;
  from: string;
  id: string;
  ts: number;
  /** A string, or bytes when the body was not UTF-8 (it came as `body_b64`). */
  body: string | Uint8Array;
}
/**
 * Messages `from..=to` of the current epoch were trimmed from the inbox before this device
 * acknowledged them (it was away longer than the server keeps a device's messages, or the inbox
 * was full while it lagged) and will never be delivered. The position has moved to `to`; recover
 * them elsewhere (e.g. re-sync history from your backend). Seqs already delivered are left out.
 */
export interface GapDetail {
  from: number;
  to: number;
}
export interface SentDetail {
  id: string;
  to: string;
  seq: number;
  duplicate: boolean;
}
/**
 * `code` is a PROTOCOL.md error code. The client goes on (state `reconnecting` or `open`) unless
 * its state turns `closed`: after `unauthorized` that no fresh token fixed, or `token_expired`
 * without `getToken`. A failed `getToken` (at connect or refresh) and a refused refresh are
 * reported as `unauthorized` while the client retries.
 */
export interface ErrorDetail {
  code: string;
  message: string;
  id?: string;
}
export interface ReconnectDetail {
  afterMs: number;
}

export interface FerryEventMap {
  state: CustomEvent<StateDetail>;
  welcome: CustomEvent<WelcomeDetail>;
  reset: CustomEvent<ResetDetail>;
  message: CustomEvent<MessageDetail>;
  gap: CustomEvent<GapDetail>;
  sent: CustomEvent<SentDetail>;
  error: CustomEvent<ErrorDetail>;
  reconnect: CustomEvent<ReconnectDetail>;
  authed: CustomEvent<AuthedDetail>;
}

export declare class FerryClient extends EventTarget {
  /** `url` is the gateway's WebSocket endpoint, e.g. `ws://127.0.0.1:8080/v1/ws`. */
  constructor(url: string, options?: FerryClientOptions);
  /** Opens; reconnects automatically with jittered exponential backoff until `close()`. */
  connect(): void;
  /** Stops for good: a last ack, then close 1000. Pending sends reject with code `closed`. */
  close(): void;
  /**
   * Sends `body` to user `to` (a Uint8Array travels as `body_b64`). `id` defaults to a random
   * one; it must be 1 to 64 of `A-Z a-z 0-9 . _ - :`. Retries with the same id on
   * `unavailable`, `rate_limited` and a disconnect; rejects with a FerryError otherwise.
   */
  send(to: string, body: string | Uint8Array, options?: { id?: string }): Promise<SendResult>;
  /** Acknowledges everything delivered so far, now. */
  ackNow(): void;
  readonly position: FerryPosition;
  readonly state: FerryState;

  addEventListener<K extends keyof FerryEventMap>(
    type: K,
    listener: (event: FerryEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof FerryEventMap>(
    type: K,
    listener: (event: FerryEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

export default FerryClient;

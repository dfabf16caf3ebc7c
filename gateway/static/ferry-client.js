// Ferry's JavaScript client: an ES module with no dependencies, for browsers and Node >= 20.
//
// It speaks the `ferry.v1.json` subprotocol of PROTOCOL.md (JSON text frames; a body is a
// string, or `body_b64` when it is bytes). It keeps the inbox position (`last_seq`, `epoch`)
// and the device it is (`device`: its own acknowledged position in the user's inbox; generated
// once and kept when a storage is given), optionally in a storage such as `localStorage`,
// reconnects with jittered exponential backoff, drops duplicate seqs, reports `gap`s (messages
// trimmed before this device acknowledged them), acknowledges cumulatively, retries sends with
// the same `id`, sends application pings, and, given `getToken`, keeps the session's token
// fresh (`auth` before it expires). See ferry-client.d.ts for the API.

export const SUBPROTOCOL = 'ferry.v1.json';

const ID_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;
const DEFAULT_HEARTBEAT_MS = 25000;
const MIN_REFRESH_MS = 1000; // the soonest a token refresh is planned (a skewed clock cannot spin it)

/** `n` random bytes as hex, from crypto.getRandomValues (Math.random only where there is none). */
function randomHex(n) {
  const c = globalThis.crypto;
  const bytes = new Uint8Array(n);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function newId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return 'm-' + c.randomUUID();
  return 'm-' + randomHex(16);
}

/** A device id for a client that keeps its position in a storage: `web-` and 16 hex digits. */
function newDeviceId() {
  return 'web-' + randomHex(8);
}

function toBase64(bytes) {
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function ferryError(code, message, id) {
  const error = new Error(message || code);
  error.code = code;
  if (id !== undefined) error.id = id;
  return error;
}

export class FerryClient extends EventTarget {
  #url;
  #options;
  #WebSocket;
  #storage;
  #storageKey;
  #token;
  #state = 'idle';
  #ws = null;
  #lastSeq = 0; // highest seq delivered to the application, skipped by a `gap`, or resumed after
  #reported = 0; // highest seq the application was told of by a message or a gap (not by a resume)
  #epoch = null;
  #device = null; // this client's device id, sent in every hello; null: the user's `default`
  #acked = 0; // highest seq acknowledged on the current connection
  #heartbeatMs = DEFAULT_HEARTBEAT_MS;
  #attempt = 0; // failed connection attempts since the last welcome
  #opens = 0; // counts #open calls and stops, so an #open that awaited getToken knows it is stale
  #tokenRetried = false;
  #authFailed = null; // the `unauthorized` error frame of the current connection
  #expired = null; // the `token_expired` error frame of the current connection
  #expiresAtMs = null; // when the current connection's token expires (its `exp`), local clock
  #refreshAttempt = 0; // failed token refreshes since the last welcome or authed
  #drainAfterMs = null; // set by a `reconnect` frame
  #welcomed = false;
  #pending = new Map(); // id -> { id, to, frame, resolve, reject, attempt, timer }
  #holdUntil = 0; // no send is written before this (Date.now() ms): a `rate_limited` answer's wait
  #timers = { reconnect: null, ack: null, ping: null, dead: null, drain: null, refresh: null };

  constructor(url, options = {}) {
    super();
    this.#url = url;
    this.#options = {
      ackIntervalMs: 250,
      backoffMinMs: 100,
      backoffMaxMs: 5000,
      pingIntervalMs: 20000,
      ...options,
    };
    this.#WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    const device = options.device ?? null;
    if (device !== null && (typeof device !== 'string' || !ID_PATTERN.test(device))) {
      throw new TypeError('options.device must be 1 to 64 of A-Z a-z 0-9 . _ - :');
    }
    this.#token = options.token;
    this.#storage = options.storage || null;
    this.#storageKey = options.storageKey || 'ferry:' + url;
    this.#load();
    if (device !== null) this.#device = device;
    else if (this.#storage && this.#device === null) this.#device = newDeviceId();
    // Stored at once, so a reload before the first message is still the same device.
    if (this.#device !== null) this.#save();
  }

  /** Where to resume from: the position (`lastSeq` of `epoch`) and the device it belongs to. */
  get position() {
    return { lastSeq: this.#lastSeq, epoch: this.#epoch, device: this.#device };
  }

  get state() {
    return this.#state;
  }

  /** Opens the connection; from now on it reconnects by itself until `close()`. */
  connect() {
    if (this.#state !== 'idle' && this.#state !== 'closed') return;
    this.#attempt = 0;
    this.#tokenRetried = false;
    this.#setState('connecting');
    this.#open();
  }

  /** Stops for good: a last ack, then close 1000. Pending sends are rejected (code `closed`). */
  close() {
    if (this.#state === 'closed') return;
    this.#flushAck();
    this.#stop();
    const closed = ferryError('closed', 'the client was closed');
    for (const entry of this.#pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(closed);
    }
    this.#pending.clear();
    this.#setState('closed');
  }

  /**
   * Sends `body` (a string, or a Uint8Array sent as `body_b64`) to user `to`. Resolves with
   * `{ id, seq, duplicate }` once stored; retries with the same id on `unavailable`,
   * `rate_limited` and a disconnect; rejects with an Error carrying `.code` otherwise.
   */
  send(to, body, { id } = {}) {
    if (id === undefined) id = newId();
    if (typeof id !== 'string' || !ID_PATTERN.test(id)) {
      return Promise.reject(ferryError('invalid', 'a message id is 1 to 64 of A-Z a-z 0-9 . _ - :', id));
    }
    if (this.#state === 'closed') {
      return Promise.reject(ferryError('closed', 'the client is closed', id));
    }
    if (this.#pending.has(id)) {
      return Promise.reject(ferryError('invalid', 'a send with this id is already pending', id));
    }
    const frame = { type: 'send', id, to };
    if (typeof body === 'string') frame.body = body;
    else if (body instanceof Uint8Array) frame.body_b64 = toBase64(body);
    else if (body instanceof ArrayBuffer) frame.body_b64 = toBase64(new Uint8Array(body));
    else return Promise.reject(ferryError('invalid', 'body must be a string or a Uint8Array', id));
    return new Promise((resolve, reject) => {
      const entry = { id, to, frame, resolve, reject, attempt: 0, timer: null };
      this.#pending.set(id, entry);
      this.#transmit(entry);
    });
  }

  /** Acknowledges everything delivered so far, now. */
  ackNow() {
    clearTimeout(this.#timers.ack);
    this.#timers.ack = null;
    this.#flushAck();
  }

  // ---- connection ----

  async #open() {
    const run = ++this.#opens;
    this.#authFailed = null;
    this.#expired = null;
    this.#drainAfterMs = null;
    this.#welcomed = false;
    if (typeof this.#options.getToken === 'function') {
      // A fresh token for every connection: the last one may have expired meanwhile.
      try {
        this.#token = await this.#options.getToken();
      } catch (e) {
        if (run !== this.#opens || this.#isStopped()) return;
        this.#emit('error', { code: 'unauthorized', message: 'getToken failed: ' + (e && e.message) });
        this.#scheduleReconnect();
        return;
      }
      if (run !== this.#opens || this.#isStopped()) return;
    }
    let ws;
    try {
      ws = new this.#WebSocket(this.#url, SUBPROTOCOL);
    } catch (e) {
      this.#emit('error', { code: 'connect', message: String((e && e.message) || e) });
      this.#scheduleReconnect();
      return;
    }
    this.#ws = ws;
    this.#acked = 0;
    this.#armDeadTimer();
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      const hello = { type: 'hello', last_seq: this.#lastSeq };
      if (this.#token !== undefined) hello.token = this.#token;
      if (this.#epoch !== null) hello.epoch = this.#epoch;
      if (this.#device !== null) hello.device = this.#device;
      this.#write(hello);
      // Giving last_seq acknowledges everything up to it.
      this.#acked = this.#lastSeq;
    };
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      this.#armDeadTimer();
      if (typeof event.data !== 'string') return; // the JSON subprotocol only sends text
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.#onFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.#ws) return;
      this.#dropped(event.code, event.reason);
    };
    // Browsers follow an error with a close; some implementations (Node 20's) do not after a
    // failed connection attempt, so an error also ends the socket if no close follows soon.
    ws.onerror = () => {
      const wait = ws.readyState === 0 ? 0 : 1000;
      setTimeout(() => {
        if (ws === this.#ws) this.#dropped(1006, 'error');
      }, wait);
    };
  }

  #isStopped() {
    return this.#state === 'closed' || this.#state === 'idle';
  }

  /** The current socket is gone (closed by the server, or declared dead). */
  #dropped(code, reason) {
    this.#detach();
    if (this.#isStopped()) return;
    const canFetch = typeof this.#options.getToken === 'function';
    const policy = code === 1008;
    const expired = this.#expired || (policy && reason === 'token_expired' ? { message: reason } : null);
    if (expired) {
      // The session outlived its token: a reconnect with a fresh one from getToken, or, with a
      // fixed token, the end.
      this.#emit('error', { code: 'token_expired', message: expired.message || 'token expired' });
      if (!canFetch) {
        this.close();
        return;
      }
    } else if (policy && (this.#authFailed || /unauthori[sz]ed/i.test(reason || ''))) {
      // Refused: one more try at once with a fresh token, then (or without getToken) the end.
      if (canFetch && !this.#tokenRetried) {
        this.#tokenRetried = true;
        this.#setState('reconnecting');
        this.#open();
        return;
      }
      const message = (this.#authFailed && this.#authFailed.message) || reason || 'unauthorized';
      this.#emit('error', { code: 'unauthorized', message });
      this.close();
      return;
    }
    this.#setState('reconnecting');
    if (this.#drainAfterMs !== null) {
      const after = this.#drainAfterMs;
      this.#drainAfterMs = null;
      this.#timers.reconnect = setTimeout(() => this.#reopen(), after);
    } else {
      this.#scheduleReconnect();
    }
  }

  /** The wait before retry number `attempt` (from 0): jittered, doubling up to backoffMaxMs. */
  #backoff(attempt) {
    const { backoffMinMs, backoffMaxMs } = this.#options;
    const ceiling = Math.min(backoffMaxMs, backoffMinMs * 2 ** Math.min(attempt, 30));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  #scheduleReconnect() {
    const delay = this.#backoff(this.#attempt);
    this.#attempt += 1;
    clearTimeout(this.#timers.reconnect);
    if (!this.#isStopped()) this.#setState('reconnecting');
    this.#timers.reconnect = setTimeout(() => this.#reopen(), delay);
  }

  #reopen() {
    this.#timers.reconnect = null;
    if (this.#isStopped()) return;
    this.#open();
  }

  /** Forgets the current socket (closing it if it is still there) and its timers. */
  #detach() {
    const ws = this.#ws;
    this.#ws = null;
    this.#welcomed = false;
    this.#expiresAtMs = null;
    for (const name of ['ack', 'ping', 'dead', 'drain', 'refresh']) {
      clearTimeout(this.#timers[name]);
      clearInterval(this.#timers[name]);
      this.#timers[name] = null;
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        if (ws.readyState === 0 || ws.readyState === 1) ws.close(1000);
      } catch {
        // already closing
      }
    }
  }

  #stop() {
    this.#opens += 1; // an #open still awaiting getToken gives up
    clearTimeout(this.#timers.reconnect);
    this.#timers.reconnect = null;
    this.#detach();
  }

  /** A connection from which nothing arrives for two heartbeats is dead. */
  #armDeadTimer() {
    clearTimeout(this.#timers.dead);
    const ws = this.#ws;
    this.#timers.dead = setTimeout(() => {
      if (ws === this.#ws) this.#dropped(4000, 'silent');
    }, 2 * this.#heartbeatMs);
  }

  #write(frame) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== 1) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  // ---- frames ----

  #onFrame(frame) {
    switch (frame.type) {
      case 'welcome':
        return this.#onWelcome(frame);
      case 'msg':
        return this.#onMsg(frame);
      case 'gap':
        return this.#onGap(frame);
      case 'sent':
        return this.#onSent(frame);
      case 'error':
        return this.#onError(frame);
      case 'authed':
        return this.#onAuthed(frame);
      case 'reconnect': {
        const afterMs = Number(frame.after_ms) || 0;
        this.#drainAfterMs = afterMs;
        this.#emit('reconnect', { afterMs });
        // The server closes with 1012; should that close not come, go anyway.
        const ws = this.#ws;
        clearTimeout(this.#timers.drain);
        this.#timers.drain = setTimeout(() => {
          if (ws === this.#ws) this.#dropped(1012, 'drain');
        }, afterMs + 1000);
        return;
      }
      default:
        return; // pong, and frames of later versions
    }
  }

  #onWelcome(frame) {
    this.#welcomed = true;
    this.#attempt = 0;
    this.#tokenRetried = false;
    this.#refreshAttempt = 0;
    this.#heartbeatMs = Number(frame.heartbeat_ms) || DEFAULT_HEARTBEAT_MS;
    this.#armDeadTimer();
    // Where delivery resumes: the server's `resume` (the hello's last_seq, the position the
    // server kept for this device when that is further, or the end of a `gap` that follows);
    // servers before devices give none.
    const resume = Number.isSafeInteger(frame.resume) && frame.resume >= 0 ? frame.resume : null;
    if (frame.reset) {
      const previousEpoch = this.#epoch;
      this.#lastSeq = resume ?? 0;
      this.#reported = 0;
      this.#acked = 0;
      this.#epoch = frame.epoch;
      this.#save();
      this.#emit('reset', { previousEpoch, epoch: frame.epoch });
    } else {
      // The server kept this device further (another connection of it acknowledged more, or
      // this client lost its position), or resumes past a `gap` that follows: at or below it
      // is a duplicate, and acks never go below it.
      const moved = resume !== null && resume > this.#lastSeq;
      if (moved) this.#lastSeq = resume;
      if (moved || frame.epoch !== this.#epoch) {
        this.#epoch = frame.epoch;
        this.#save();
      }
    }
    const every = Math.max(1, Math.min(this.#options.pingIntervalMs, this.#heartbeatMs));
    this.#timers.ping = setInterval(() => this.#write({ type: 'ping' }), every);
    this.#setState('open');
    this.#emit('welcome', {
      user: frame.user,
      node: frame.node,
      epoch: frame.epoch,
      head: frame.head,
      reset: !!frame.reset,
      heartbeatMs: this.#heartbeatMs,
      expiresAt: typeof frame.expires_at === 'number' ? frame.expires_at : null,
      device: typeof frame.device === 'string' ? frame.device : null,
      resume: this.#lastSeq,
    });
    // Sends that never got an answer go again, with the same id.
    for (const entry of this.#pending.values()) {
      if (entry.timer === null) this.#transmit(entry);
    }
    this.#planRefresh(frame.expires_at);
    // A jump is acknowledged, so the server's record of the device catches up.
    if (this.#lastSeq > this.#acked) this.#scheduleAck();
  }

  // ---- token lifetime ----

  #onAuthed(frame) {
    this.#authFailed = null;
    this.#refreshAttempt = 0;
    this.#emit('authed', { expiresAt: frame.expires_at });
    this.#planRefresh(frame.expires_at);
  }

  /**
   * After `welcome` or `authed`: with getToken, the next refresh comes at 80% of the time left
   * until `expiresAt` (unix seconds, read against the local clock), at least 1 s before it, but
   * never sooner than MIN_REFRESH_MS from now. Without getToken the session ends at expiry.
   */
  #planRefresh(expiresAt) {
    clearTimeout(this.#timers.refresh);
    this.#timers.refresh = null;
    this.#expiresAtMs = typeof expiresAt === 'number' ? expiresAt * 1000 : null;
    if (this.#expiresAtMs === null || typeof this.#options.getToken !== 'function') return;
    const left = this.#expiresAtMs - Date.now();
    const delay = Math.max(MIN_REFRESH_MS, Math.min(left * 0.8, left - 1000));
    this.#timers.refresh = setTimeout(() => this.#refresh(), delay);
  }

  /** Fetches a token and sends it in `auth`; the answer is `authed`, or `unauthorized`. */
  async #refresh() {
    this.#timers.refresh = null;
    const ws = this.#ws;
    let token;
    try {
      token = await this.#options.getToken();
    } catch (e) {
      if (ws !== this.#ws) return;
      this.#emit('error', { code: 'unauthorized', message: 'getToken failed: ' + (e && e.message) });
      this.#retryRefresh();
      return;
    }
    if (ws === this.#ws && this.#welcomed) this.#write({ type: 'auth', token });
  }

  /** A refresh failed or was refused: again after a backoff, while the current token lasts. */
  #retryRefresh() {
    const delay = this.#backoff(this.#refreshAttempt);
    this.#refreshAttempt += 1;
    clearTimeout(this.#timers.refresh);
    this.#timers.refresh = null;
    // Past expiry the server closes with `token_expired`; the reconnect fetches a token.
    if (this.#expiresAtMs === null || Date.now() + delay >= this.#expiresAtMs) return;
    this.#timers.refresh = setTimeout(() => this.#refresh(), delay);
  }

  #onMsg(frame) {
    const seq = Number(frame.seq);
    if (!(seq > this.#lastSeq)) return; // a duplicate: already delivered in this epoch
    this.#lastSeq = seq;
    this.#reported = seq;
    this.#save();
    const body = typeof frame.body_b64 === 'string' ? fromBase64(frame.body_b64) : frame.body;
    this.#emit('message', { seq, from: frame.from, id: frame.id, ts: frame.ts, body });
    this.#scheduleAck();
  }

  /**
   * Messages `from..=to` were trimmed before this device acknowledged them and will never come:
   * the position moves to `to` (acknowledged like a delivery) and the application is told, with
   * what was delivered already left out.
   */
  #onGap(frame) {
    const to = Number(frame.to);
    const from = Math.max(Number(frame.from), this.#reported + 1);
    if (!Number.isSafeInteger(to) || !(to >= from)) return; // nothing the application was not told of
    this.#reported = to;
    this.#lastSeq = Math.max(this.#lastSeq, to);
    this.#save();
    this.#emit('gap', { from, to });
    this.#scheduleAck();
  }

  #onSent(frame) {
    const entry = this.#pending.get(frame.id);
    if (!entry) return;
    this.#pending.delete(frame.id);
    clearTimeout(entry.timer);
    const result = { id: frame.id, seq: Number(frame.seq), duplicate: !!frame.duplicate };
    this.#emit('sent', { id: frame.id, to: frame.to ?? entry.to, seq: result.seq, duplicate: result.duplicate });
    entry.resolve(result);
  }

  #onError(frame) {
    const { code, message } = frame;
    const entry = frame.id !== undefined ? this.#pending.get(frame.id) : undefined;
    if (!entry) {
      if (code === 'unauthorized') {
        // A close 1008 that follows decides what to do: it always follows a refused hello, and
        // follows a refused `auth` only when its token named another user.
        this.#authFailed = { message };
        if (this.#welcomed) {
          this.#emit('error', { code, message });
          this.#retryRefresh();
        }
        return;
      }
      if (code === 'token_expired') {
        this.#expired = { message }; // reported at the close 1008 that follows
        return;
      }
      const detail = { code, message };
      if (frame.id !== undefined) detail.id = frame.id;
      this.#emit('error', detail);
      return;
    }
    if (code === 'unavailable' || code === 'rate_limited') {
      entry.attempt += 1;
      let delay;
      if (code === 'rate_limited' && frame.retry_after_ms !== undefined) {
        delay = Number(frame.retry_after_ms);
        // The wait applies to the client's sending, not only to this send.
        this.#holdUntil = Math.max(this.#holdUntil, Date.now() + delay);
      } else {
        delay = this.#backoff(entry.attempt - 1);
      }
      clearTimeout(entry.timer);
      entry.timer = setTimeout(() => {
        entry.timer = null;
        if (this.#pending.get(entry.id) === entry) this.#transmit(entry);
      }, delay);
      return;
    }
    this.#pending.delete(entry.id);
    clearTimeout(entry.timer);
    this.#emit('error', { code, message, id: entry.id });
    entry.reject(ferryError(code, message, entry.id));
  }

  /**
   * Writes a send now if the connection is welcomed and no `rate_limited` wait holds sends;
   * after the wait, or at the next welcome, otherwise.
   */
  #transmit(entry) {
    if (!this.#welcomed) return;
    const wait = this.#holdUntil - Date.now();
    if (wait > 0) {
      if (entry.timer === null) {
        entry.timer = setTimeout(() => {
          entry.timer = null;
          if (this.#pending.get(entry.id) === entry) this.#transmit(entry);
        }, wait);
      }
      return;
    }
    this.#write(entry.frame);
  }

  // ---- acknowledgements ----

  #scheduleAck() {
    if (this.#timers.ack !== null) return;
    this.#timers.ack = setTimeout(() => {
      this.#timers.ack = null;
      this.#flushAck();
    }, this.#options.ackIntervalMs);
  }

  #flushAck() {
    if (!this.#welcomed || this.#lastSeq <= this.#acked) return;
    if (this.#write({ type: 'ack', seq: this.#lastSeq })) this.#acked = this.#lastSeq;
  }

  // ---- position storage ----

  #load() {
    if (!this.#storage) return;
    try {
      const raw = this.#storage.getItem(this.#storageKey);
      if (!raw) return;
      const saved = JSON.parse(raw);
      if (Number.isSafeInteger(saved.lastSeq) && saved.lastSeq >= 0) this.#lastSeq = this.#reported = saved.lastSeq;
      if (typeof saved.epoch === 'string') this.#epoch = saved.epoch;
      if (typeof saved.device === 'string' && ID_PATTERN.test(saved.device)) this.#device = saved.device;
    } catch {
      // an unreadable position is no position
    }
  }

  #save() {
    if (!this.#storage) return;
    try {
      const saved = { lastSeq: this.#lastSeq, epoch: this.#epoch, device: this.#device };
      this.#storage.setItem(this.#storageKey, JSON.stringify(saved));
    } catch {
      // storage full or unavailable: the position stays in memory
    }
  }

  // ---- events ----

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit('state', { state });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

export default FerryClient;

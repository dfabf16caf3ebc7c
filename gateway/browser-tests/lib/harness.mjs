// Shared helpers for the browser tests: start a real gateway (and Redis) on free loopback
// ports, launch Debian's headless Chromium through playwright-core, and drive FerryClient
// instances inside a page through page.evaluate.
import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import fs from 'node:fs';
import os from 'node:os';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { before, after } from 'node:test';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, '..');
export const REPO = path.resolve(ROOT, '..', '..');
export const ARTIFACTS = path.join(ROOT, 'artifacts');
export const GATEWAY_BIN =
  process.env.FERRY_GATEWAY_BIN || path.join(REPO, 'target', 'debug', 'ferry-gateway');
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1 (bound to :0, read, closed). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves when something accepts TCP connections on 127.0.0.1:port. */
async function waitForPort(port, timeoutMs, label) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${label} did not listen on ${port} in ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Stops a child by its PID: SIGTERM, then SIGKILL after graceMs. Resumes a stopped one first. */
export async function stopProcess(child, graceMs = 3000) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  try { process.kill(child.pid, 'SIGCONT'); } catch { /* already gone */ }
  try { process.kill(child.pid, 'SIGTERM'); } catch { /* already gone */ }
  const t = setTimeout(() => { try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ } }, graceMs);
  await exited;
  clearTimeout(t);
}

const ANSI = /\x1b\[[0-9;]*m/g;

/**
 * Writes a keys file for `--api-keys-file` into a new temp dir: one key named `backend` whose
 * secret is 32 random bytes in hex, as the README's `openssl rand -hex 32` makes.
 */
function writeApiKeys() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-browser-tests-'));
  const key = crypto.randomBytes(32).toString('hex');
  const file = path.join(dir, 'keys.txt');
  fs.writeFileSync(file, `backend ${key}\n`, { mode: 0o600 });
  return { dir, file, key };
}

/** The port of `field=Some(127.0.0.1:PORT)` in a log line, or null. */
function loggedPort(line, field) {
  const m = line.match(new RegExp(`\\b${field}\\W*Some\\(127\\.0\\.0\\.1:(\\d+)\\)`));
  return m ? Number(m[1]) : null;
}

/**
 * Starts `ferry-gateway --dev` on 127.0.0.1:0 and reads the bound port from its
 * "gateway serving ... listen=Some(127.0.0.1:PORT)" log line. With `api: true` it also turns on
 * the HTTP API (`--api-listen 127.0.0.1:0`, a keys file written to a temp dir, removed at stop)
 * and reads that port from the same line's `api=Some(127.0.0.1:PORT)`; the result's `api` is
 * then `{ base, key }` (key: the secret of the file's one key, `backend`).
 */
export async function startGateway({ args = [], timeoutMs = 15000, name = 'gateway', api = false } = {}) {
  if (!fs.existsSync(GATEWAY_BIN)) throw new Error(`no gateway binary at ${GATEWAY_BIN} (run run.sh)`);
  const keys = api ? writeApiKeys() : null;
  const apiArgs = keys ? ['--api-listen', '127.0.0.1:0', '--api-keys-file', keys.file] : [];
  const child = spawn(
    GATEWAY_BIN,
    ['--dev', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--drain-timeout', '1s', ...apiArgs, ...args],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1', FERRY_LOG: process.env.FERRY_LOG || 'info' } },
  );
  const log = [];
  const logFile = path.join(ARTIFACTS, `${name}.log`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const sink = fs.createWriteStream(logFile);
  const removeKeys = () => { if (keys) fs.rmSync(keys.dir, { recursive: true, force: true }); };
  let ports;
  try {
    ports = await new Promise((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => reject(new Error(`gateway did not report its port in ${timeoutMs} ms:\n${log.join('')}`)), timeoutMs);
      const onData = (chunk) => {
        const s = chunk.toString();
        log.push(s);
        sink.write(s);
        buf += s.replace(ANSI, '');
        // The whole line, so that every field of it has arrived.
        const line = buf.match(/^.*gateway serving.*\n/m)?.[0];
        if (!line) return;
        clearTimeout(timer);
        const listen = loggedPort(line, 'listen');
        const apiPort = keys ? loggedPort(line, 'api') : null;
        if (listen === null || (keys && apiPort === null)) reject(new Error(`no port in the gateway's log line: ${line}`));
        else resolve({ listen, api: apiPort });
      };
      child.stdout.on('data', onData);
      child.stderr.on('data', onData);
      child.once('exit', (code, sig) => { clearTimeout(timer); reject(new Error(`gateway exited (${code ?? sig}) before serving:\n${log.join('')}`)); });
    });
    await waitForPort(ports.listen, timeoutMs, 'gateway');
    if (keys) await waitForPort(ports.api, timeoutMs, 'gateway HTTP API');
  } catch (e) {
    await stopProcess(child);
    sink.end();
    removeKeys();
    throw e;
  }
  return {
    port: ports.listen,
    base: `http://127.0.0.1:${ports.listen}`,
    api: keys ? { base: `http://127.0.0.1:${ports.api}`, key: keys.key } : null,
    pid: child.pid,
    log,
    async stop() { await stopProcess(child); sink.end(); removeKeys(); },
  };
}

/** Starts a throwaway redis-server (no persistence) on a free port. */
export async function startRedis({ timeoutMs = 10000 } = {}) {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (c) => { out += c; });
  child.stderr.on('data', (c) => { out += c; });
  const died = new Promise((_, reject) => child.once('exit', (c) => reject(new Error(`redis-server exited (${c}):\n${out}`))));
  died.catch(() => {});
  await Promise.race([waitForPort(port, timeoutMs, 'redis-server'), died]);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    pid: child.pid,
    pause() { process.kill(child.pid, 'SIGSTOP'); },
    resume() { process.kill(child.pid, 'SIGCONT'); },
    async stop() { await stopProcess(child); },
  };
}

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Launches Debian's Chromium (never a downloaded one); Playwright gives it a fresh temp profile. */
export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (run run.sh)`);
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30000 });
}

/**
 * A new page (own context, so own localStorage) with console errors collected, and every frame
 * its WebSockets receive (the page's own clients' too) recorded in `wsReceived` as
 * `{ socket, frame }` (socket: the page's n-th WebSocket, from 0; frame: parsed JSON).
 */
export async function newPage(browser, gw, urlPath = '/demo') {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(10000);
  const wsReceived = [];
  let sockets = 0;
  page.on('websocket', (ws) => {
    const socket = sockets++;
    ws.on('framereceived', ({ payload }) => {
      try { wsReceived.push({ socket, frame: JSON.parse(String(payload)) }); } catch { wsReceived.push({ socket, frame: { raw: String(payload) } }); }
    });
  });
  const errors = [];
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  // Failed WebSocket connects are expected (tests block reconnects on purpose) and Chromium
  // logs each one as a console error; every other console error counts.
  page.on('console', (m) => {
    if (m.type() !== 'error' || /WebSocket connection to .* failed/.test(m.text())) return;
    // Chromium asks for /favicon.ico on its own; the gateway has none.
    if (/\/favicon\.ico$/.test(m.location()?.url ?? '')) return;
    errors.push(`console: ${m.text()} (${m.location()?.url ?? '?'})`);
  });
  await page.goto(gw.base + urlPath);
  await installDriver(page);
  return { page, context, errors, wsReceived };
}

/**
 * Registers the suite's `before`/`after`: one gateway (started with `gatewayOptions`) and one
 * browser for the file, every page closed at the end. Returns `open(urlPath = '/demo')`, which
 * makes a new page (see newPage) on that gateway.
 */
export function pagesOnOneGateway(gatewayOptions) {
  let gw;
  let browser;
  const pages = [];
  before(async () => {
    gw = await startGateway(gatewayOptions);
    browser = await launchBrowser();
  });
  after(async () => {
    for (const p of pages) await p.context.close().catch(() => {});
    await browser?.close().catch(() => {});
    await gw?.stop();
  });
  return async function open(urlPath) {
    const p = await newPage(browser, gw, urlPath);
    pages.push(p);
    return p;
  };
}

/**
 * Puts `window.__t` in the page: make(name, user, opts) builds a FerryClient whose getToken asks
 * /dev/token (or, when opts.token is given, one with that fixed token and no getToken), and
 * records in __t.c[name] every event it emits (.events), every frame from the server (.frames)
 * and to it (.outgoing), and every close (.closes). Setting .tokens to 'fail' makes getToken
 * throw, to 'bad' makes it return a token that does not verify; .tokenCalls counts the calls.
 */
export async function installDriver(page) {
  await page.evaluate(async () => {
    const mod = await import('/v1/ferry-client.js');
    const EVENTS = ['state', 'welcome', 'reset', 'message', 'gap', 'sent', 'error', 'reconnect', 'authed'];
    const t = {
      FerryClient: mod.FerryClient,
      c: {},
      async token(user) {
        const r = await fetch('/dev/token?user=' + encodeURIComponent(user));
        if (!r.ok) throw new Error('/dev/token ' + r.status);
        return (await r.json()).token;
      },
      make(name, user, opts = {}) {
        const rec = {
          user, events: [], frames: [], outgoing: [], closes: [], sockets: [], blocked: false,
          tokens: 'good', tokenCalls: 0,
        };
        const getToken = async () => {
          rec.tokenCalls += 1;
          if (rec.tokens === 'fail') throw new Error('getToken made to fail by the test');
          if (rec.tokens === 'bad') return 'not.a.token';
          return t.token(user);
        };
        const o = opts.token !== undefined ? { ...opts } : { getToken, ...opts };
        if (opts.useLocalStorage) { delete o.useLocalStorage; o.storage = window.localStorage; }
        // A WebSocket that records every frame both ways and every close, keeps its sockets (so
        // a test can cut one), and while rec.blocked is set connects nowhere (so a reconnect
        // fails).
        o.WebSocket = class SpyWebSocket extends WebSocket {
          constructor(url, protocols) {
            super(rec.blocked ? 'ws://127.0.0.1:9/blocked' : url, protocols);
            rec.sockets.push(this);
            this.addEventListener('message', (e) => {
              try { rec.frames.push(JSON.parse(e.data)); } catch { rec.frames.push({ raw: String(e.data) }); }
            });
            this.addEventListener('close', (e) => rec.closes.push({ code: e.code, reason: e.reason, at: Date.now() }));
          }

          send(data) {
            try { rec.outgoing.push(JSON.parse(data)); } catch { rec.outgoing.push({ raw: String(data) }); }
            super.send(data);
          }
        };
        const client = new t.FerryClient(new URL('/v1/ws', location.href).href.replace(/^http/, 'ws'), o);
        rec.client = client;
        for (const type of EVENTS) {
          client.addEventListener(type, (ev) => {
            rec.events.push({ type, detail: JSON.parse(JSON.stringify(ev.detail ?? null)), at: Date.now() });
          });
        }
        t.c[name] = rec;
        return rec;
      },
      of(name, type) { return t.c[name].events.filter((e) => e.type === type).map((e) => e.detail); },
      messages(name) { return t.of(name, 'message'); },
      /** Cuts the client's current socket under it (as a network drop would). */
      cut(name) { for (const ws of t.c[name].sockets) if (ws.readyState <= 1) ws.close(4001, 'cut by test'); },
    };
    window.__t = t;
  });
}

/** Waits in the page until `fn(window.__t, arg)` is truthy; on timeout reports `describe`. */
export async function waitIn(page, fn, arg, { timeout = 10000, what = 'condition' } = {}) {
  try {
    // fn(t, arg) is shipped as source, so it may take both the driver and an argument.
    await page.waitForFunction(({ src, arg }) => (0, eval)(`(${src})`)(window.__t, arg), { src: fn.toString(), arg }, { timeout, polling: 50 });
  } catch (e) {
    const dump = await page.evaluate(() => {
      const out = {};
      for (const [k, v] of Object.entries(window.__t?.c ?? {})) out[k] = { state: v.client.state, events: v.events.slice(-30) };
      return out;
    }).catch(() => 'page gone');
    throw new Error(`timed out waiting for ${what}: ${e.message.split('\n')[0]}\nclients: ${JSON.stringify(dump, null, 1)}`);
  }
}

/** Makes a client, connects it and waits for its `welcome`. */
export async function connectClient(page, name, user, opts = {}) {
  await page.evaluate(({ name, user, opts }) => { window.__t.make(name, user, opts).client.connect(); }, { name, user, opts });
  await waitIn(page, (_, n) => window.__t.of(n, 'welcome').length > 0, name, { what: `${name} welcome` });
}

/** A user name that no other test (nor the demo page's own clients) uses. */
export function uniqueUser(prefix) {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}

// The README's quick start, end to end: a gateway with the HTTP API on (`--api-listen`, a keys
// file), the demo page open with bob online, then a backend's publish, made as the README's
// `curl` makes it, arrives live in bob's panel from `app`; a screenshot of that is kept in
// artifacts/demo-api.png. Publishing it again answers `duplicate: true` with the same seq, and
// bob has it once, in his panel and on the wire.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startGateway, launchBrowser, newPage, ARTIFACTS, sleep } from '../lib/harness.mjs';

let gw;
let browser;
let opened;

before(async () => {
  gw = await startGateway({ name: 'gateway-api-test', api: true });
  browser = await launchBrowser();
  opened = await newPage(browser, gw, '/demo');
});

after(async () => {
  await opened?.context.close().catch(() => {});
  await browser?.close().catch(() => {});
  await gw?.stop();
});

// The README's request body, byte for byte.
const WELCOME = '{"id":"welcome-1","to":"bob","body":"hello from the backend"}';

/**
 * `POST /v1/messages` as `curl -H "Authorization: Bearer $KEY" -d "$json" $API/v1/messages`
 * sends it: `-d` makes a POST with curl's default form content type (the API reads the body as
 * JSON whatever the Content-Type says).
 */
async function publishAsCurl(json) {
  const response = await fetch(`${gw.api.base}/v1/messages`, {
    method: 'POST',
    headers: {
      Authorization: `Bearer ${gw.api.key}`,
      Accept: '*/*',
      'Content-Type': 'application/x-www-form-urlencoded',
    },
    body: json,
  });
  const text = await response.text();
  assert.equal(response.status, 200, `POST /v1/messages ${json}: ${response.status} ${text}`);
  assert.match(response.headers.get('content-type') ?? '', /^application\/json\b/);
  return JSON.parse(text);
}

const panel = (user) => `#panel-${user}`;

async function waitState(page, user, state) {
  await page.waitForFunction(
    ([sel, state]) => document.querySelector(`${sel} [data-role=state]`)?.textContent.trim() === state,
    [panel(user), state], { timeout: 10000 },
  );
}

async function received(page, user) {
  return page.$$eval(`${panel(user)} [data-role=messages] li[data-seq]`, (lis) => lis.map((li) => ({
    seq: Number(li.dataset.seq), from: li.dataset.from, id: li.dataset.id, text: li.textContent,
  })));
}

/** The frames of bob's current socket: the last one that got a `welcome` for bob. */
function bobsSocket(wsReceived) {
  const welcomes = wsReceived.filter(({ frame }) => frame.type === 'welcome' && frame.user === 'bob');
  assert.ok(welcomes.length > 0, 'bob got a welcome');
  const { socket, frame: welcome } = welcomes.at(-1);
  return { welcome, frames: wsReceived.filter((r) => r.socket === socket).map((r) => r.frame) };
}

/** Polls `fn` until it is truthy (Playwright reports WebSocket frames asynchronously). */
async function until(fn, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const msgFrames = (wsReceived, id) => wsReceived.filter(({ frame }) => frame.type === 'msg' && frame.id === id);

let seq;

test('api: the demo page is open with bob online', { timeout: 20000 }, async () => {
  const { page } = opened;
  await page.locator(panel('alice')).waitFor();
  await page.locator(panel('bob')).waitFor();
  await waitState(page, 'alice', 'open');
  await waitState(page, 'bob', 'open');
  assert.deepEqual(await received(page, 'bob'), []);
  const bobWelcomed = () => opened.wsReceived.some(({ frame }) => frame.type === 'welcome' && frame.user === 'bob');
  await until(bobWelcomed, 'bob\'s welcome frame');
  // Gone if the page reloads or navigates: the next test checks delivery needs neither.
  await page.evaluate(() => { window.__sameDocument = true; });
});

test('api: a publish made as the README\'s curl arrives live in bob\'s panel, from app', { timeout: 20000 }, async () => {
  const { page, errors, wsReceived } = opened;
  const atStart = bobsSocket(wsReceived);
  assert.equal(atStart.welcome.head, 0, 'bob\'s inbox is empty when he comes online');

  const answer = await publishAsCurl(WELCOME);
  // The README's answer: a fresh inbox, so seq 1.
  assert.deepEqual(answer, { results: [{ to: 'bob', seq: 1, duplicate: false }] });
  seq = answer.results[0].seq;

  const li = page.locator(`${panel('bob')} [data-role=messages] li[data-id="welcome-1"]`);
  await li.waitFor({ timeout: 10000 });
  assert.deepEqual(
    (await received(page, 'bob')).map(({ seq, from, id }) => ({ seq, from, id })),
    [{ seq, from: 'app', id: 'welcome-1' }],
  );
  assert.match(await li.textContent(), /app: hello from the backend/);
  assert.deepEqual(await received(page, 'alice'), [], 'only bob is a recipient');

  // Live: the same document, and the same socket that was welcomed before the publish.
  assert.equal(await page.evaluate(() => window.__sameDocument), true, 'the page was not reloaded');
  await until(() => msgFrames(wsReceived, 'welcome-1').length > 0, 'the msg frame of welcome-1');
  const now = bobsSocket(wsReceived);
  assert.equal(now.welcome, atStart.welcome, 'bob did not reconnect');
  const msgs = now.frames.filter((f) => f.type === 'msg');
  assert.deepEqual(msgs.map(({ seq, from, id }) => ({ seq, from, id })), [{ seq, from: 'app', id: 'welcome-1' }]);

  await page.screenshot({ path: path.join(ARTIFACTS, 'demo-api.png'), fullPage: true });
  assert.deepEqual(errors, []);
});

test('api: publishing it again answers duplicate with the same seq; bob has it once', { timeout: 20000 }, async () => {
  const { page, errors, wsReceived } = opened;
  assert.ok(seq, 'the first publish was stored');
  assert.deepEqual(await publishAsCurl(WELCOME), { results: [{ to: 'bob', seq, duplicate: true }] });

  // A later message as a barrier: bob's messages arrive in seq order, so once it is in his panel
  // a second delivery of the duplicate would have come before it.
  const next = await publishAsCurl('{"id":"welcome-2","to":"bob","body":"after the retry"}');
  assert.deepEqual(next, { results: [{ to: 'bob', seq: seq + 1, duplicate: false }] });
  await page.locator(`${panel('bob')} [data-role=messages] li[data-id="welcome-2"]`).waitFor({ timeout: 10000 });

  assert.deepEqual(
    (await received(page, 'bob')).map(({ seq, from, id }) => ({ seq, from, id })),
    [{ seq, from: 'app', id: 'welcome-1' }, { seq: seq + 1, from: 'app', id: 'welcome-2' }],
  );
  // Not only hidden by the client's seq check: the server sent it once.
  await until(() => msgFrames(wsReceived, 'welcome-2').length > 0, 'the msg frame of welcome-2');
  assert.equal(msgFrames(wsReceived, 'welcome-1').length, 1, 'one msg frame for welcome-1');
  assert.equal(await page.evaluate(() => window.__sameDocument), true, 'the page was not reloaded');
  assert.deepEqual(errors, []);
});

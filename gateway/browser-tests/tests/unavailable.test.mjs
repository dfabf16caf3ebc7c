// A send retried after `unavailable`: the gateway runs on a real Redis with a short store
// timeout; the Redis process is frozen (SIGSTOP) for about a second while alice sends, so the
// gateway answers `unavailable` and the client retries with the same id until Redis is back.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startGateway, startRedis, launchBrowser, newPage, connectClient, waitIn, uniqueUser, sleep,
} from '../lib/harness.mjs';

let redis;
let gw;
let browser;
let ctx;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({
    name: 'gateway-unavailable-test',
    args: ['--redis-url', redis.url, '--store-timeout', '300ms'],
  });
  browser = await launchBrowser();
});

after(async () => {
  try { redis?.resume(); } catch { /* gone */ }
  await ctx?.close().catch(() => {});
  await browser?.close().catch(() => {});
  await gw?.stop();
  await redis?.stop();
});

test('a send that meets `unavailable` is retried with the same id and stored once', { timeout: 40000 }, async () => {
  const opened = await newPage(browser, gw);
  ctx = opened.context;
  const { page, errors } = opened;
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  // Small backoff so the retries come quickly once the store is back.
  await connectClient(page, 'alice', alice, { backoffMinMs: 100, backoffMaxMs: 400 });
  await connectClient(page, 'bob', bob);

  const warm = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'before', { id: 'un-0' }), { bob });
  await waitIn(page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets the first message' });

  redis.pause();
  let resumed = false;
  try {
    await page.evaluate(({ bob }) => {
      window.__pending = window.__t.c.alice.client.send(bob, 'during the outage', { id: 'un-1' })
        .then((v) => { window.__result = { ok: v }; }, (e) => { window.__result = { err: String(e.code || e.message) }; });
    }, { bob });
    // At least one `unavailable` must come back while Redis is frozen (store timeout 300 ms).
    await waitIn(page, () => window.__t.c.alice.frames.some((f) => f.type === 'error' && f.code === 'unavailable'), null,
      { what: 'an unavailable error frame', timeout: 5000 });
    await sleep(1000);
    assert.equal(await page.evaluate(() => window.__result), undefined, 'the send is still pending during the outage');
    redis.resume();
    resumed = true;
  } finally {
    if (!resumed) redis.resume();
  }

  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 15000 });
  const result = await page.evaluate(() => window.__result);
  assert.ok(result.ok, `the send resolved: ${JSON.stringify(result)}`);
  assert.equal(result.ok.id, 'un-1');
  assert.equal(result.ok.seq, warm.seq + 1);

  const frames = await page.evaluate(() => window.__t.c.alice.frames.filter((f) => f.id === 'un-1'));
  const unavailable = frames.filter((f) => f.type === 'error' && f.code === 'unavailable');
  assert.ok(unavailable.length >= 1, JSON.stringify(frames));
  assert.equal(frames.filter((f) => f.type === 'sent').length, 1, JSON.stringify(frames));

  // A marker after it: once bob has it, the retried message has had its chance to arrive twice.
  const marker = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'after', { id: 'un-2' }), { bob });
  await waitIn(page, (_, s) => window.__t.messages('bob').some((m) => m.seq === s), marker.seq, { what: 'bob gets the marker' });
  const got = await page.evaluate(() => window.__t.messages('bob'));
  assert.deepEqual(got.map((m) => m.id), ['un-0', 'un-1', 'un-2']);
  assert.deepEqual(got.map((m) => m.seq), [warm.seq, result.ok.seq, marker.seq]);
  assert.equal(got[1].body, 'during the outage');
  // The alice session stayed up through a one-second outage.
  assert.equal(await page.evaluate(() => window.__t.c.alice.client.state), 'open');
  assert.deepEqual(errors, []);
});

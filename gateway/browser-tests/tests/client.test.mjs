// FerryClient driven inside headless Chromium (page.evaluate on the gateway's /demo page, so
// `import('/v1/ferry-client.js')` is same-origin) against a real `ferry-gateway --dev`.
// Every test uses its own user names so neither the other tests nor the demo page's own
// clients touch its inboxes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  pagesOnOneGateway, connectClient, waitIn, uniqueUser,
} from '../lib/harness.mjs';

const open = pagesOnOneGateway({ name: 'gateway-client-test' });

const welcomes = (page, name) => page.evaluate((n) => window.__t.of(n, 'welcome').length, name);
const messages = (page, name) => page.evaluate((n) => window.__t.messages(n), name);

test('live delivery: alice sends, bob receives it at once', { timeout: 30000 }, async () => {
  const { page, errors } = await open();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  await connectClient(page, 'alice', alice);
  await connectClient(page, 'bob', bob);

  const sent = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'hello bob', { id: 'live-1' }), { bob });
  assert.equal(sent.id, 'live-1');
  assert.equal(sent.duplicate, false);
  assert.ok(Number.isInteger(sent.seq) && sent.seq >= 1, `seq ${sent.seq}`);

  await waitIn(page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets the message' });
  const got = await messages(page, 'bob');
  assert.equal(got.length, 1);
  assert.equal(got[0].seq, sent.seq);
  assert.equal(got[0].from, alice);
  assert.equal(got[0].id, 'live-1');
  assert.equal(got[0].body, 'hello bob');

  const sentEvents = await page.evaluate(() => window.__t.of('alice', 'sent'));
  assert.ok(sentEvents.some((e) => e.id === 'live-1' && e.seq === sent.seq && e.to === bob), JSON.stringify(sentEvents));
  const states = await page.evaluate(() => window.__t.of('bob', 'state').map((s) => s.state));
  assert.ok(states.length > 0, 'bob emitted state events');
  assert.deepEqual(errors, []);
});

test('offline delivery: bob\'s socket is cut, alice sends 3, bob reconnects and gets them in order', { timeout: 30000 }, async () => {
  const { page, errors } = await open();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  await connectClient(page, 'alice', alice);
  await connectClient(page, 'bob', bob);

  // One live message first, so bob has a position to resume from.
  const first = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'm0', { id: 'off-0' }), { bob });
  await waitIn(page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets m0' });

  // Cut bob's socket and keep his reconnects failing: he is offline, his client retrying.
  await page.evaluate(() => { window.__t.c.bob.blocked = true; window.__t.cut('bob'); });
  await waitIn(page, () => window.__t.c.bob.client.state === 'reconnecting', null, { what: 'bob reconnecting' });
  const pos = await page.evaluate(() => window.__t.c.bob.client.position);
  assert.equal(pos.lastSeq, first.seq);

  const seqs = [];
  for (let i = 1; i <= 3; i++) {
    const r = await page.evaluate(({ bob, i }) => window.__t.c.alice.client.send(bob, `m${i}`, { id: `off-${i}` }), { bob, i });
    seqs.push(r.seq);
  }
  assert.deepEqual(seqs, [first.seq + 1, first.seq + 2, first.seq + 3]);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await messages(page, 'bob')).length, 1, 'nothing delivered while bob is offline');
  assert.equal(await page.evaluate(() => window.__t.c.bob.client.state), 'reconnecting');

  // Let the network back: the client's own backoff brings bob back, resuming from m0.
  const w = await welcomes(page, 'bob');
  await page.evaluate(() => { window.__t.c.bob.blocked = false; });
  await waitIn(page, (_, w) => window.__t.of('bob', 'welcome').length > w, w, { what: 'bob welcome again', timeout: 15000 });
  await waitIn(page, () => window.__t.messages('bob').length >= 4, null, { what: 'bob gets the 3 missed messages' });
  await new Promise((r) => setTimeout(r, 200));
  const got = await messages(page, 'bob');
  assert.deepEqual(got.map((m) => m.seq), [first.seq, ...seqs], 'in order, each once');
  assert.deepEqual(got.map((m) => m.body), ['m0', 'm1', 'm2', 'm3']);
  assert.deepEqual(got.map((m) => m.id), ['off-0', 'off-1', 'off-2', 'off-3']);
  assert.ok(got.every((m) => m.from === alice));
  const welcome = (await page.evaluate(() => window.__t.of('bob', 'welcome'))).at(-1);
  assert.equal(welcome.reset, false);
  assert.equal(welcome.head, first.seq + 3);
  // The server never had to resend m0: the hello carried last_seq.
  const replayed = await page.evaluate(() => window.__t.c.bob.frames.filter((f) => f.type === 'msg').map((f) => f.seq));
  assert.deepEqual(replayed, [first.seq, ...seqs], 'each msg frame sent once');
  assert.equal(await page.evaluate(() => window.__t.c.bob.client.state), 'open');
  assert.deepEqual(errors, []);
});

test('reload: storage-backed resume delivers only new messages', { timeout: 30000 }, async () => {
  const { page, errors } = await open();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  const storageKey = `ferry-test:${bob}`;
  await connectClient(page, 'alice', alice);
  await connectClient(page, 'bob', bob, { useLocalStorage: true, storageKey });

  for (let i = 1; i <= 2; i++) {
    await page.evaluate(({ bob, i }) => window.__t.c.alice.client.send(bob, `before-${i}`, { id: `rl-${i}` }), { bob, i });
  }
  await waitIn(page, () => window.__t.messages('bob').length >= 2, null, { what: 'bob gets 2' });
  await page.evaluate(() => window.__t.c.bob.client.ackNow());
  const before = await page.evaluate(() => window.__t.c.bob.client.position);
  assert.equal(before.lastSeq, 2);
  assert.ok(before.epoch, 'an epoch is known');
  const stored = await page.evaluate((k) => window.localStorage.getItem(k), storageKey);
  assert.ok(stored, `the client wrote its position to localStorage[${storageKey}]`);

  // Reload the page: every in-page client is gone; the position survives in localStorage.
  await page.reload();
  const { installDriver } = await import('../lib/harness.mjs');
  await installDriver(page);
  await connectClient(page, 'alice', alice);
  await connectClient(page, 'bob', bob, { useLocalStorage: true, storageKey });
  const resumed = await page.evaluate(() => window.__t.c.bob.client.position);
  assert.equal(resumed.lastSeq, 2, 'resumed from the stored position');
  assert.equal(resumed.epoch, before.epoch);
  const welcome = (await page.evaluate(() => window.__t.of('bob', 'welcome')))[0];
  assert.equal(welcome.reset, false);

  const r = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'after-reload', { id: 'rl-3' }), { bob });
  assert.equal(r.seq, 3);
  await waitIn(page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets the new one' });
  await new Promise((res) => setTimeout(res, 300));
  const got = await messages(page, 'bob');
  assert.deepEqual(got.map((m) => m.seq), [3], 'no duplicates of 1-2 after the reload');
  assert.equal(got[0].body, 'after-reload');
  assert.deepEqual(errors, []);
});

test('duplicate suppression: the same id twice is stored once', { timeout: 30000 }, async () => {
  const { page, errors } = await open();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  await connectClient(page, 'alice', alice);
  await connectClient(page, 'bob', bob);

  const one = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'once', { id: 'dup-1' }), { bob });
  const two = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'once', { id: 'dup-1' }), { bob });
  assert.equal(one.duplicate, false);
  assert.equal(two.duplicate, true);
  assert.equal(two.seq, one.seq, 'the duplicate reports the stored seq');
  const sentEvents = await page.evaluate(() => window.__t.of('alice', 'sent').filter((e) => e.id === 'dup-1'));
  assert.deepEqual(sentEvents.map((e) => e.duplicate), [false, true]);

  // A marker after it: once bob has it, everything before it has been delivered.
  const marker = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'marker', { id: 'dup-marker' }), { bob });
  await waitIn(page, (_, s) => window.__t.messages('bob').some((m) => m.seq === s), marker.seq, { what: 'bob gets the marker' });
  const got = await messages(page, 'bob');
  assert.deepEqual(got.map((m) => m.id), ['dup-1', 'dup-marker']);
  assert.deepEqual(got.map((m) => m.seq), [one.seq, marker.seq]);
  assert.deepEqual(errors, []);
});

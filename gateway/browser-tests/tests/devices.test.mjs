// Devices: each connection names its device, and each device has its own acknowledged position
// in its user's inbox, so what one device acknowledges is still delivered to the others.
// Two tabs are two devices of bob: each page has its own browser context, so its own
// localStorage, and a FerryClient given a storage and no `device` generates its device id once
// and keeps it there. Against a real `ferry-gateway --dev`; a second one runs with
// `--device-ttl 1s`, so a device can be away long enough to lose messages and be told of the gap.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  pagesOnOneGateway, connectClient, installDriver, waitIn, uniqueUser, sleep,
} from '../lib/harness.mjs';

const DEVICE_TTL_MS = 1000;
const open = pagesOnOneGateway({ name: 'gateway-devices-test' });
const openShortTtl = pagesOnOneGateway({ name: 'gateway-devices-ttl-test', args: ['--device-ttl', `${DEVICE_TTL_MS}ms`] });

const N = 5;
const GENERATED = /^web-[0-9a-f]{16}$/;
// The server trims an acknowledged range at most every 250 ms after the ack reaches it; an
// in-process trim then takes microseconds. Whether a trim happened cannot be watched from a
// client without touching the inbox (a connection of any device is itself a holder), so a test
// that needs a trim done waits this long after the ack was written and its client closed.
const TRIM_MARGIN_MS = 600;

/** What client `name` recorded: position, state, hellos it wrote, events it emitted. */
const recorded = (page, name) => page.evaluate((n) => {
  const t = window.__t;
  const r = t.c[n];
  return {
    position: r.client.position,
    state: r.client.state,
    hellos: r.outgoing.filter((f) => f.type === 'hello').map(({ token, ...rest }) => rest),
    acks: r.outgoing.filter((f) => f.type === 'ack').map((f) => f.seq),
    welcomes: t.of(n, 'welcome'),
    messages: t.messages(n),
    gaps: t.of(n, 'gap'),
    errors: t.of(n, 'error'),
  };
}, name);

const send = (page, from, to, body, id) =>
  page.evaluate(({ from, to, body, id }) => window.__t.c[from].client.send(to, body, { id }), { from, to, body, id });

/** Waits until client `name` has written an ack at or above `seq`. */
const acked = (page, name, seq) => waitIn(page, (t, { name, seq }) =>
  t.c[name].outgoing.some((f) => f.type === 'ack' && f.seq >= seq), { name, seq }, { what: `${name} acks ${seq}` });

/** Acknowledges now, waits until the ack is written, then closes the client (close 1000). */
async function ackAndClose(page, name, seq) {
  await page.evaluate((n) => window.__t.c[n].client.ackNow(), name);
  await acked(page, name, seq);
  await page.evaluate((n) => window.__t.c[n].client.close(), name);
  await waitIn(page, (t, n) => t.c[n].client.state === 'closed', name, { what: `${name} closed` });
}

test('two devices of one user: what one tab acknowledges, the other still gets', { timeout: 45000 }, async () => {
  const tabA = await open();
  const tabB = await open();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  const asBob = { useLocalStorage: true, storageKey: `ferry-test:${bob}` };
  await connectClient(tabA.page, 'alice', alice);
  await connectClient(tabA.page, 'bob', bob, asBob);
  await connectClient(tabB.page, 'bob', bob, asBob);

  let a = await recorded(tabA.page, 'bob');
  let b = await recorded(tabB.page, 'bob');
  const deviceA = a.position.device;
  const deviceB = b.position.device;
  assert.match(deviceA, GENERATED);
  assert.match(deviceB, GENERATED);
  assert.notEqual(deviceA, deviceB, 'each tab (own localStorage) generated its own device id');
  assert.equal(a.hellos[0].device, deviceA);
  assert.equal(b.hellos[0].device, deviceB);
  assert.equal(a.welcomes[0].device, deviceA, 'the server took the device the hello named');
  assert.equal(b.welcomes[0].device, deviceB);

  // Both devices get m0 and acknowledge it: each has a position the server keeps.
  const m0 = await send(tabA.page, 'alice', bob, 'm0', 'dev-0');
  for (const tab of [tabA, tabB]) {
    await waitIn(tab.page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets m0' });
    await tab.page.evaluate(() => window.__t.c.bob.client.ackNow());
    await acked(tab.page, 'bob', m0.seq);
  }

  // Tab B goes offline: its client closes (a last ack, then close 1000); its localStorage stays.
  const beforeB = (await recorded(tabB.page, 'bob')).messages;
  await tabB.page.evaluate(() => window.__t.c.bob.client.close());
  await waitIn(tabB.page, () => window.__t.c.bob.client.state === 'closed', null, { what: 'tab B closed' });

  // N messages while B is away: tab A gets them all and acknowledges them, then closes, so its
  // last ack is applied. Under one position per user that ack deleted them from the inbox.
  const seqs = [];
  for (let i = 1; i <= N; i++) seqs.push((await send(tabA.page, 'alice', bob, `m${i}`, `dev-${i}`)).seq);
  await waitIn(tabA.page, (_, n) => window.__t.messages('bob').length >= n, N + 1, { what: 'tab A gets the N' });
  await ackAndClose(tabA.page, 'bob', seqs.at(-1));
  await sleep(TRIM_MARGIN_MS);

  // Tab A comes back as the same device: it resumes after what it acknowledged.
  await connectClient(tabA.page, 'bob-again', bob, asBob);
  a = await recorded(tabA.page, 'bob-again');
  assert.equal(a.hellos[0].device, deviceA);
  assert.equal(a.welcomes[0].resume, seqs.at(-1));

  // Tab B comes back: a reload (its clients are gone, its localStorage is not), the same device,
  // and every one of the N, in order, each once.
  await tabB.page.reload();
  await installDriver(tabB.page);
  await connectClient(tabB.page, 'bob', bob, asBob);
  b = await recorded(tabB.page, 'bob');
  assert.equal(b.position.device, deviceB, 'the reloaded tab is the same device');
  assert.equal(b.hellos[0].device, deviceB);
  assert.equal(b.hellos[0].last_seq, m0.seq);
  assert.equal(b.welcomes[0].reset, false);
  assert.equal(b.welcomes[0].resume, m0.seq, 'B resumes where B stopped, not where A did');
  await waitIn(tabB.page, (_, n) => window.__t.messages('bob').length >= n, N, { what: 'tab B gets the N' });
  await sleep(300);
  b = await recorded(tabB.page, 'bob');
  assert.deepEqual(b.messages.map((m) => m.seq), seqs);
  assert.deepEqual(b.messages.map((m) => m.body), seqs.map((_, i) => `m${i + 1}`));
  assert.deepEqual(b.gaps, [], 'nothing was lost to B');

  // Both end with every message.
  const all = [m0.seq, ...seqs];
  const gotA = (await recorded(tabA.page, 'bob')).messages.map((m) => m.seq);
  assert.deepEqual(gotA, all);
  assert.deepEqual([...beforeB.map((m) => m.seq), ...b.messages.map((m) => m.seq)], all);
  assert.deepEqual((await recorded(tabA.page, 'bob-again')).messages, [], 'A gets nothing twice');
  assert.deepEqual(tabA.errors, []);
  assert.deepEqual(tabB.errors, []);
});

test('a reload keeps the generated device id; a given device is sent as is; no storage, no device', { timeout: 30000 }, async () => {
  const { page, errors } = await open();
  const bob = uniqueUser('bob');
  const storageKey = `ferry-test:${bob}`;
  await connectClient(page, 'tab', bob, { useLocalStorage: true, storageKey });
  let r = await recorded(page, 'tab');
  const device = r.position.device;
  assert.match(device, GENERATED);
  assert.equal(r.hellos[0].device, device);
  assert.equal(r.welcomes[0].device, device);
  const stored = JSON.parse(await page.evaluate((k) => window.localStorage.getItem(k), storageKey));
  assert.equal(stored.device, device, 'kept beside the position');

  // Reloaded before any message arrived: still the same device.
  await page.reload();
  await installDriver(page);
  await connectClient(page, 'tab', bob, { useLocalStorage: true, storageKey });
  r = await recorded(page, 'tab');
  assert.equal(r.position.device, device);
  assert.equal(r.hellos[0].device, device);
  assert.equal(r.welcomes[0].device, device);

  // A device given as an option is sent as given.
  await connectClient(page, 'named', bob, { device: 'phone-1' });
  r = await recorded(page, 'named');
  assert.equal(r.position.device, 'phone-1');
  assert.equal(r.hellos[0].device, 'phone-1');
  assert.equal(r.welcomes[0].device, 'phone-1');

  // Neither an option nor a storage: the hello names no device, and the server uses `default`.
  await connectClient(page, 'plain', bob);
  r = await recorded(page, 'plain');
  assert.equal(r.position.device, null);
  assert.ok(!('device' in r.hellos[0]), JSON.stringify(r.hellos[0]));
  assert.equal(r.welcomes[0].device, 'default');

  // A device id the protocol does not allow is refused before connecting.
  const refused = await page.evaluate(() => {
    try {
      window.__t.make('bad', 'nobody', { device: 'my phone' });
      return null;
    } catch (e) {
      return e.name;
    }
  });
  assert.equal(refused, 'TypeError');
  assert.deepEqual(errors, []);
});

test('a device away longer than --device-ttl is told of the gap, then gets what follows', { timeout: 45000 }, async () => {
  const tabA = await openShortTtl();
  const tabB = await openShortTtl();
  const alice = uniqueUser('alice');
  const bob = uniqueUser('bob');
  const phone = { useLocalStorage: true, storageKey: `ferry-test:${bob}`, device: 'phone' };
  await connectClient(tabA.page, 'alice', alice);
  await connectClient(tabA.page, 'bob', bob, { device: 'laptop' });
  await connectClient(tabB.page, 'bob', bob, phone);

  const m0 = await send(tabA.page, 'alice', bob, 'm0', 'ttl-0');
  for (const tab of [tabA, tabB]) {
    await waitIn(tab.page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets m0' });
  }
  await ackAndClose(tabB.page, 'bob', m0.seq);
  // The phone is silent past the device TTL: it no longer holds the inbox.
  await sleep(DEVICE_TTL_MS + 500);

  // The laptop gets N and acknowledges them: with no other device holding, they are trimmed.
  const seqs = [];
  for (let i = 1; i <= N; i++) seqs.push((await send(tabA.page, 'alice', bob, `t${i}`, `ttl-${i}`)).seq);
  await waitIn(tabA.page, (_, n) => window.__t.messages('bob').length >= n, N + 1, { what: 'the laptop gets the N' });
  await ackAndClose(tabA.page, 'bob', seqs.at(-1));
  await sleep(TRIM_MARGIN_MS);

  // The phone comes back: welcome resumes past what it lost, a gap names it, nothing of it is
  // delivered, and the position is acknowledged past it.
  await connectClient(tabB.page, 'phone-back', bob, phone);
  await waitIn(tabB.page, () => window.__t.of('phone-back', 'gap').length >= 1, null, { what: 'the phone is told of the gap' });
  let b = await recorded(tabB.page, 'phone-back');
  assert.equal(b.hellos[0].last_seq, m0.seq);
  assert.equal(b.welcomes[0].reset, false);
  assert.equal(b.welcomes[0].resume, seqs.at(-1));
  assert.deepEqual(b.gaps, [{ from: seqs[0], to: seqs.at(-1) }]);
  assert.equal(b.position.lastSeq, seqs.at(-1));
  await acked(tabB.page, 'phone-back', seqs.at(-1));

  // What follows the gap is delivered as usual.
  const next = await send(tabA.page, 'alice', bob, 'after the gap', 'ttl-next');
  await waitIn(tabB.page, () => window.__t.messages('phone-back').length >= 1, null, { what: 'the phone gets the next one' });
  await sleep(300);
  b = await recorded(tabB.page, 'phone-back');
  assert.deepEqual(b.messages.map((m) => m.seq), [next.seq]);
  assert.equal(b.messages[0].body, 'after the gap');
  assert.equal(b.gaps.length, 1, 'told once');
  const stored = JSON.parse(await tabB.page.evaluate((k) => window.localStorage.getItem(k), phone.storageKey));
  assert.equal(stored.lastSeq, next.seq);
  assert.equal(stored.device, 'phone');
  assert.deepEqual(tabA.errors, []);
  assert.deepEqual(tabB.errors, []);
});

test('the demo page shows its device id and a gap in its log', { timeout: 45000 }, async () => {
  const bob = uniqueUser('bob');
  const alice = uniqueUser('alice');
  const demo = await openShortTtl(`/demo?users=${encodeURIComponent(bob)}`);
  const tabA = await openShortTtl();
  const panel = demo.page.locator(`[id="panel-${bob}"]`);
  const toggle = panel.locator('[data-role=toggle]');
  const waitPanelState = (state) => demo.page.waitForFunction(([user, state]) =>
    document.getElementById(`panel-${user}`)?.querySelector('[data-role=state]')?.textContent.trim() === state,
  [bob, state], { timeout: 10000 });
  const received = () => panel.locator('[data-role=messages] li[data-seq]').evaluateAll((lis) => lis.map((li) => Number(li.dataset.seq)));
  await waitPanelState('open');
  const device = (await panel.locator('[data-role=device]').textContent()).trim();
  assert.match(device, GENERATED);

  await connectClient(tabA.page, 'alice', alice);
  await connectClient(tabA.page, 'bob', bob, { device: 'laptop' });
  const m0 = await send(tabA.page, 'alice', bob, 'm0', 'demo-0');
  await waitIn(tabA.page, () => window.__t.messages('bob').length >= 1, null, { what: 'the laptop gets m0' });
  await demo.page.waitForFunction((user) =>
    document.getElementById(`panel-${user}`).querySelectorAll('[data-role=messages] li[data-seq]').length >= 1, bob);

  // The panel goes offline (its client acknowledges and closes) longer than the device TTL.
  await toggle.click();
  await waitPanelState('offline');
  await sleep(DEVICE_TTL_MS + 500);
  const seqs = [];
  for (let i = 1; i <= N; i++) seqs.push((await send(tabA.page, 'alice', bob, `d${i}`, `demo-${i}`)).seq);
  await waitIn(tabA.page, (_, n) => window.__t.messages('bob').length >= n, N + 1, { what: 'the laptop gets the N' });
  await ackAndClose(tabA.page, 'bob', seqs.at(-1));
  await sleep(TRIM_MARGIN_MS);

  await toggle.click();
  await waitPanelState('open');
  const gap = panel.locator('[data-role=messages] li.gap');
  await gap.waitFor({ timeout: 10000 });
  assert.equal(await gap.getAttribute('data-gap-from'), String(seqs[0]));
  assert.equal(await gap.getAttribute('data-gap-to'), String(seqs.at(-1)));
  assert.match(await gap.textContent(), /will not be delivered/);
  assert.equal((await panel.locator('[data-role=device]').textContent()).trim(), device, 'the same device');

  const next = await send(tabA.page, 'alice', bob, 'after the gap', 'demo-next');
  await demo.page.waitForFunction(([user, seq]) =>
    [...document.getElementById(`panel-${user}`).querySelectorAll('[data-role=messages] li[data-seq]')]
      .some((li) => Number(li.dataset.seq) === seq), [bob, next.seq]);
  assert.deepEqual(await received(), [m0.seq, next.seq], 'nothing of the gap is delivered');
  assert.deepEqual(demo.errors, []);
  assert.deepEqual(tabA.errors, []);
});

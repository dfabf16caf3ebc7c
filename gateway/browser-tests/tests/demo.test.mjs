// The demo page (`/demo`, served with --dev) as a user drives it: two panels, alice and bob,
// each showing its device id. Live delivery, then bob goes offline, alice sends 3, bob comes
// back and the 3 arrive in seq order; a screenshot of that is kept in artifacts/demo-offline.png.
// Then a reload resumes from localStorage (same devices) without redelivering anything, and a
// message from a sender with no panel (as a backend publishing as `app` would be) shows up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import {
  startGateway, launchBrowser, newPage, installDriver, connectClient, ARTIFACTS, sleep,
} from '../lib/harness.mjs';

let gw;
let browser;
let opened;

before(async () => {
  gw = await startGateway({ name: 'gateway-demo-test' });
  browser = await launchBrowser();
  opened = await newPage(browser, gw, '/demo');
});

after(async () => {
  await opened?.context.close().catch(() => {});
  await browser?.close().catch(() => {});
  await gw?.stop();
});

const panel = (user) => `#panel-${user}`;
const GENERATED = /^web-[0-9a-f]{16}$/;

const deviceOf = async (page, user) => (await page.locator(`${panel(user)} [data-role=device]`).textContent()).trim();
let devices;

async function waitState(page, user, state) {
  await page.waitForFunction(
    ([sel, state]) => document.querySelector(`${sel} [data-role=state]`)?.textContent.trim() === state,
    [panel(user), state], { timeout: 10000 },
  );
}

async function sendFromPanel(page, from, to, text) {
  const p = page.locator(panel(from));
  const toField = p.locator('[data-role=to]');
  if ((await toField.evaluate((e) => e.tagName)) === 'SELECT') await toField.selectOption(to);
  else await toField.fill(to);
  await p.locator('[data-role=text]').fill(text);
  await p.locator('[data-role=send]').click();
}

async function received(page, user) {
  return page.$$eval(`${panel(user)} [data-role=messages] li[data-seq]`,
    (lis) => lis.map((li) => ({ seq: Number(li.dataset.seq), text: li.textContent })));
}

async function waitReceived(page, user, n) {
  await page.waitForFunction(
    ([sel, n]) => document.querySelectorAll(`${sel} [data-role=messages] li[data-seq]`).length >= n,
    [panel(user), n], { timeout: 10000 },
  );
}

async function waitAllSent(page, user, n) {
  await page.waitForFunction(([sel, n]) => {
    const lis = [...document.querySelectorAll(`${sel} [data-role=sent] li`)];
    return lis.length >= n && lis.every((li) => li.dataset.state === 'sent');
  }, [panel(user), n], { timeout: 10000 });
}

test('demo page: both panels come online', { timeout: 20000 }, async () => {
  const { page } = opened;
  await page.locator('#panel-alice').waitFor();
  await page.locator('#panel-bob').waitFor();
  await waitState(page, 'alice', 'open');
  await waitState(page, 'bob', 'open');
  devices = { alice: await deviceOf(page, 'alice'), bob: await deviceOf(page, 'bob') };
  assert.match(devices.alice, GENERATED);
  assert.match(devices.bob, GENERATED);
  assert.notEqual(devices.alice, devices.bob);
});

test('demo page: live delivery from alice to bob', { timeout: 20000 }, async () => {
  const { page, errors } = opened;
  await sendFromPanel(page, 'alice', 'bob', 'hello bob (live)');
  await waitReceived(page, 'bob', 1);
  const got = await received(page, 'bob');
  assert.equal(got.length, 1);
  assert.equal(got[0].seq, 1);
  assert.match(got[0].text, /hello bob \(live\)/);
  assert.match(got[0].text, /alice/);
  await waitAllSent(page, 'alice', 1);
  assert.deepEqual(errors, []);
});

test('demo page: bob offline, alice sends 3, bob online gets them in order', { timeout: 30000 }, async () => {
  const { page, errors } = opened;
  await page.locator(`${panel('bob')} [data-role=toggle]`).click();
  await waitState(page, 'bob', 'offline');

  for (let i = 1; i <= 3; i++) await sendFromPanel(page, 'alice', 'bob', `missed ${i}`);
  await waitAllSent(page, 'alice', 4); // stored while bob is away
  const sentSeqs = await page.$$eval(`${panel('alice')} [data-role=sent] li`, (lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(sentSeqs, [1, 2, 3, 4]);
  await sleep(300);
  assert.equal((await received(page, 'bob')).length, 1, 'nothing reaches bob while offline');

  await page.locator(`${panel('bob')} [data-role=toggle]`).click();
  await waitState(page, 'bob', 'open');
  await waitReceived(page, 'bob', 4);
  await sleep(300);
  const got = await received(page, 'bob');
  assert.deepEqual(got.map((m) => m.seq), [1, 2, 3, 4], 'in seq order, each once');
  for (let i = 1; i <= 3; i++) assert.match(got[i].text, new RegExp(`missed ${i}`));

  await page.screenshot({ path: path.join(ARTIFACTS, 'demo-offline.png'), fullPage: true });
  assert.deepEqual(errors, []);
});

test('demo page: a reload resumes from localStorage without redelivering', { timeout: 30000 }, async () => {
  const { page, errors } = opened;
  await sleep(400); // past the client's 250 ms ack interval
  await page.reload();
  await waitState(page, 'alice', 'open');
  await waitState(page, 'bob', 'open');
  assert.equal(await deviceOf(page, 'alice'), devices.alice, 'the same device after a reload');
  assert.equal(await deviceOf(page, 'bob'), devices.bob);
  await sleep(500);
  assert.deepEqual(await received(page, 'bob'), [], 'seqs 1-4 are not delivered again');

  await sendFromPanel(page, 'alice', 'bob', 'after reload');
  await waitReceived(page, 'bob', 1);
  await sleep(200);
  const got = await received(page, 'bob');
  assert.deepEqual(got.map((m) => m.seq), [5]);
  assert.match(got[0].text, /after reload/);
  assert.deepEqual(errors, []);
});

test('demo page: a message from a sender with no panel (a backend publishing as app) shows up', { timeout: 20000 }, async () => {
  const { page, errors } = opened;
  await installDriver(page); // the reload above dropped it
  await connectClient(page, 'app', 'app');
  await page.evaluate(() => window.__t.c.app.client.send('alice', 'order 42 shipped', { id: 'app-1' }));
  const li = page.locator(`${panel('alice')} [data-role=messages] li[data-from=app]`);
  await li.waitFor({ timeout: 10000 });
  assert.equal(await li.getAttribute('data-id'), 'app-1');
  assert.match(await li.textContent(), /app: order 42 shipped/);
  assert.deepEqual(errors, []);
});

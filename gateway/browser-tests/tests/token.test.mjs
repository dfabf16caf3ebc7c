// Token lifetime: a gateway whose /dev/token tokens live 3 s (`--dev-token-ttl 3s`); the server
// ends a session at its token's `exp` plus a 5 s leeway, with `token_expired` and close 1008.
// With `getToken` the client refreshes the token in `auth` frames and one session outlives many
// tokens; with a fixed token the session ends at expiry and the client stops; when getToken
// fails until expiry, the client reconnects with a fresh token once it works again.
// Each test waits out at least one expiry (about 8 s), so the three run concurrently, each on
// its own page with its own users.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  pagesOnOneGateway, connectClient, waitIn, uniqueUser, sleep,
} from '../lib/harness.mjs';

const TTL_S = 3;
const LEEWAY_MS = 5000; // the server's leeway past a token's `exp`
// Long enough for the server to end a session whose token ran out.
const EXPIRY_WAIT_MS = TTL_S * 1000 + LEEWAY_MS + 5000;

const open = pagesOnOneGateway({ name: 'gateway-token-test', args: ['--dev-token-ttl', `${TTL_S}s`] });

/** Everything recorded for client `name`, and its state. */
const recorded = (page, name) => page.evaluate((n) => {
  const r = window.__t.c[n];
  return {
    state: r.client.state,
    events: r.events,
    frames: r.frames,
    outgoing: r.outgoing,
    closes: r.closes.map(({ code, reason, at }) => ({ code, reason, at })),
    sockets: r.sockets.length,
    tokenCalls: r.tokenCalls,
  };
}, name);

const ofType = (rec, type) => rec.events.filter((e) => e.type === type);

describe('token lifetime', { concurrency: true }, () => {
  test('with getToken the session outlives its tokens: auth before each expiry, messages keep coming', { timeout: 30000 }, async () => {
    const { page, errors } = await open();
    const alice = uniqueUser('alice');
    const bob = uniqueUser('bob');
    await connectClient(page, 'alice', alice);
    await connectClient(page, 'bob', bob);
    const welcome = (await page.evaluate(() => window.__t.of('bob', 'welcome')))[0];
    assert.equal(typeof welcome.expiresAt, 'number', JSON.stringify(welcome));
    const firstEnd = welcome.expiresAt * 1000 + LEEWAY_MS; // when the first token's session would end
    assert.ok(welcome.expiresAt * 1000 - Date.now() <= TTL_S * 1000, `a ${TTL_S} s token: ${welcome.expiresAt}`);

    // Alice sends bob a message every 500 ms, in the page, until stopped.
    await page.evaluate(({ bob }) => {
      const t = window.__t;
      t.ticks = { sent: 0, results: [] };
      t.ticker = setInterval(() => {
        const n = ++t.ticks.sent;
        t.c.alice.client.send(bob, `tick-${n}`, { id: `tick-${n}` })
          .then((r) => t.ticks.results.push(r.seq), (e) => t.ticks.results.push(`error ${e.code}`));
      }, 500);
    }, { bob });

    // One refresh is refused (a token that does not verify): the session goes on, and the retry,
    // with a good token again, is taken.
    await waitIn(page, () => window.__t.of('bob', 'authed').length >= 1, null, { what: 'bob\'s first authed', timeout: 5000 });
    await page.evaluate(() => {
      const rec = window.__t.c.bob;
      rec.tokens = 'bad';
      rec.client.addEventListener('error', () => { rec.tokens = 'good'; }, { once: true });
    });
    await waitIn(page, () => window.__t.c.bob.frames.some((f) => f.type === 'error' && f.code === 'unauthorized'), null,
      { what: 'bob\'s refresh refused', timeout: 5000 });

    // Past the end of the first token's session, with a margin.
    await sleep(firstEnd + 1500 - Date.now());
    await page.evaluate(() => clearInterval(window.__t.ticker));
    await waitIn(page, () => window.__t.ticks.results.length === window.__t.ticks.sent, null, { what: 'every tick answered' });
    const ticks = await page.evaluate(() => window.__t.ticks);
    assert.ok(ticks.sent >= 10, `ticks sent: ${ticks.sent}`);
    assert.ok(ticks.results.every((r) => typeof r === 'number'), JSON.stringify(ticks.results));
    const seqs = [...ticks.results].sort((a, b) => a - b);
    await waitIn(page, (_, last) => window.__t.messages('bob').some((m) => m.seq === last), seqs.at(-1), { what: 'bob gets every tick' });

    const rec = await recorded(page, 'bob');
    const got = ofType(rec, 'message');
    assert.deepEqual(got.map((m) => m.detail.seq), seqs, 'every tick, in order, once');
    assert.deepEqual(got.map((m) => m.detail.id), seqs.map((_, i) => `tick-${i + 1}`));
    assert.ok(got.at(-1).at > firstEnd, 'messages still arrive after the first token\'s session would have ended');

    // One connection throughout, its token refreshed several times.
    assert.equal(ofType(rec, 'welcome').length, 1);
    assert.equal(rec.sockets, 1);
    assert.deepEqual(rec.closes, []);
    assert.equal(rec.state, 'open');
    const authed = ofType(rec, 'authed').map((e) => e.detail.expiresAt);
    assert.ok(authed.length >= 2, `authed: ${JSON.stringify(authed)}`);
    assert.ok(authed.every((x, i) => x >= (i === 0 ? welcome.expiresAt : authed[i - 1])), `expiries move forward: ${authed}`);
    assert.ok(authed.at(-1) * 1000 + LEEWAY_MS > Date.now(), 'the current token is good');
    const auths = rec.outgoing.filter((f) => f.type === 'auth');
    const refused = rec.frames.filter((f) => f.type === 'error' && f.code === 'unauthorized');
    assert.equal(refused.length, 1, JSON.stringify(refused));
    assert.ok(auths.some((f) => f.token === 'not.a.token'), 'the refused auth carried the bad token');
    // Each auth answered once (one may still be on its way).
    const answered = authed.length + refused.length;
    assert.ok(auths.length === answered || auths.length === answered + 1, `${auths.length} auth, ${answered} answers`);
    assert.ok(auths.every((f) => typeof f.token === 'string' && f.token.length > 0));
    assert.deepEqual(rec.frames.filter((f) => f.type === 'error' && f.code !== 'unauthorized'), []);
    assert.deepEqual(ofType(rec, 'error').map((e) => e.detail.code), ['unauthorized'], 'only the refusal was reported');

    // Alice (the sender) refreshed too, on one connection.
    const a = await recorded(page, 'alice');
    assert.equal(ofType(a, 'welcome').length, 1);
    assert.ok(ofType(a, 'authed').length >= 2);
    assert.deepEqual(a.closes, []);
    assert.deepEqual(errors, []);
  });

  test('a fixed token: the session ends at expiry with token_expired and close 1008, and the client stops', { timeout: 30000 }, async () => {
    const { page, errors } = await open();
    const alice = uniqueUser('alice');
    const bob = uniqueUser('bob');
    await connectClient(page, 'alice', alice);
    const token = await page.evaluate((u) => window.__t.token(u), bob);
    await connectClient(page, 'bob', bob, { token });
    const welcome = (await page.evaluate(() => window.__t.of('bob', 'welcome')))[0];
    assert.equal(typeof welcome.expiresAt, 'number', JSON.stringify(welcome));

    // While the token is good, messages arrive.
    await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'in time', { id: 'fixed-1' }), { bob });
    await waitIn(page, () => window.__t.messages('bob').length >= 1, null, { what: 'bob gets a message' });

    await waitIn(page, () => window.__t.c.bob.client.state === 'closed', null, { what: 'bob closed at expiry', timeout: EXPIRY_WAIT_MS });
    await sleep(1000); // time enough for a reconnect, which must not happen
    const rec = await recorded(page, 'bob');
    assert.deepEqual(rec.frames.filter((f) => f.type === 'error').map((f) => f.code), ['token_expired']);
    assert.equal(rec.frames.at(-1).type, 'error', 'token_expired is the last frame');
    assert.deepEqual(rec.closes.map(({ code, reason }) => ({ code, reason })), [{ code: 1008, reason: 'token_expired' }]);
    const end = welcome.expiresAt * 1000 + LEEWAY_MS;
    const closedAt = rec.closes[0].at;
    assert.ok(closedAt >= end - 250 && closedAt <= end + 2500, `closed ${closedAt - end} ms after exp + leeway`);
    const reported = ofType(rec, 'error').map((e) => e.detail);
    assert.deepEqual(reported.map((e) => e.code), ['token_expired'], JSON.stringify(reported));
    assert.equal(rec.state, 'closed');
    assert.equal(ofType(rec, 'state').at(-1).detail.state, 'closed');
    assert.equal(rec.sockets, 1, 'no reconnect with the expired token');
    assert.equal(rec.tokenCalls, 0);
    assert.deepEqual(rec.outgoing.filter((f) => f.type === 'auth'), [], 'nothing to refresh with');
    assert.deepEqual(ofType(rec, 'authed'), []);
    assert.deepEqual(errors, []);
  });

  test('getToken failing until expiry: token_expired, then a reconnect with a fresh token', { timeout: 30000 }, async () => {
    const { page, errors } = await open();
    const alice = uniqueUser('alice');
    const bob = uniqueUser('bob');
    await connectClient(page, 'alice', alice);
    await connectClient(page, 'bob', bob, { backoffMaxMs: 1000 });
    await page.evaluate(() => { window.__t.c.bob.tokens = 'fail'; });
    const welcome = (await page.evaluate(() => window.__t.of('bob', 'welcome')))[0];

    await waitIn(page, () => window.__t.c.bob.closes.length >= 1, null, { what: 'bob\'s session ends', timeout: EXPIRY_WAIT_MS });
    let rec = await recorded(page, 'bob');
    assert.deepEqual(rec.closes.map(({ code, reason }) => ({ code, reason })), [{ code: 1008, reason: 'token_expired' }]);
    const closedAt = rec.closes[0].at;
    assert.ok(closedAt >= welcome.expiresAt * 1000 + LEEWAY_MS - 250, 'not before exp + leeway');
    const failedBefore = ofType(rec, 'error').filter((e) => e.at < closedAt);
    assert.ok(failedBefore.length >= 2, `the refresh was retried: ${JSON.stringify(failedBefore)}`);
    assert.ok(failedBefore.every((e) => e.detail.code === 'unauthorized' && /getToken failed/.test(e.detail.message)));
    assert.deepEqual(rec.outgoing.filter((f) => f.type === 'auth'), [], 'no token, no auth');
    assert.ok(ofType(rec, 'error').some((e) => e.detail.code === 'token_expired'), 'token_expired reported');
    assert.notEqual(rec.state, 'closed', 'an expiry with getToken is not the end');

    // Bob is out; alice's message waits in his inbox until getToken works again.
    const sent = await page.evaluate(({ bob }) => window.__t.c.alice.client.send(bob, 'while expired', { id: 'exp-1' }), { bob });
    await page.evaluate(() => { window.__t.c.bob.tokens = 'good'; });
    await waitIn(page, () => window.__t.of('bob', 'welcome').length >= 2, null, { what: 'bob welcomed again', timeout: 10000 });
    await waitIn(page, (_, s) => window.__t.messages('bob').some((m) => m.seq === s), sent.seq, { what: 'bob gets the message' });

    rec = await recorded(page, 'bob');
    assert.equal(rec.state, 'open');
    const hellos = rec.outgoing.filter((f) => f.type === 'hello');
    assert.equal(hellos.length, 2, 'one reconnect');
    assert.notEqual(hellos[1].token, hellos[0].token, 'the reconnect said hello with a fresh token');
    const second = ofType(rec, 'welcome')[1].detail;
    assert.ok(second.expiresAt > welcome.expiresAt);
    assert.equal(second.reset, false);
    assert.deepEqual(ofType(rec, 'message').map((m) => m.detail.id), ['exp-1']);
    assert.deepEqual(errors, []);
  });
});

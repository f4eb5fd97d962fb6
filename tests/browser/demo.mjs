// End-to-end tests of the browser client (/sessionhub.js) and the demo app in a real
// headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core; no
// browser is ever downloaded).
//
// Run by tests/tests/browser.rs, which starts Redis, two nodes with the demo on and
// a TCP proxy in front of them, and also the deployment of scripts/cluster.sh (Redis,
// three nodes, the shipped nginx config), and passes:
//   SESSIONHUB_NODE_A, SESSIONHUB_NODE_B   http://127.0.0.1:<port> of node-a, node-b
//   SESSIONHUB_PROXY                       the proxy (node-a first, then node-b)
//   SESSIONHUB_NGINX                       the nginx URL of the cluster.sh deployment
//   SESSIONHUB_ARTIFACTS                   where screenshots go
//   SESSIONHUB_CLOSED_PORT                 a loopback port nothing listens on
//   SESSIONHUB_UPDATE_DOCS=1               also rewrite docs/demo-notification.png
// It talks to the Rust test over stdout/stdin: "@@token <cookie>" lines hand it
// every session token (for the harness's token-leak scan), and "@@kill node-a"
// asks it to SIGKILL a node, answered by "ok" on stdin.
//
// Every wait is a Playwright wait with a timeout; none is a fixed sleep.

import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run this through tests/tests/browser.rs`);
  return v.replace(/\/$/, '');
};
const NODE_A = env('SESSIONHUB_NODE_A');
const NODE_B = env('SESSIONHUB_NODE_B');
const PROXY = env('SESSIONHUB_PROXY');
const NGINX = env('SESSIONHUB_NGINX');
const ARTIFACTS = env('SESSIONHUB_ARTIFACTS');
const API_KEY = env('SESSIONHUB_API_KEY');
const DOCS_DIR = process.env.SESSIONHUB_UPDATE_DOCS === '1'
  ? new URL('../../docs/', import.meta.url).pathname
  : null;
const DOCS_PNG = process.env.SESSIONHUB_UPDATE_DOCS === '1'
  ? new URL('../../docs/demo-notification.png', import.meta.url).pathname
  : null;
mkdirSync(ARTIFACTS, { recursive: true });
for (const f of readdirSync(ARTIFACTS)) if (f.endsWith('.png')) rmSync(join(ARTIFACTS, f));

/** Generous: a loaded 2-core machine. Bounds the issue states are asserted apart. */
const WAIT = 8000;
/** The issue's bound: the other session's page shows the notification within it. */
const NOTIFY_BOUND_MS = 2000;

const UA = {
  linuxChrome:
    'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36',
  macFirefox: 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:140.0) Gecko/20100101 Firefox/140.0',
  iphoneSafari:
    'Mozilla/5.0 (iPhone; CPU iPhone OS 18_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.5 Mobile/15E148 Safari/604.1',
  windowsEdge:
    'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/140.0.0.0 Safari/537.36 Edg/140.0.0.0',
};

// ---- talking to the Rust test --------------------------------------------------

const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function control(command) {
  console.log(`@@${command}`);
  let timer;
  const answer = await Promise.race([
    stdin.next(),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer to @@${command}`)), 15000);
    }),
  ]).finally(() => clearTimeout(timer));
  assert.match(String(answer.value), /^ok\b/, `answer to @@${command}`);
}

// ---- browser helpers --------------------------------------------------------------

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  timeout: 30000,
});

const problems = []; // page errors and CSP violations: each fails the run
const consoleLog = []; // every page's console, printed on failure
const open = []; // {name, ctx, page} of every context still open

/** A phone: the viewport of an iPhone 12–15 (390 × 844 CSS px), touch, 3× pixels. */
const PHONE = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 3 };

/** A fresh browser context (its own cookie jar) with one page. */
async function newPage(name, userAgent, device = {}) {
  const ctx = await browser.newContext({
    userAgent,
    viewport: { width: 1040, height: 700 },
    deviceScaleFactor: 1,
    locale: 'en-GB',
    timezoneId: 'UTC',
    ...device,
  });
  ctx.setDefaultTimeout(WAIT);
  const page = await ctx.newPage();
  page.on('pageerror', (e) => problems.push(`${name}: uncaught ${e.stack || e}`));
  page.on('console', (m) => {
    consoleLog.push(`${name} [${m.type()}] ${m.text()}`);
    if (/Content Security Policy|Refused to (load|execute|apply)/i.test(m.text())) {
      problems.push(`${name}: ${m.text()}`);
    }
  });
  const p = { name, ctx, page };
  open.push(p);
  return p;
}

async function closeAll() {
  for (const p of open.splice(0)) await p.ctx.close();
}

const byId = (page, id) => page.getByTestId(id);
const view = (page, v) => page.locator(`body[data-view="${v}"]`).waitFor();
/** Waits until the page's socket has its hello from `node` (any node if null). */
async function connected(page, node = null) {
  const sel = node
    ? `[data-testid="conn-status"][data-state="open"][data-node="${node}"]`
    : '[data-testid="conn-status"][data-state="open"]';
  await page.locator(sel).waitFor({ timeout: WAIT });
}
const sessionCount = (page, n) =>
  page.locator(`[data-testid="sessions-summary"][data-count="${n}"]`).waitFor();
const notification = (page, sessionId) =>
  page.locator(`[data-testid="notification"][data-session-id="${sessionId}"]`);

/** Opens the demo at `base`, signs in as `user` and waits for the live socket. */
async function login(p, base, user) {
  const { page } = p;
  await page.goto(`${base}/`);
  await view(page, 'login');
  await byId(page, 'demo-warning').waitFor();
  await byId(page, 'login-user').fill(user);
  const [res] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/demo/login')),
    byId(page, 'login-submit').click(),
  ]);
  assert.equal(res.status(), 200, `${p.name}: POST /demo/login`);
  const body = await res.json();
  assert.equal(body.user_id, user);
  await handOverToken(p);
  await view(page, 'app');
  return body.session_id;
}

/** Tells the Rust test the session cookie, so its leak scan looks for it. */
async function handOverToken(p) {
  const cookie = (await p.ctx.cookies()).find((c) => c.name === 'sh_session');
  assert.ok(cookie, `${p.name}: no sh_session cookie after login`);
  assert.ok(cookie.httpOnly, 'the session cookie is HttpOnly');
  assert.equal(cookie.sameSite, 'Lax');
  console.log(`@@token ${cookie.value}`);
}

/** Signed out: the login page shows now, and still after a reload. */
async function signedOutForGood(p, reason, shot = null) {
  await view(p.page, 'login');
  await p.page.locator(`[data-testid="login-notice"][data-reason="${reason}"]`).waitFor();
  if (shot) await screenshot(p.page, shot);
  await p.page.reload();
  await view(p.page, 'login');
  assert.equal(await byId(p.page, 'app-view').isVisible(), false, `${p.name}: signed in after reload`);
}

async function screenshot(page, file, fullPage = false) {
  await page.mouse.move(0, 0); // no hover effect in the picture
  await page.screenshot({ path: join(ARTIFACTS, file), animations: 'disabled', fullPage });
}

/** The node a page's socket is on (from its connection status). */
const nodeOf = (page) => byId(page, 'conn-status').getAttribute('data-node');

// ---- scenarios ----------------------------------------------------------------------

// 1. alice on node A sees alice's new login on node B within 2 s, with its browser,
//    address and time, and ends it: that page goes to the login page, for good.
async function notifyAndEnd() {
  const one = await newPage('1:ctx1', UA.linuxChrome);
  await login(one, NODE_A, 'alice');
  await connected(one.page, 'node-a');
  await sessionCount(one.page, 1);

  const two = await newPage('1:ctx2', UA.macFirefox);
  await two.page.goto(`${NODE_B}/`);
  await view(two.page, 'login');
  await byId(two.page, 'login-user').fill('alice');
  await screenshot(two.page, 'login.png');
  const t0 = Date.now();
  const [res] = await Promise.all([
    two.page.waitForResponse((r) => r.url().endsWith('/demo/login')),
    byId(two.page, 'login-submit').click(),
  ]);
  const { session_id: s2 } = await res.json();
  const note = notification(one.page, s2);
  await note.waitFor({ timeout: WAIT });
  const elapsed = Date.now() - t0;
  console.log(`  notification shown ${elapsed} ms after the click in the other context`);
  assert.ok(elapsed <= NOTIFY_BOUND_MS, `notification took ${elapsed} ms (bound ${NOTIFY_BOUND_MS} ms)`);
  await handOverToken(two);

  assert.equal(await byId(note, 'notification-message').textContent(), 'You logged in to another session');
  assert.equal(await byId(note, 'notification-device').textContent(), 'Firefox on macOS');
  assert.equal(await byId(note, 'notification-address').textContent(), '127.0.0.1');
  const time = await byId(note, 'notification-time').getAttribute('datetime');
  assert.ok(Math.abs(Date.parse(time) - Date.now()) < 60000, `notification time ${time}`);

  // Both pages live, the list up to date: the picture for the README.
  await connected(two.page, 'node-b');
  await sessionCount(one.page, 2);
  const row2 = one.page.locator(`[data-testid="session-row"][data-session-id="${s2}"]`);
  await row2.locator('[data-testid="session-connections"][data-count="1"]').waitFor();
  assert.equal(await byId(row2, 'session-device').textContent(), 'Firefox on macOS');
  const mine = one.page.locator('[data-testid="session-row"][data-current="true"]');
  assert.equal(await byId(mine, 'session-current-badge').isVisible(), true);
  assert.equal(await byId(mine, 'session-device').textContent(), 'Chrome on Linux');
  await screenshot(one.page, 'notification.png');
  if (DOCS_PNG) {
    // The README's picture: the page down to its footnote.
    const foot = await one.page.locator('.footnote').boundingBox();
    const clip = { x: 0, y: 0, width: 1040, height: Math.ceil(foot.y + foot.height + 24) };
    await one.page.screenshot({ path: DOCS_PNG, clip, animations: 'disabled' });
  }

  await byId(note, 'notification-end').click();
  await signedOutForGood(two, 'killed', 'ended.png');
  await note.waitFor({ state: 'detached' });
  await sessionCount(one.page, 1);
  await byId(one.page, 'status-message').filter({ hasText: 'Ended the session on Firefox on macOS' }).waitFor();
  await connected(one.page, 'node-a');
  await closeAll();
}

// 2. Dismiss hides the notification and ends nothing.
async function dismiss() {
  const one = await newPage('2:ctx1', UA.linuxChrome);
  await login(one, NODE_A, 'bob');
  await connected(one.page, 'node-a');
  const two = await newPage('2:ctx2', UA.iphoneSafari);
  const s2 = await login(two, NODE_B, 'bob');
  const note = notification(one.page, s2);
  await note.waitFor();
  assert.equal(await byId(note, 'notification-device').textContent(), 'Safari on iOS');
  await byId(note, 'notification-dismiss').click();
  await note.waitFor({ state: 'detached' });

  // Nothing ended: both still listed, the other page still signed in and live,
  // also after a reload.
  await connected(two.page, 'node-b');
  await sessionCount(one.page, 2);
  await two.page.reload();
  await view(two.page, 'app');
  await connected(two.page, 'node-b');
  await sessionCount(two.page, 2);
  assert.equal(await byId(one.page, 'app-view').isVisible(), true);
  assert.equal(await notification(one.page, s2).count(), 0, 'the dismissed notification came back');

  // Signing out of the current session (the header button) ends only that one.
  await byId(two.page, 'logout-button').click();
  await signedOutForGood(two, 'logout');
  await sessionCount(one.page, 1); // the list's periodic refresh
  await connected(one.page, 'node-a');
  await closeAll();
}

// 3. "Sign out all other sessions" logs out two others, one on each node.
async function signOutOthers() {
  const one = await newPage('3:ctx1', UA.linuxChrome);
  await login(one, NODE_A, 'carol');
  await connected(one.page, 'node-a');
  const two = await newPage('3:ctx2', UA.windowsEdge);
  await login(two, NODE_A, 'carol');
  await connected(two.page, 'node-a');
  const three = await newPage('3:ctx3', UA.macFirefox);
  await login(three, NODE_B, 'carol');
  await connected(three.page, 'node-b');

  await sessionCount(one.page, 3);
  await one.page.waitForFunction(
    () => document.querySelectorAll('[data-testid="session-connections"][data-count="1"]').length === 3,
    null,
    { timeout: WAIT },
  );
  await byId(one.page, 'notification').nth(1).waitFor(); // one for each new login
  for (const b of (await byId(one.page, 'notification-dismiss').all()).reverse()) await b.click();
  await byId(one.page, 'notification').first().waitFor({ state: 'detached' });
  await screenshot(one.page, 'sessions.png');

  await byId(one.page, 'signout-others').click();
  await byId(one.page, 'status-message').filter({ hasText: 'Signed out 2 other sessions.' }).waitFor();
  await signedOutForGood(two, 'killed');
  await signedOutForGood(three, 'killed');
  await sessionCount(one.page, 1);
  assert.equal(await byId(one.page, 'signout-others').isDisabled(), true);
  await connected(one.page, 'node-a');
  await closeAll();
}

// 11. With the network gone, End Session, Sign out all other sessions and Sign out
//     say the server is not reachable and stay usable (End Session stuck on
//     "Ending…" and Sign out claiming success were the bugs); back online, they work.
async function offline() {
  const one = await newPage('11:ctx1', UA.linuxChrome);
  await login(one, NODE_A, 'oscar');
  await connected(one.page, 'node-a');
  const two = await newPage('11:ctx2', UA.macFirefox);
  const other = await login(two, NODE_B, 'oscar');
  await connected(two.page, 'node-b');
  await notification(one.page, other).waitFor();

  await one.ctx.setOffline(true);
  await one.page.locator('[data-testid="conn-status"]:not([data-state="open"])').waitFor();
  const unreachable = (what) =>
    byId(one.page, 'status-message').filter({ hasText: `Could not ${what}: the server is not reachable` });
  const end = notification(one.page, other).getByTestId('notification-end');
  await end.click();
  await unreachable('end the session').waitFor();
  await one.page.waitForFunction(
    (sid) => {
      const b = document.querySelector(`[data-session-id="${sid}"] [data-testid="notification-end"]`);
      return b && !b.disabled && b.textContent === 'End Session';
    },
    other,
    { timeout: WAIT },
  );
  await byId(one.page, 'signout-others').click();
  await unreachable('sign out the other sessions').waitFor();
  assert.equal(await byId(one.page, 'signout-others').isDisabled(), false);
  await byId(one.page, 'logout-button').click();
  await unreachable('sign out').waitFor();
  await view(one.page, 'app');

  await one.ctx.setOffline(false);
  await connected(one.page);
  await end.click();
  await signedOutForGood(two, 'killed');
  await byId(one.page, 'logout-button').click();
  await signedOutForGood(one, 'logout');
  await closeAll();
}

// The client module on its own, in a page of node B: the backoff ceilings, a refused
// upgrade, killSession's answers.
async function clientModule() {
  const p = await newPage('client', UA.linuxChrome);
  await login(p, NODE_B, 'erin');
  await connected(p.page, 'node-b');

  // killSession resolves once done, rejects with the server's error frame.
  const kill = await p.page.evaluate(async () => {
    const { SessionHub } = await import('/sessionhub.js');
    const hub = new SessionHub();
    await new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error('no hello in 10 s')), 10000);
      hub.on('hello', resolve);
      hub.connect();
    });
    const unknown = await hub.killSession('0123456789abcdef0123456789abcdef').then(
      () => 'resolved',
      (e) => e.frame?.code ?? String(e),
    );
    await hub.ping();
    hub.close();
    return { unknown, state: hub.state };
  });
  assert.deepEqual(kill, { unknown: 'not_found', state: 'closed' });

  // Reconnects back off with full jitter under a capped, doubling ceiling.
  const delays = await p.page.evaluate(async (port) => {
    const { SessionHub } = await import('/sessionhub.js');
    const hub = new SessionHub({ url: `ws://127.0.0.1:${port}/ws`, minDelay: 50, maxDelay: 200 });
    const got = [];
    await new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error(`only ${got.length} reconnects in 10 s`)), 10000);
      hub.on('disconnected', (e) => {
        got.push(e.reconnectIn);
        if (got.length === 6) resolve();
      });
      hub.connect();
    }).finally(() => hub.close());
    return got;
  }, Number(env('SESSIONHUB_CLOSED_PORT')));
  const ceilings = [50, 100, 200, 200, 200, 200];
  delays.forEach((d, i) => assert.ok(d >= 0 && d <= ceilings[i], `reconnect delays ${delays}`));

  // Signed out, the upgrade is refused (401); the client asks /api/v1/me, ends the
  // session with reason "unauthorized" and stops.
  await byId(p.page, 'logout-button').click();
  await view(p.page, 'login');
  const refused = await p.page.evaluate(async () => {
    const { SessionHub } = await import('/sessionhub.js');
    const hub = new SessionHub({ minDelay: 50 });
    const events = [];
    await new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error(`no end in 10 s: ${JSON.stringify(events)}`)), 10000);
      hub.on('session_ended', (f) => events.push(['session_ended', f.reason]));
      hub.on('disconnected', (e) => {
        events.push(['disconnected', e.reconnectIn]);
        if (e.reconnectIn === null) resolve();
      });
      hub.connect();
    });
    return { events, state: hub.state };
  });
  assert.deepEqual(refused, {
    events: [['session_ended', 'unauthorized'], ['disconnected', null]],
    state: 'closed',
  });
  await closeAll();
}

// 4. A page loaded through the proxy is on node A; node A is SIGKILLed; the client
//    reconnects through the proxy to node B and still gets notifications, and can
//    still end a session.
async function nodeKilled() {
  const p = await newPage('4:proxy', UA.linuxChrome);
  await login(p, PROXY, 'dave');
  await connected(p.page, 'node-a');

  await control('kill node-a');
  const t0 = Date.now();
  await connected(p.page, 'node-b');
  console.log(`  reconnected to node-b ${Date.now() - t0} ms after node-a died`);

  const other = await newPage('4:other', UA.macFirefox);
  const s2 = await login(other, NODE_B, 'dave');
  const note = notification(p.page, s2);
  await note.waitFor();
  await connected(other.page, 'node-b');
  await byId(note, 'notification-end').click();
  await signedOutForGood(other, 'killed');
  await connected(p.page, 'node-b');
  await closeAll();
}

// 5. The seeds' flow through the shipped nginx config (scripts/cluster.sh: three
//    nodes behind nginx, which picks them): both pages sign in at the nginx URL; the
//    first is told, and its End Session signs the second out for good; the first
//    stays signed in, also after a reload.
async function seedsThroughNginx() {
  const one = await newPage('5:ctx1', UA.linuxChrome);
  await login(one, NGINX, 'frank');
  await connected(one.page);
  await sessionCount(one.page, 1);
  // The page's icon is served (an SVG the browser can draw), /favicon.ico is no 404.
  const icon = await one.page.evaluate(async () => {
    const href = document.querySelector('link[rel="icon"]')?.href;
    const svg = await fetch(href);
    const img = new Image();
    img.src = href;
    await img.decode();
    return {
      href: new URL(href).pathname,
      svg: [svg.status, svg.headers.get('content-type')],
      drawn: img.naturalWidth > 0,
      ico: (await fetch('/favicon.ico')).status,
    };
  });
  assert.deepEqual(icon, { href: '/favicon.svg', svg: [200, 'image/svg+xml'], drawn: true, ico: 204 });

  const two = await newPage('5:ctx2', UA.macFirefox);
  const s2 = await login(two, NGINX, 'frank');
  const note = notification(one.page, s2);
  await note.waitFor();
  assert.equal(await byId(note, 'notification-message').textContent(), 'You logged in to another session');
  assert.equal(await byId(note, 'notification-device').textContent(), 'Firefox on macOS');
  // nginx passes the client's address on, and the nodes believe it from nginx only.
  assert.equal(await byId(note, 'notification-address').textContent(), '127.0.0.1');
  await connected(two.page);
  await sessionCount(one.page, 2);
  console.log(`  through nginx: first page on ${await nodeOf(one.page)}, second on ${await nodeOf(two.page)}`);
  await screenshot(one.page, 'nginx-notification.png');

  await byId(note, 'notification-end').click();
  await signedOutForGood(two, 'killed', 'nginx-ended.png');
  await note.waitFor({ state: 'detached' });
  await sessionCount(one.page, 1);
  await byId(one.page, 'status-message').filter({ hasText: 'Ended the session on Firefox on macOS' }).waitFor();
  await connected(one.page);
  await one.page.reload();
  await view(one.page, 'app');
  await connected(one.page);
  await sessionCount(one.page, 1);
  await closeAll();
}

/**
 * What does not fit a page: the document wider than the viewport, and every element
 * with text (labels, device names, badges, buttons, notification lines) that is 0 px
 * wide, cut short (ellipsis or overflow), outside the viewport or outside a clipping
 * ancestor.
 */
async function layoutProblems(page) {
  const width = page.viewportSize().width;
  return page.evaluate((width) => {
    const out = [];
    const doc = document.documentElement;
    // A phone browser zooms a page that is too wide out to fit it: no scrollbar then,
    // but a wider layout viewport.
    if (innerWidth !== width || visualViewport.scale !== 1) {
      out.push(`the layout viewport is ${innerWidth} px at scale ${visualViewport.scale}, not ${width} px at 1`);
    }
    if (doc.scrollWidth > innerWidth) out.push(`the page is ${doc.scrollWidth} px wide in a ${innerWidth} px viewport`);
    const sel = '[data-testid], dt, dd, label, h1, .btn, .badge, .brand-name, .demo-badge, .hint, p';
    const name = (el) =>
      `${el.tagName.toLowerCase()}${el.dataset.testid ? `[${el.dataset.testid}]` : el.className ? `.${el.className}` : ''}` +
      ` "${el.textContent.trim().replace(/\s+/g, ' ').slice(0, 40)}"`;
    for (const el of document.querySelectorAll(sel)) {
      if (!el.textContent.trim() || el.getClientRects().length === 0) continue; // not shown
      if (getComputedStyle(el).visibility === 'hidden') continue;
      const r = el.getBoundingClientRect();
      if (r.width < 1 || r.height < 1) {
        out.push(`${name(el)} is ${r.width}×${r.height} px`);
        continue;
      }
      if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1) {
        out.push(`${name(el)} is cut: ${el.scrollWidth} px of text in ${el.clientWidth} px`);
      }
      if (r.left < -0.5 || r.right > innerWidth + 0.5) {
        out.push(`${name(el)} spans x ${Math.round(r.left)}..${Math.round(r.right)} of ${innerWidth}`);
      }
      for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
        if (getComputedStyle(a).overflowX === 'visible') continue;
        const b = a.getBoundingClientRect();
        if (r.left < b.left - 0.5 || r.right > b.right + 0.5) {
          out.push(`${name(el)} is clipped by ${name(a)}`);
          break;
        }
      }
    }
    return out;
  }, width);
}

// 6. At phone width (390 px) through nginx: the login page and the signed-in page
//    with four sessions and their notifications fit, every label readable.
async function phoneWidth() {
  const phone = await newPage('6:phone', UA.iphoneSafari, PHONE);
  await phone.page.goto(`${NGINX}/`);
  await view(phone.page, 'login');
  await byId(phone.page, 'login-user').fill('grace.hopper@example.com');
  assert.deepEqual(await layoutProblems(phone.page), [], 'the login page at 390 px');
  await screenshot(phone.page, 'phone-login.png', true);

  await login(phone, NGINX, 'grace.hopper@example.com');
  await connected(phone.page);
  const others = [
    ['6:edge', UA.windowsEdge],
    ['6:firefox', UA.macFirefox],
    // An agent the demo does not know is shown raw (up to 60 characters).
    ['6:unknown', 'ExampleCorpIntranetKioskBrowser/12.4.1 (embedded; build 20260301-customer-x)'],
  ];
  const ids = [];
  for (const [name, ua] of others) ids.push(await login(await newPage(name, ua), NGINX, 'grace.hopper@example.com'));
  for (const id of ids) await notification(phone.page, id).waitFor();
  await sessionCount(phone.page, 4);
  for (const p of open.slice(1)) await connected(p.page);
  await phone.page.waitForFunction(
    () => document.querySelectorAll('[data-testid="session-connections"][data-count="1"]').length === 4,
    null,
    { timeout: WAIT },
  );
  const widths = await byId(phone.page, 'session-device').evaluateAll((els) =>
    els.map((e) => Math.round(e.getBoundingClientRect().width)),
  );
  console.log(`  device names at 390 px: ${widths.join(', ')} px wide`);
  assert.deepEqual(await layoutProblems(phone.page), [], 'the signed-in page at 390 px');
  await screenshot(phone.page, 'phone-notifications.png', true);
  await screenshot(phone.page, 'phone-top.png');

  // The list alone, once the notifications are dismissed.
  for (const b of (await byId(phone.page, 'notification-dismiss').all()).reverse()) await b.click();
  await byId(phone.page, 'notification').first().waitFor({ state: 'detached' });
  assert.deepEqual(await layoutProblems(phone.page), [], 'the session list at 390 px');
  await screenshot(phone.page, 'phone-sessions.png', true);
  await closeAll();
}

/** The close event's bound: it follows the session_ended frame (or close()) within this. */
const CLOSE_BOUND_MS = 50;

// 7. What a page's own `new WebSocket` sees: after its session is killed through the
//    API, `onclose` (code 4001) within 50 ms of the session_ended frame; after its own
//    close(), `onclose` within 50 ms of the call. On a node, and through nginx.
async function closeEventTiming() {
  const measured = [];
  // (Node A was killed in scenario 4.)
  for (const [where, base] of [['node-b', NODE_B], ['nginx', NGINX]]) {
    const p = await newPage(`7:${where}`, UA.linuxChrome);
    // A same-origin page without the demo app (and its socket) in it.
    await p.page.goto(`${base}/healthz`);
    for (let round = 0; round < 3; round += 1) {
      const status = await p.page.evaluate(async () => {
        const res = await fetch('/demo/login', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ user_id: 'judy' }),
        });
        return res.status;
      });
      assert.equal(status, 200, `${where}: POST /demo/login`);
      await handOverToken(p);
      const t = await p.page.evaluate(async () => {
        const deadline = (what, ms, reject) => setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
        const open = () =>
          new Promise((resolve, reject) => {
            const ws = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws`);
            const timer = deadline('no hello', 5000, reject);
            ws.onmessage = (m) => {
              const f = JSON.parse(m.data);
              if (f.type !== 'hello') return;
              clearTimeout(timer);
              ws.onmessage = null;
              resolve({ ws, hello: f });
            };
            ws.onclose = (e) => reject(new Error(`closed (${e.code}) before hello`));
          });

        // Client-initiated: close() to onclose.
        const own = await open();
        const closed = await new Promise((resolve, reject) => {
          const out = {};
          const timer = deadline('no onclose after close()', 5000, reject);
          own.ws.onclose = (e) => {
            out.closeEvent = performance.now();
            Object.assign(out, { code: e.code, wasClean: e.wasClean });
            clearTimeout(timer);
            resolve(out);
          };
          out.closeCalled = performance.now();
          own.ws.close(1000, 'bye');
        });

        // Server-initiated: the session killed through the API.
        const { ws, hello } = await open();
        const killed = await new Promise((resolve, reject) => {
          const out = {};
          const timer = deadline('no onclose after the kill', 5000, reject);
          ws.onmessage = (m) => {
            const f = JSON.parse(m.data);
            if (f.type === 'session_ended') Object.assign(out, { frame: performance.now(), reason: f.reason });
          };
          ws.onclose = (e) => {
            out.closeEvent = performance.now();
            Object.assign(out, { code: e.code, wasClean: e.wasClean });
            clearTimeout(timer);
            resolve(out);
          };
          out.kill = performance.now();
          fetch(`/api/v1/me/sessions/${hello.session_id}`, { method: 'DELETE' }).then(
            (r) => (out.status = r.status),
            (e) => (out.status = String(e)),
          );
        });
        return { closed, killed };
      });
      const { closed, killed } = t;
      assert.deepEqual([closed.code, closed.wasClean], [1000, true], `${where}: own close ${JSON.stringify(closed)}`);
      assert.deepEqual(
        [killed.code, killed.reason, killed.wasClean],
        [4001, 'killed', true],
        `${where}: kill ${JSON.stringify(killed)}`,
      );
      assert.ok(killed.frame !== undefined, `${where}: no session_ended frame before the close event`);
      measured.push({
        where,
        ownClose: closed.closeEvent - closed.closeCalled,
        frameAfterKill: killed.frame - killed.kill,
        killClose: killed.closeEvent - killed.frame,
      });
    }
    await closeAll();
  }
  const ms = (v) => `${v.toFixed(1)} ms`;
  for (const m of measured) {
    console.log(
      `  ${m.where}: close() → onclose ${ms(m.ownClose)}; kill → session_ended ${ms(m.frameAfterKill)}, ` +
        `session_ended → onclose ${ms(m.killClose)}`,
    );
  }
  for (const m of measured) {
    assert.ok(m.ownClose <= CLOSE_BOUND_MS, `${m.where}: onclose ${ms(m.ownClose)} after close() (bound ${CLOSE_BOUND_MS} ms)`);
    assert.ok(
      m.killClose <= CLOSE_BOUND_MS,
      `${m.where}: onclose ${ms(m.killClose)} after the session_ended frame (bound ${CLOSE_BOUND_MS} ms)`,
    );
  }
}

// 8. Recovery. A page's socket drops while the user signs in elsewhere; when it is
//    back it gets the missed "You logged in to another session" first (the demo shows
//    the notification and says it caught up). The client module: it reconnects with
//    since/epoch by itself, reports `recovered`, and `recovery_failed` when the hub
//    cannot fill the gap.
async function recovery() {
  const p = await newPage('8:offline', UA.linuxChrome);
  await login(p, NODE_B, 'frank');
  await connected(p.page, 'node-b');
  await p.ctx.setOffline(true);
  await p.page.locator('[data-testid="conn-status"][data-state="connecting"]').waitFor();
  const other = await newPage('8:other', UA.macFirefox);
  const s2 = await login(other, NODE_B, 'frank');
  await p.ctx.setOffline(false);
  await notification(p.page, s2).waitFor({ timeout: 40000 });
  await p.page
    .locator('[data-testid="status-message"]', { hasText: 'Back online: 1 missed update shown.' })
    .waitFor();
  await connected(p.page);

  const seen = await p.page.evaluate(async (closedPort) => {
    const { SessionHub } = await import('/sessionhub.js');
    const real = `ws://${location.host}/ws`;
    let offline = false;
    const urls = [];
    // A WebSocket that cannot connect while "offline" (to a port nothing listens on).
    class Flaky extends WebSocket {
      constructor(url) {
        urls.push(String(url));
        super(offline ? `ws://127.0.0.1:${closedPort}/ws` : url);
      }
    }
    const hub = new SessionHub({ url: real, WebSocket: Flaky, minDelay: 50, maxDelay: 100 });
    const events = [];
    const waitFor = (type, pred = () => true) =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no ${type}: ${JSON.stringify(events)}`)), 15000);
        const off = hub.on(type, (e) => {
          if (!pred(e)) return;
          clearTimeout(t);
          off();
          resolve(e);
        });
      });
    for (const type of ['hello', 'recovered', 'recovery_failed', 'session_created']) {
      hub.on(type, (e) => events.push([type, type === 'hello' ? e.recovered ?? null : e.missed ?? null]));
    }
    let hello = waitFor('hello');
    hub.connect();
    const first = await hello;
    // Drop the socket and stay away while a login happens; then come back.
    offline = true;
    hub._ws.close();
    const created = waitFor('session_created');
    const recovered = waitFor('recovered');
    const res = await fetch('/demo/login', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ user_id: 'frank' }),
      credentials: 'omit',
    });
    offline = false;
    const got = await created;
    const rec = await recovered;
    // A position the hub cannot serve: another epoch.
    hub.position.epoch = 'elsewhere';
    const failed = waitFor('recovery_failed');
    hub._ws.close();
    const f = await failed;
    hub.close();
    return {
      firstOffset: first.offset,
      loginStatus: res.status,
      createdOffset: got.offset,
      missed: rec.missed,
      failedEpoch: f.epoch,
      resumed: urls.filter((u) => u.includes('since=')).length > 0,
      events,
    };
  }, Number(env('SESSIONHUB_CLOSED_PORT')));
  assert.equal(seen.loginStatus, 200, JSON.stringify(seen));
  assert.ok(seen.resumed, `the client asked to resume: ${JSON.stringify(seen)}`);
  assert.equal(seen.missed, 1, JSON.stringify(seen));
  assert.ok(Number(seen.createdOffset) > Number(seen.firstOffset), JSON.stringify(seen));
  assert.equal(seen.failedEpoch, 'elsewhere', JSON.stringify(seen));
  await closeAll();
}

// 10. A node that could not hear for a while. A page's socket stays open on node A
//    while node A is stopped and Redis has dropped its pub/sub link; the user signs
//    in on node B meanwhile (the notice for node A is lost on the way). Once node A
//    runs and has subscribed again, the page's socket closes (1012), the client
//    reconnects with since/epoch by itself, and the page shows the missed
//    notification.
async function unheardWhileUnsubscribed() {
  const p = await newPage('10:unheard', UA.linuxChrome);
  // The close events the page's own sockets get, as the browser reports them.
  await p.page.addInitScript(() => {
    window.closeCodes = [];
    const Native = window.WebSocket;
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        this.addEventListener('close', (e) => window.closeCodes.push(e.code));
      }
    };
  });
  await login(p, NODE_A, 'heidi');
  await connected(p.page, 'node-a');
  await control('deafen node-a');
  const other = await newPage('10:other', UA.macFirefox);
  const s2 = await login(other, NODE_B, 'heidi');
  await control('resume node-a');
  await notification(p.page, s2).waitFor({ timeout: 20000 });
  const codes = await p.page.evaluate(() => window.closeCodes);
  assert.deepEqual(codes, [1012], `the page's socket closed once, with 1012: ${JSON.stringify(codes)}`);
  await p.page
    .locator('[data-testid="status-message"]', { hasText: 'Back online: 1 missed update shown.' })
    .waitFor();
  await connected(p.page);
  await closeAll();
}

// 9. The admin console (/admin): a wrong key is refused with a clear message, the
//    right one opens it (kept for the tab only); the nodes are listed; a user whose
//    session has sockets on two nodes shows both; End session (confirmed) closes
//    both sockets with 4001; the page fits a phone; through the shipped nginx too,
//    where its live counters add up the three nodes.
async function adminConsole() {
  const user = await newPage('9:user', UA.macFirefox);
  await login(user, NODE_A, 'grace');
  await connected(user.page, 'node-a');
  // The same browser (cookies are per host, not per port) on node B: a second socket.
  const second = await user.ctx.newPage();
  await second.goto(`${NODE_B}/`);
  await view(second, 'app');
  await connected(second, 'node-b');

  const adm = await newPage('9:admin', UA.linuxChrome);
  adm.page.on('dialog', (d) => d.accept());
  await adm.page.goto(`${NODE_B}/admin`);
  await byId(adm.page, 'key-view').waitFor();
  await byId(adm.page, 'key-input').fill('not-the-key-0123456789');
  await byId(adm.page, 'key-submit').click();
  await adm.page.locator('[data-testid="key-error"]', { hasText: 'Wrong key' }).waitFor();
  await screenshot(adm.page, 'admin-wrong-key.png');
  await byId(adm.page, 'key-input').fill(API_KEY);
  await byId(adm.page, 'key-submit').click();
  await byId(adm.page, 'app-view').waitFor();
  const stored = await adm.page.evaluate(() => ({
    session: sessionStorage.length,
    local: localStorage.length,
    cookie: document.cookie,
    url: location.href,
  }));
  assert.equal(stored.session, 1, 'the key is kept in this tab');
  assert.equal(stored.local, 0, 'never in localStorage');
  assert.equal(stored.cookie, '', 'never in a cookie');
  assert.ok(!stored.url.includes(API_KEY.slice(0, 8)), 'never in the URL');
  for (const id of ['node-a', 'node-b']) {
    await adm.page.locator(`[data-testid="node-row"][data-node="${id}"][data-alive="true"]`).waitFor();
  }
  await byId(adm.page, 'user-search').fill('gra');
  await adm.page.getByRole('button', { name: 'Search' }).click();
  await adm.page.locator('[data-testid="user-row"][data-user="grace"]').getByRole('button').click();
  const row = adm.page.locator('[data-testid="admin-session"]');
  await row.waitFor();
  assert.equal(await row.count(), 1, 'one session of grace');
  for (const id of ['node-a', 'node-b']) {
    await row.locator(`[data-testid="admin-session-node"][data-node="${id}"]`).waitFor();
  }
  assert.equal(await byId(row, 'admin-session-device').textContent(), 'Firefox on macOS');
  // The counters have drawn something by now (the first rate needs two samples).
  await adm.page.locator('[data-testid="chart-connections"] [data-testid="chart-value"]', { hasText: /^\d+$/ }).waitFor();
  await screenshot(adm.page, 'admin-console.png', true);
  if (DOCS_DIR) await adm.page.screenshot({ path: join(DOCS_DIR, 'admin-console.png'), fullPage: true });

  await byId(row, 'admin-session-end').click();
  await adm.page.locator('[data-testid="user-status"]', { hasText: 'Session ended.' }).waitFor();
  for (const page of [user.page, second]) {
    await view(page, 'login');
    await page.locator('[data-testid="login-notice"][data-reason="killed"]').waitFor();
  }

  // A phone: no sideways scroll.
  const phone = await newPage('9:phone', UA.linuxChrome, PHONE);
  await phone.page.goto(`${NGINX}/admin`);
  await byId(phone.page, 'key-input').fill(API_KEY);
  await byId(phone.page, 'key-submit').click();
  await byId(phone.page, 'app-view').waitFor();
  await phone.page.locator('[data-testid="node-row"]').first().waitFor();
  const wide = await phone.page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(wide <= 390, `the admin page is ${wide} px wide at 390`);
  await screenshot(phone.page, 'admin-phone.png', true);
  if (DOCS_DIR) await phone.page.screenshot({ path: join(DOCS_DIR, 'admin-phone.png'), fullPage: true });
  // Through nginx it lists the three nodes of scripts/cluster.sh.
  const n = await phone.page.locator('[data-testid="node-row"][data-alive="true"]').count();
  assert.equal(n, 3, 'the three nodes of scripts/cluster.sh, listed through nginx');
  // Every column a phone shows is on the screen, without scrolling the table
  // sideways: State and Lease too (long node ids wrap).
  await phone.page.setViewportSize({ width: 360, height: 800 });
  const rights = await phone.page.$$eval('[data-testid="node-row"] td', (tds) =>
    tds.filter((td) => td.offsetParent !== null).map((td) => td.getBoundingClientRect().right));
  assert.ok(rights.length >= 12, `node cells: ${rights.length}`);
  assert.ok(Math.max(...rights) <= 360, `a node cell ends at ${Math.max(...rights)} px of 360`);
  await phone.page.setViewportSize(PHONE.viewport);
  // Through nginx the counters are still the whole cluster's: the three nodes'
  // announced statuses added up (not the counters of whichever node answered).
  await phone.page.locator('[data-testid="charts"][data-nodes="3"]').waitFor({ timeout: 30_000 });
  await closeAll();
}

// ---- run ---------------------------------------------------------------------------------

const scenarios = [
  ['1. notification within 2 s; End Session logs the other page out', notifyAndEnd],
  ['2. Dismiss hides the notification and ends nothing', dismiss],
  ['3. Sign out all other sessions, on both nodes', signOutOthers],
  ['11. offline: End Session and both sign-outs say so and stay usable', offline],
  ['client module: killSession, backoff ceilings, refused upgrade', clientModule],
  ['10. a node that could not hear: its page closes 1012 and shows the missed notification', unheardWhileUnsubscribed],
  ['9. the admin console: key, nodes, a user on two nodes, End session, phone, nginx', adminConsole],
  ['4. node killed under a page: reconnect through the proxy, still notified', nodeKilled],
  ["5. the seeds' flow through the shipped nginx config (scripts/cluster.sh)", seedsThroughNginx],
  ['6. the demo at phone width (390 px), through nginx', phoneWidth],
  ['7. close event within 50 ms of session_ended and of close(), on a node and through nginx', closeEventTiming],
  ['8. recovery after a drop: missed notifications, recovered and recovery_failed events', recovery],
];

let passed = 0;
let failed = 0;
const started = Date.now();
for (const [name, run] of scenarios) {
  const t = Date.now();
  try {
    await run();
    assert.deepEqual(problems, [], 'page errors or CSP violations');
    passed += 1;
    consoleLog.length = 0;
    console.log(`ok   ${name} (${Date.now() - t} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name} (${Date.now() - t} ms)\n${e.stack || e}`);
    for (const p of open) {
      await screenshot(p.page, `failure-${p.name.replace(/\W+/g, '_')}.png`).catch(() => {});
    }
    console.log(`---- browser console ----\n${consoleLog.join('\n')}\n----`);
    problems.length = 0;
    consoleLog.length = 0;
    await closeAll().catch(() => {});
  }
}
await browser.close();
console.log(`browser tests: ${passed} passed, ${failed} failed in ${Date.now() - started} ms`);
process.exit(failed ? 1 : 0);

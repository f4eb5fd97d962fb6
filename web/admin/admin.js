// sessionhub admin console: plain DOM code on the service API, no build step.
//
// The operator types the service API key once; it is kept in this tab only
// (sessionStorage: gone when the tab closes, never in a URL, a cookie or another
// tab) and sent as `Authorization: Bearer`. Untrusted text (user ids, user agents,
// addresses) is set with textContent only.

import { describeAgent } from '/sessionhub.js';

const $ = (id) => document.getElementById(id);
const KEY = 'sessionhub-admin-key';
const NODES_MS = 2000; // nodes and counters refresh
const PAGE = 20; // online users per page
const SAMPLES = 60; // points per chart (2 minutes)

let key = sessionStorage.getItem(KEY);
let timer = null;
let cursor = { after: '', next: null, prefix: '' };
let selected = null; // user id whose sessions are shown

function show(view) {
  for (const v of ['key', 'app']) $(`${v}-view`).hidden = v !== view;
  $('who').hidden = view !== 'app';
  document.body.dataset.view = view;
}

/** Calls the service API with the key; a 401 locks the console again. */
async function api(method, path) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${key}` },
    cache: 'no-store',
    credentials: 'omit',
  });
  if (res.status === 401) {
    lock('The key was refused (401): it is not this cluster\'s SESSIONHUB_API_KEY.');
    throw new Error('unauthorized');
  }
  return res;
}

function lock(message) {
  key = null;
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  timer = null;
  $('key').value = '';
  const err = $('key-error');
  err.textContent = message ?? '';
  err.hidden = !message;
  show('key');
  $('key').focus();
}

async function unlock(ev) {
  ev.preventDefault();
  key = $('key').value.trim();
  const err = $('key-error');
  err.hidden = true;
  let res;
  try {
    res = await fetch('/api/v1/nodes', {
      headers: { Authorization: `Bearer ${key}` },
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch {
    err.textContent = 'This node did not answer. Is it running?';
    err.hidden = false;
    return;
  }
  if (res.status === 401) {
    key = null;
    err.textContent = 'Wrong key: the node refused it (401). Use the SESSIONHUB_API_KEY of this cluster.';
    err.hidden = false;
    $('key').select();
    return;
  }
  if (!res.ok) {
    key = null;
    err.textContent = `The node answered ${res.status}; try again in a moment.`;
    err.hidden = false;
    return;
  }
  sessionStorage.setItem(KEY, key);
  start();
}

function start() {
  show('app');
  refreshNodes();
  loadUsers('', '');
  clearInterval(timer);
  timer = setInterval(() => {
    if (document.visibilityState !== 'visible') return;
    refreshNodes();
  }, NODES_MS);
}

// ---- nodes -----------------------------------------------------------------

function secs(ms) {
  const s = Math.abs(ms) / 1000;
  return s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
}

function cell(tr, text, testid) {
  const td = document.createElement('td');
  td.textContent = text;
  if (testid) td.dataset.testid = testid;
  tr.append(td);
  return td;
}

async function refreshNodes() {
  let body;
  try {
    const res = await api('GET', '/api/v1/nodes');
    if (!res.ok) return;
    body = await res.json();
  } catch {
    return;
  }
  sampleNodes(body.nodes);
  const rows = body.nodes.map((n) => {
    const tr = document.createElement('tr');
    tr.dataset.testid = 'node-row';
    tr.dataset.node = n.node_id;
    tr.dataset.alive = String(n.alive);
    if (!n.alive) tr.classList.add('dead');
    cell(tr, n.this_node ? `${n.node_id} (this node)` : n.node_id);
    cell(tr, n.address ?? '—');
    cell(tr, n.sockets ?? '—', 'node-sockets');
    const state = cell(tr, '');
    const pill = document.createElement('span');
    pill.className = 'pill';
    if (!n.alive) {
      pill.textContent = 'dead';
      pill.classList.add('bad');
    } else if (n.ready === true) {
      pill.textContent = 'ready';
      pill.classList.add('ok');
    } else {
      pill.textContent = n.ready === false ? 'not ready' : 'no status';
      pill.classList.add('warn');
    }
    state.append(pill);
    const lease = n.lease_ms_left;
    cell(
      tr,
      lease === null ? 'no lease (one node)' : lease > 0 ? `renewed, ${secs(lease)} left` : `ran out ${secs(lease)} ago`,
    );
    return tr;
  });
  $('nodes-body').replaceChildren(...rows);
  const alive = body.nodes.filter((n) => n.alive).length;
  $('nodes-summary').textContent = `${alive} live of ${body.nodes.length}`;
  const me = body.nodes.find((n) => n.this_node);
  if (me) $('served-by').textContent = `Served by ${me.node_id}`;
}

// ---- live counters (every node's announced status) ---------------------------------
//
// Every node announces its socket count and counters with its status each heartbeat
// (2 s), and any node lists them all (GET /api/v1/nodes): the charts add up the live
// nodes, each node's rates from its own consecutive statuses. Behind a load balancer
// that spreads the console's requests over the nodes, that is still the whole
// cluster, counted once.

const CHARTS = [
  { id: 'connections', label: 'Connections', rate: false },
  { id: 'messages', label: 'Messages out /s', counter: 'messages_out', rate: true },
  { id: 'logins', label: 'Logins /s', counter: 'sessions_created', rate: true },
  { id: 'kills', label: 'Kills /s', counter: 'sessions_killed', rate: true },
];
const series = new Map(CHARTS.map((c) => [c.id, []]));
// node_id -> {at, counters, rates (counter -> per second; null until a second status)}
const announced = new Map();

function sampleNodes(nodes) {
  const live = nodes.filter((n) => n.alive && n.status_at != null && n.counters);
  for (const n of live) {
    const prev = announced.get(n.node_id);
    if (prev && prev.at === n.status_at) continue;
    let rates = null;
    if (prev && n.status_at > prev.at) {
      rates = new Map();
      const dt = (n.status_at - prev.at) / 1000;
      for (const c of CHARTS.filter((c) => c.rate)) {
        // A restarted node's counters start again from 0.
        rates.set(c.counter, Math.max(0, (n.counters[c.counter] - prev.counters[c.counter]) / dt));
      }
    }
    announced.set(n.node_id, { at: n.status_at, counters: n.counters, rates });
  }
  const ids = new Set(live.map((n) => n.node_id));
  for (const id of announced.keys()) if (!ids.has(id)) announced.delete(id);
  for (const c of CHARTS) {
    let point = 0;
    let known = false;
    if (c.rate) {
      for (const a of announced.values()) {
        if (!a.rates) continue;
        point += a.rates.get(c.counter);
        known = true;
      }
    } else {
      for (const n of live) point += n.sockets ?? 0;
      known = live.length > 0;
    }
    if (!known) continue;
    const pts = series.get(c.id);
    pts.push(point);
    if (pts.length > SAMPLES) pts.shift();
  }
  $('charts').dataset.nodes = String(live.length);
  $('charts-sub').textContent = `${live.length} node${live.length === 1 ? '' : 's'}, every 2 s`;
  drawCharts();
}

function drawCharts() {
  const box = $('charts');
  if (!box.childElementCount) {
    for (const c of CHARTS) {
      const div = document.createElement('div');
      div.className = 'chart';
      div.dataset.testid = `chart-${c.id}`;
      div.innerHTML = `<div class="label"></div><div class="value" data-testid="chart-value">–</div>
        <svg viewBox="0 0 ${SAMPLES} 40" preserveAspectRatio="none" aria-hidden="true">
        <polyline fill="none" stroke="#4f46e5" stroke-width="1.5" vector-effect="non-scaling-stroke"></polyline></svg>`;
      div.querySelector('.label').textContent = c.label;
      box.append(div);
    }
  }
  for (const c of CHARTS) {
    const pts = series.get(c.id);
    const div = box.querySelector(`[data-testid="chart-${c.id}"]`);
    const now = pts.at(-1);
    div.querySelector('.value').textContent = now === undefined ? '–' : c.rate ? now.toFixed(1) : String(now);
    const max = Math.max(1, ...pts);
    const off = SAMPLES - pts.length;
    div.querySelector('polyline').setAttribute(
      'points',
      pts.map((v, i) => `${off + i},${(40 - (v / max) * 38).toFixed(1)}`).join(' '),
    );
  }
}

// ---- online users ----------------------------------------------------------------

async function loadUsers(after, prefix) {
  const q = new URLSearchParams({ online: 'true', limit: String(PAGE) });
  if (after) q.set('after', after);
  if (prefix) q.set('prefix', prefix);
  let body;
  try {
    const res = await api('GET', `/api/v1/users?${q}`);
    if (!res.ok) {
      $('users-summary').textContent = `could not list users (${res.status})`;
      return;
    }
    body = await res.json();
  } catch {
    return;
  }
  cursor = { after, next: body.next, prefix };
  const items = body.users.map((u) => {
    const li = document.createElement('li');
    li.dataset.testid = 'user-row';
    li.dataset.user = u.user_id;
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = u.user_id;
    b.addEventListener('click', () => openUser(u.user_id));
    const n = document.createElement('span');
    n.className = 'sub';
    n.textContent = `${u.connections} socket${u.connections === 1 ? '' : 's'}`;
    li.append(b, n);
    return li;
  });
  $('users-list').replaceChildren(...items);
  $('users-summary').textContent = items.length
    ? `${items.length}${body.next ? '+' : ''} shown${prefix ? ` starting with “${prefix}”` : ''}`
    : prefix ? `nobody online starting with “${prefix}”` : 'nobody online';
  $('next-page').disabled = !body.next;
  $('first-page').disabled = !after;
}

// ---- a user's sessions -------------------------------------------------------------

function when(iso) {
  if (!iso) return '—';
  return new Date(iso).toLocaleString('en-GB', { dateStyle: 'medium', timeStyle: 'medium', timeZone: 'UTC' }) + ' UTC';
}

function say(text) {
  const st = $('user-status');
  st.textContent = text;
  st.hidden = !text;
}

/** Which openUser call is the latest: an older one's answer is dropped. */
let userLoads = 0;

async function openUser(user, message = '') {
  selected = user;
  const load = ++userLoads;
  $('user-card').hidden = false;
  $('user-name').textContent = user;
  // Another user's rows never stay under this user's name, not even while loading
  // or when the load fails (their End session would end that user's session).
  $('sessions-list').replaceChildren();
  say(message);
  let sessions;
  try {
    const res = await api('GET', `/api/v1/users/${encodeURIComponent(user)}/sessions`);
    if (load !== userLoads) return;
    if (!res.ok) return say(`could not load the sessions (${res.status})`);
    sessions = await res.json();
  } catch {
    return;
  }
  if (load !== userLoads) return;
  const tpl = $('session-template');
  const items = sessions.map((s) => {
    const li = tpl.content.firstElementChild.cloneNode(true);
    li.dataset.sessionId = s.session_id;
    const agent = describeAgent(s.user_agent);
    li.querySelector('[data-testid="admin-session-device"]').textContent = agent.label;
    li.querySelector('[data-testid="admin-session-address"]').textContent = s.ip ?? '—';
    li.querySelector('[data-testid="admin-session-created"]').textContent = when(s.created_at);
    li.querySelector('[data-testid="admin-session-active"]').textContent = when(s.last_seen_at);
    const perNode = new Map();
    for (const c of s.connections) perNode.set(c.node_id, (perNode.get(c.node_id) ?? 0) + 1);
    const conns = [...perNode].map(([node, n]) => {
      const c = document.createElement('li');
      c.dataset.testid = 'admin-session-node';
      c.dataset.node = node;
      c.textContent = `${node}: ${n} socket${n === 1 ? '' : 's'}`;
      return c;
    });
    if (!conns.length) {
      const c = document.createElement('li');
      c.textContent = 'no live sockets';
      conns.push(c);
    }
    li.querySelector('[data-testid="admin-session-conns"]').replaceChildren(...conns);
    li.querySelector('[data-testid="admin-session-end"]').addEventListener('click', () => endSession(s));
    return li;
  });
  if (!items.length) say(message || 'No live sessions.');
  $('sessions-list').replaceChildren(...items);
}

async function endSession(s) {
  const agent = describeAgent(s.user_agent).label;
  if (!confirm(`End this session of ${s.user_id} (${agent})? Its sockets close on every node and its cookie stops working.`)) return;
  const res = await api('DELETE', `/api/v1/sessions/${encodeURIComponent(s.session_id)}`).catch(() => null);
  if (!res) return;
  const text = res.status === 204 ? 'Session ended.' : res.status === 404 ? 'That session had already ended.' : `The node answered ${res.status}.`;
  await openUser(selected, text);
  loadUsers(cursor.after, cursor.prefix);
}

async function endAll() {
  if (!selected) return;
  if (!confirm(`End every session of ${selected}? They are signed out everywhere.`)) return;
  const res = await api('DELETE', `/api/v1/users/${encodeURIComponent(selected)}/sessions`).catch(() => null);
  if (!res) return;
  const text = res.ok ? `Ended ${(await res.json()).killed} session(s).` : `The node answered ${res.status}.`;
  await openUser(selected, text);
  loadUsers(cursor.after, cursor.prefix);
}

// ---- wiring ---------------------------------------------------------------------

$('key-form').addEventListener('submit', unlock);
$('lock').addEventListener('click', () => lock(''));
$('search-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  loadUsers('', $('search').value.trim());
});
$('next-page').addEventListener('click', () => cursor.next && loadUsers(cursor.next, cursor.prefix));
$('first-page').addEventListener('click', () => loadUsers('', cursor.prefix));
$('end-all').addEventListener('click', endAll);

if (key) start();
else lock('');

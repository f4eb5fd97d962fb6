// sessionhub demo app: plain DOM code on top of the browser client, no build step.
// Everything shown comes from the self-service API (the HttpOnly session cookie)
// and the client's events; untrusted text (user agents) is set with textContent only.

import { SessionHub, describeAgent } from '/sessionhub.js';

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000; // re-fetch the session list this often while visible
const FOLLOW_UP_MS = 1500; // and once more this long after a new login, for its page

let hub = null; // the SessionHub of the signed-in page
let me = null; // {user_id, session_id}
let refreshTimer = null;
let statusTimer = null;

// ---- small helpers -------------------------------------------------------

/** "just now", "3 min ago", … for a past time. */
function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 45) return 'just now';
  if (s < 90) return '1 min ago';
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function setTime(el, iso, relative) {
  el.dateTime = iso;
  el.title = new Date(iso).toLocaleString();
  el.textContent = relative ? ago(iso) : new Date(iso).toLocaleTimeString();
}

const testid = (root, id) => root.querySelector(`[data-testid="${id}"]`);

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', cache: 'no-store', headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  return fetch(path, init);
}

/** What to say when a call did not reach the server at all. */
const UNREACHABLE = (what) => `Could not ${what}: the server is not reachable. Try again.`;

async function errorText(res) {
  try {
    const e = await res.json();
    return e.message || e.error || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

function flash(text) {
  const el = $('status-message');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => (el.hidden = true), 6000);
}

// ---- views -----------------------------------------------------------------

function show(view) {
  $('loading').hidden = true;
  $('login-view').hidden = view !== 'login';
  $('app-view').hidden = view !== 'app';
  $('account').hidden = view !== 'app';
  document.body.dataset.view = view;
}

const END_REASONS = {
  killed: 'Your session was ended from another session.',
  logout: 'You signed out.',
  expired: 'Your session expired.',
  unauthorized: 'Your session has ended.',
};

/** Leaves the signed-in page for the login page, at once. Idempotent. */
function signedOut(reason) {
  if (hub) hub.close();
  hub = null;
  clearInterval(refreshTimer);
  refreshTimer = null;
  const user = me?.user_id;
  me = null;
  $('notifications').replaceChildren();
  $('sessions-list').replaceChildren();
  const notice = $('login-notice');
  notice.textContent = END_REASONS[reason] ?? END_REASONS.unauthorized;
  notice.hidden = !reason;
  notice.dataset.reason = reason ?? '';
  if (user) $('login-user').value = user;
  $('login-submit').disabled = false;
  show('login');
  document.title = 'Sign in · sessionhub demo';
}

function setConn(state, text, node) {
  const el = $('conn-status');
  el.dataset.state = state;
  el.dataset.node = node ?? '';
  $('conn-text').textContent = text;
}

// ---- signed in -----------------------------------------------------------------

function signedIn(who) {
  me = who;
  $('current-user').textContent = who.user_id;
  document.title = `${who.user_id} · sessionhub demo`;
  show('app');
  setConn('connecting', 'Connecting…');

  hub = new SessionHub();
  hub.on('hello', (f) => {
    setConn('open', `Live · ${f.node_id}`, f.node_id);
    refresh(); // our connection count changed (and we may have missed events)
  });
  hub.on('disconnected', (e) => {
    if (e.reconnectIn === null) return setConn('closed', 'Disconnected');
    const secs = Math.max(1, Math.round(e.reconnectIn / 1000));
    setConn('connecting', `Reconnecting in ${secs} s…`);
  });
  hub.on('session_created', (f) => {
    notify(f);
    refresh();
    // The new session's page opens its own connection a moment later.
    setTimeout(() => me && refresh(), FOLLOW_UP_MS);
  });
  hub.on('session_ended', (f) => signedOut(f.reason));
  // After a reconnect the hub sends what this page missed (the notifications
  // above arrive as usual), or says it could not: then the page reloads its state.
  hub.on('recovered', ({ missed }) => {
    if (missed > 0) flash(`Back online: ${missed} missed update${missed === 1 ? '' : 's'} shown.`);
  });
  hub.on('recovery_failed', () => {
    flash('Back online. Some updates from while you were away could not be recovered; the list below is current.');
    document.body.dataset.recovery = 'failed';
    refresh();
  });
  hub.connect();

  refresh();
  refreshTimer = setInterval(() => document.visibilityState === 'visible' && refresh(), REFRESH_MS);
}

// The session list. One fetch at a time; a request during one runs once after it.
let fetching = null;
let again = false;

function refresh() {
  if (fetching) {
    again = true;
    return fetching;
  }
  fetching = (async () => {
    do {
      again = false;
      const started = performance.now();
      let res;
      try {
        res = await api('GET', '/api/v1/me/sessions');
      } catch {
        continue; // this node is unreachable: the next refresh will tell
      }
      if (!me) return;
      if (res.status === 401) return signedOut('unauthorized');
      if (!res.ok) continue;
      renderSessions(await res.json(), started);
    } while (again && me);
  })().finally(() => (fetching = null));
  return fetching;
}

function renderSessions(sessions, fetchedAt) {
  const list = $('sessions-list');
  const tpl = $('session-template');
  const others = sessions.filter((s) => !s.current).length;
  const live = new Set(sessions.map((s) => s.session_id));
  // Newest first, this session on top.
  sessions.sort((a, b) => (b.current - a.current) || b.created_at.localeCompare(a.created_at));
  list.replaceChildren(
    ...sessions.map((s) => {
      const li = tpl.content.firstElementChild.cloneNode(true);
      const agent = describeAgent(s.user_agent);
      li.dataset.sessionId = s.session_id;
      li.dataset.current = String(Boolean(s.current));
      const icon = li.querySelector('.device-icon');
      icon.dataset.browser = agent.browser;
      icon.textContent = (agent.browser || '?').slice(0, 1);
      testid(li, 'session-device').textContent = agent.label;
      testid(li, 'session-device').title = s.user_agent ?? '';
      testid(li, 'session-current-badge').hidden = !s.current;
      testid(li, 'session-address').textContent = s.ip || 'unknown';
      setTime(testid(li, 'session-created'), s.created_at, true);
      setTime(testid(li, 'session-last-active'), s.last_seen_at, true);
      const n = s.connections?.length ?? 0;
      const conns = testid(li, 'session-connections');
      conns.dataset.count = String(n);
      const nodes = [...new Set((s.connections ?? []).map((c) => c.node_id))].sort();
      conns.textContent =
        n === 0 ? 'no open page' : `${n === 1 ? '1 connection' : `${n} connections`} · ${nodes.join(', ')}`;
      conns.title = 'Live connections and the nodes that hold them';
      const btn = testid(li, 'session-signout');
      btn.addEventListener('click', () => (s.current ? logout() : endSession(s.session_id, btn)));
      return li;
    }),
  );
  $('sessions-summary').textContent =
    sessions.length === 1 ? 'You are signed in here only.'
    : `You are signed in on ${sessions.length} sessions.`;
  $('sessions-summary').dataset.count = String(sessions.length);
  $('signout-others').disabled = others === 0;
  // A notification about a session that has ended since is moot.
  for (const n of $('notifications').children) {
    if (Number(n.dataset.addedAt) < fetchedAt && !live.has(n.dataset.sessionId)) n.remove();
  }
}

// ---- notifications -------------------------------------------------------------

function notify({ session, message }) {
  const area = $('notifications');
  if (!session || area.querySelector(`[data-session-id="${CSS.escape(session.session_id)}"]`)) return;
  const el = $('notification-template').content.firstElementChild.cloneNode(true);
  const agent = describeAgent(session.user_agent);
  el.dataset.sessionId = session.session_id;
  el.dataset.addedAt = String(performance.now());
  testid(el, 'notification-message').textContent = message || 'You logged in to another session';
  testid(el, 'notification-device').textContent = agent.label;
  testid(el, 'notification-device').title = session.user_agent ?? '';
  testid(el, 'notification-address').textContent = session.ip || 'unknown address';
  setTime(testid(el, 'notification-time'), session.created_at, false);
  const end = testid(el, 'notification-end');
  end.addEventListener('click', async () => {
    end.disabled = true;
    end.textContent = 'Ending…';
    if (await endSession(session.session_id)) {
      el.remove();
      flash(`Ended the session on ${agent.label}.`);
    } else {
      end.disabled = false;
      end.textContent = 'End Session';
    }
  });
  testid(el, 'notification-dismiss').addEventListener('click', () => el.remove());
  area.prepend(el);
}

// ---- actions -----------------------------------------------------------------------

/** Ends another session of ours: over the socket when it is up, else over HTTP. */
async function endSession(sessionId, button) {
  if (button) button.disabled = true;
  let ok = false;
  try {
    if (!hub) throw new Error('not connected');
    await hub.killSession(sessionId);
    ok = true;
  } catch (e) {
    if (e.frame?.code === 'not_found') {
      ok = true; // already gone
    } else {
      let res = null;
      try {
        res = await api('DELETE', `/api/v1/me/sessions/${encodeURIComponent(sessionId)}`);
      } catch {
        flash(UNREACHABLE('end the session'));
      }
      if (res?.status === 401) {
        signedOut('unauthorized');
        return false;
      }
      ok = res?.status === 204 || res?.status === 404;
      if (res && !ok) flash(`Could not end the session: ${await errorText(res)}`);
    }
  }
  if (button) button.disabled = false;
  if (ok) {
    for (const n of $('notifications').querySelectorAll(`[data-session-id="${CSS.escape(sessionId)}"]`)) {
      n.remove();
    }
  }
  await refresh();
  return ok;
}

async function signOutOthers() {
  const btn = $('signout-others');
  btn.disabled = true;
  let res;
  try {
    res = await api('DELETE', '/api/v1/me/sessions');
  } catch {
    btn.disabled = false;
    flash(UNREACHABLE('sign out the other sessions'));
    return;
  }
  if (res.status === 401) return signedOut('unauthorized');
  if (res.ok) {
    const { killed } = await res.json();
    $('notifications').replaceChildren();
    flash(killed === 1 ? 'Signed out 1 other session.' : `Signed out ${killed} other sessions.`);
  } else {
    flash(`Could not sign out the other sessions: ${await errorText(res)}`);
  }
  await refresh();
}

/** Signs out: only once the server has ended the session (on a shared computer a
 *  page that said "signed out" while the session lived on would be worse than an
 *  error). 401: it had ended already. */
async function logout() {
  let res;
  try {
    res = await api('POST', '/api/v1/me/logout');
  } catch {
    flash(UNREACHABLE('sign out'));
    return;
  }
  if (res.ok || res.status === 401) {
    signedOut('logout');
  } else {
    flash(`Could not sign out: ${await errorText(res)}`);
  }
}

async function login(ev) {
  ev.preventDefault();
  const user = $('login-user').value.trim();
  const err = $('login-error');
  err.hidden = true;
  $('login-submit').disabled = true;
  try {
    const res = await api('POST', '/demo/login', { user_id: user });
    if (!res.ok) throw new Error(await errorText(res));
    $('login-notice').hidden = true;
    signedIn(await res.json());
  } catch (e) {
    err.textContent = `Could not sign in: ${e.message}`;
    err.hidden = false;
  } finally {
    $('login-submit').disabled = false;
  }
}

// ---- start -----------------------------------------------------------------------------

async function start() {
  $('login-form').addEventListener('submit', login);
  $('logout-button').addEventListener('click', logout);
  $('signout-others').addEventListener('click', signOutOthers);
  document.addEventListener('visibilitychange', () => me && document.visibilityState === 'visible' && refresh());
  let res;
  try {
    res = await api('GET', '/api/v1/me');
  } catch {
    res = null;
  }
  if (res?.ok) {
    signedIn(await res.json());
  } else {
    signedOut(null);
    if (res && res.status !== 401) {
      $('login-error').textContent = `The server answered: ${await errorText(res)}`;
      $('login-error').hidden = false;
    }
  }
}

start();

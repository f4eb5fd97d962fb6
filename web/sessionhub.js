// sessionhub browser client: one dependency-free ES module.
//
//   import { SessionHub } from '/sessionhub.js';   // served by every node
//
//   const hub = new SessionHub();                   // same-origin /ws, cookie auth
//   hub.on('session_created', (f) => alert(`${f.message}: ${f.session.user_agent}`));
//   hub.on('session_ended', (f) => location.assign('/login'));
//   hub.on('message', (f) => console.log(f.event, f.data));
//   hub.connect();
//
// Events (listeners get one object):
//   connected      {url, attempt}            the socket opened
//   hello          the server's hello frame   registered: reachable from every node
//   session_created, session_ended, message, error, pong
//                  the server's frame as sent (see the README's WebSocket protocol)
//   disconnected   {code, reason, wasClean, reconnectIn}  reconnectIn: ms, or null
//                  when the client has stopped for good
//   frame          every server frame, including types this version does not know
//   recovered      {missed}   a reconnected socket got every message it missed
//                             (they follow as ordinary events, in order)
//   recovery_failed {since, epoch}  a reconnected socket could not get what it
//                  missed (gone from the hub's history): reload the page's state
//
// Reconnects: exponential backoff with full jitter (a random delay between 0 and
// min(maxDelay, minDelay * 2^attempt)), reset once a socket has stayed open for
// STABLE_AFTER (10 s) after its `hello` (a server that closes each socket right
// after its hello is not hammered). The
// browser's `offline` event drops the socket at once, and `online` reconnects at
// once (a laptop waking up). Close 1001
// (node shutting down) reconnects like any other drop; the load balancer sends the
// new socket to a live node. So does 1012 (the node could not hear messages for a
// while and this socket missed some: the reconnect recovers them). It stops for good after `session_ended`, close 4001,
// or close(). A refused upgrade (401: the session ended while the page was away)
// looks to a browser like any failed connection, so after a socket that never
// opened the client asks `sessionUrl` (GET /api/v1/me): a 401 there ends the
// session too, with a `session_ended` event whose reason is "unauthorized".
//
// Recovery: messages to the user or to this session, and session_created, carry an
// `offset`; hello carries the user's `epoch` and current offset. The client keeps
// the last of each and reconnects with /ws?since=<offset>&epoch=<epoch>, so the
// hub sends what was published meanwhile before anything live (nothing twice,
// nothing lost), or says it cannot (`recovery_failed`). Messages to groups, to one
// connection and to everyone are live only.

/** Close code of an ended session: do not reconnect. */
export const SESSION_ENDED = 4001;

/** How long a socket stays open after its hello before the backoff starts over. */
const STABLE_AFTER = 10000;

const DEFAULTS = {
  url: null, // default: ws(s)://<this page's host>/ws
  sessionUrl: undefined, // default: /api/v1/me when `url` is the default, else null
  minDelay: 500, // ms, the first backoff ceiling
  maxDelay: 30000, // ms, the cap of the backoff ceiling
  pingInterval: 25000, // ms between application pings, whatever else comes (0: none)
  pongTimeout: 10000, // ms to wait for a pong before dropping a half-open socket
  WebSocket: globalThis.WebSocket, // injectable, e.g. for Node.js
  fetch: globalThis.fetch?.bind(globalThis),
};

export class SessionHub {
  /** @param {Partial<typeof DEFAULTS>} [options] */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    const sameOrigin = !o.url && globalThis.location;
    if (!o.url) {
      const l = globalThis.location;
      o.url = `${l.protocol === 'https:' ? 'wss:' : 'ws:'}//${l.host}/ws`;
    }
    if (o.sessionUrl === undefined) o.sessionUrl = sameOrigin ? '/api/v1/me' : null;
    /** 'idle' | 'connecting' | 'open' | 'closed' (for good) */
    this.state = 'idle';
    /** The last hello frame: {connection_id, session_id, user_id, node_id}. */
    this.hello = null;
    this._listeners = new Map();
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._lastFrameAt = 0; // Date.now() of the last server frame
    this._helloAt = null; // Date.now() of this socket's hello
    this._pending = []; // FIFO of requests answered by the next pong
    this._ended = false;
    /** Where to resume: {userId, epoch, offset} from the last hello and frames. */
    this.position = null;
    this._asked = null; // the position the current socket asked to resume from
  }

  // ---- events -------------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  _emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (e) {
        // A broken listener must not break the client.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  // ---- lifecycle ----------------------------------------------------------

  /** Opens the socket (and keeps it open). Returns this. */
  connect() {
    if (this.state !== 'idle') return this;
    // The browser knows before TCP does: going offline drops the socket (it would
    // linger half-open until a ping timed out), coming back reconnects at once.
    this._offline = () => {
      const ws = this._ws;
      if (this.state !== 'open' || !ws) return;
      this._onClose({ code: 4000, reason: 'offline', wasClean: false }, true);
      ws.close(4000, 'offline');
    };
    this._online = () => {
      if (this.state !== 'connecting' || this._ws) return;
      clearTimeout(this._timer);
      this._attempt = 0;
      this._open();
    };
    globalThis.addEventListener?.('offline', this._offline);
    globalThis.addEventListener?.('online', this._online);
    this._open();
    return this;
  }

  /** Closes the socket and stops reconnecting. */
  close() {
    if (this.state === 'closed') return;
    this.state = 'closed';
    globalThis.removeEventListener?.('offline', this._offline);
    globalThis.removeEventListener?.('online', this._online);
    clearTimeout(this._timer);
    const ws = this._ws;
    this._drop();
    if (ws && ws.readyState <= 1) ws.close(1000, 'client closed');
  }

  /** The socket URL, with where to resume from if there is anything to resume. */
  _socketUrl() {
    const p = this.position;
    this._asked = p && p.epoch ? { ...p } : null;
    if (!this._asked) return this.options.url;
    const sep = this.options.url.includes('?') ? '&' : '?';
    const q = `since=${encodeURIComponent(p.offset)}&epoch=${encodeURIComponent(p.epoch)}`;
    return `${this.options.url}${sep}${q}`;
  }

  _open() {
    this.state = 'connecting';
    const ws = new this.options.WebSocket(this._socketUrl());
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      opened = true;
      this.state = 'open';
      this._emit('connected', { url: this.options.url, attempt: this._attempt });
      this._schedulePing();
    };
    ws.onmessage = (ev) => ws === this._ws && this._onFrame(ev.data);
    ws.onclose = (ev) => ws === this._ws && this._onClose(ev, opened);
    // onerror is always followed by onclose, which does the work.
  }

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (!frame || typeof frame.type !== 'string') return;
    this._lastFrameAt = Date.now(); // any frame shows the socket is alive
    const followUp = [];
    switch (frame.type) {
      case 'hello': {
        this.hello = frame;
        this._helloAt = Date.now(); // the backoff starts over once this lasts
        const asked = this._asked;
        const sameUser = asked && asked.userId === frame.user_id;
        if (frame.epoch === undefined) {
          this.position = null; // the hub keeps no history
        } else if (sameUser && frame.recovered === true) {
          // Resume from what we had: the recovered frames follow, with their offsets.
          this.position = { userId: frame.user_id, epoch: frame.epoch, offset: asked.offset };
        } else {
          this.position = { userId: frame.user_id, epoch: frame.epoch, offset: frame.offset };
        }
        if (sameUser && frame.recovered === true) {
          followUp.push(['recovered', { missed: frame.missed ?? 0 }]);
        } else if (sameUser && frame.recovered === false) {
          followUp.push(['recovery_failed', { since: asked.offset, epoch: asked.epoch }]);
        }
        break;
      }
      case 'session_ended':
        this._ended = true;
        break;
      case 'pong':
        this._settle(this._pending.shift());
        break;
      case 'error':
        // A failed kill_session answers with an error before its pong.
        if (this._pending[0]?.kind === 'kill' && !this._pending[0].error) {
          this._pending[0].error = frame;
        }
        break;
    }
    // hello's offset is the user's latest, not where this client is: after a
    // recovering hello the missed frames follow and move the position themselves.
    if (frame.type !== 'hello' && frame.offset !== undefined && this.position) {
      this.position.offset = frame.offset;
    }
    this._emit('frame', frame);
    this._emit(frame.type, frame);
    for (const [type, detail] of followUp) this._emit(type, detail);
  }

  async _onClose(ev, opened) {
    this._drop();
    if (this.state === 'closed') return;
    this.state = 'connecting';
    if (this._helloAt !== null && Date.now() - this._helloAt >= STABLE_AFTER) this._attempt = 0;
    this._helloAt = null;
    if (ev.code === SESSION_ENDED && !this._ended) {
      // Closed as ended without the frame (e.g. by a fenced node): say so anyway.
      this._end('closed');
    }
    // A socket that never opened may have been refused for a dead session.
    if (!this._ended && !opened && this.options.sessionUrl && (await this._unauthorized())) {
      if (this.state === 'closed') return; // close() was called meanwhile
      this._end('unauthorized');
    }
    if (this.state === 'closed') return;
    // The browser came back online meanwhile and a socket is already opening.
    if (this._ws && !this._ended) return;
    let reconnectIn = null;
    if (this._ended) {
      this.state = 'closed';
    } else {
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
      reconnectIn = Math.round(Math.random() * ceiling); // full jitter
      this._attempt = Math.min(this._attempt + 1, 30);
      this._timer = setTimeout(
        () => this.state === 'connecting' && !this._ws && this._open(),
        reconnectIn,
      );
    }
    this._emit('disconnected', {
      code: ev.code,
      reason: ev.reason,
      wasClean: ev.wasClean,
      reconnectIn,
    });
  }

  _end(reason) {
    this._ended = true;
    this._emit('session_ended', {
      type: 'session_ended',
      session_id: this.hello?.session_id ?? null,
      reason,
    });
  }

  async _unauthorized() {
    try {
      const res = await this.options.fetch(this.options.sessionUrl, {
        credentials: 'same-origin',
        cache: 'no-store',
        signal: AbortSignal.timeout?.(5000),
      });
      return res.status === 401;
    } catch {
      return false; // the node is down: just try again later
    }
  }

  /** Forgets the current socket: timers, and requests waiting for a pong. */
  _drop() {
    clearTimeout(this._pingTimer);
    const pending = this._pending;
    this._pending = [];
    for (const p of pending) p.reject(new Error('sessionhub: disconnected'));
    if (this._ws) this._ws.onopen = this._ws.onmessage = this._ws.onclose = null;
    this._ws = null;
  }

  // ---- requests -----------------------------------------------------------

  /**
   * Ends one of the user's sessions (this one included) over the socket.
   * Resolves once the server has done it (it answers the ping sent right after in
   * order); rejects with the server's `error` frame (e.g. code "not_found"), or if
   * the socket is not open or drops first.
   */
  killSession(sessionId) {
    return this._request('kill', { type: 'kill_session', session_id: String(sessionId) });
  }

  /** Round trip to the server: resolves on its pong. */
  ping() {
    return this._request('ping', null);
  }

  _request(kind, frame) {
    return new Promise((resolve, reject) => {
      const ws = this._ws;
      if (this.state !== 'open' || !ws || ws.readyState !== 1) {
        reject(new Error('sessionhub: not connected'));
        return;
      }
      if (frame) ws.send(JSON.stringify(frame));
      ws.send('{"type":"ping"}');
      this._pending.push({ kind, resolve, reject, error: null });
    });
  }

  _settle(p) {
    if (!p) return;
    if (p.error) {
      const err = new Error(`sessionhub: ${p.error.code}: ${p.error.message}`);
      err.frame = p.error;
      p.reject(err);
    } else {
      p.resolve();
    }
  }

  /** Application-level keepalive, every pingInterval whatever else comes: the
   *  server counts only what the client sends as activity, so a page that only
   *  receives would otherwise idle out while open; and browsers hide protocol
   *  pings, so a half-open socket is only noticed by a pong that does not come. */
  _schedulePing() {
    const { pingInterval, pongTimeout } = this.options;
    clearTimeout(this._pingTimer);
    if (!pingInterval || this.state !== 'open') return;
    const ws = this._ws;
    this._pingTimer = setTimeout(() => {
      if (ws !== this._ws) return;
      const sentAt = Date.now();
      this.ping().catch(() => {});
      this._pingTimer = setTimeout(() => {
        if (ws !== this._ws) return;
        // Any frame since the ping shows the socket alive (its pong may be queued
        // behind a burst of messages).
        if (this._lastFrameAt >= sentAt) {
          this._schedulePing();
          return;
        }
        // No frame at all since: give up on this socket now (its close handshake
        // could hang as long as TCP does) and reconnect.
        this._onClose({ code: 4000, reason: 'pong timeout', wasClean: false }, true);
        ws.close(4000, 'pong timeout');
      }, pongTimeout);
    }, Math.max(0, pingInterval - pongTimeout));
  }
}

/** "Firefox on macOS" from a user agent; the raw text when it is unknown. */
export function describeAgent(ua) {
  if (!ua) return { label: 'Unknown device', browser: '' };
  const browser =
    /Edg(e|A|iOS)?\//.test(ua) ? 'Edge'
    : /OPR\/|Opera/.test(ua) ? 'Opera'
    : /Firefox\/|FxiOS/.test(ua) ? 'Firefox'
    : /HeadlessChrome/.test(ua) ? 'Headless Chrome'
    : /Chrome\/|CriOS|Chromium/.test(ua) ? 'Chrome'
    : /Safari\/|AppleWebKit.*Version\//.test(ua) ? 'Safari'
    : /^curl\//.test(ua) ? 'curl'
    : '';
  const os =
    /iPhone|iPad|iPod/.test(ua) ? 'iOS'
    : /Android/.test(ua) ? 'Android'
    : /CrOS/.test(ua) ? 'ChromeOS'
    : /Mac OS X|Macintosh/.test(ua) ? 'macOS'
    : /Windows/.test(ua) ? 'Windows'
    : /Linux|X11/.test(ua) ? 'Linux'
    : '';
  if (!browser) return { label: ua.length > 60 ? `${ua.slice(0, 57)}…` : ua, browser: '' };
  return { label: os ? `${browser} on ${os}` : browser, browser: browser.replace('Headless ', '') };
}

export default SessionHub;

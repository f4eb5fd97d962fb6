// The browser client (web/sessionhub.js) against a scripted WebSocket, in Node.js:
// the timing and ordering cases a real server cannot be made to produce on cue.
// Run by tests/tests/web_client.rs; exits non-zero with the failed assertion.
//
//   node tests/browser/client.mjs

import assert from 'node:assert/strict';
import { SessionHub } from '../../web/sessionhub.js';

const events = new EventTarget();
globalThis.addEventListener = events.addEventListener.bind(events);
globalThis.removeEventListener = events.removeEventListener.bind(events);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let sockets = [];

/** A WebSocket the test drives: open(), msg(frame), drop(code). */
class ScriptedSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    sockets.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  msg(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: '', wasClean: false });
  }
}

const hello = (extra = {}) => ({ type: 'hello', user_id: 'u', session_id: 's', ...extra });
const until = async (what, check, ms = 2000) => {
  const end = Date.now() + ms;
  while (!check()) {
    assert.ok(Date.now() < end, `timed out waiting for ${what}`);
    await sleep(5);
  }
};

const cases = {
  // The server counts only what a client sends as activity: a page that keeps
  // receiving messages must still ping, or its session idles out while open.
  async 'a page that keeps receiving messages still pings'() {
    const hub = new SessionHub({ url: 'ws://x/ws', WebSocket: ScriptedSocket, pingInterval: 200, pongTimeout: 100 });
    hub.connect();
    const ws = sockets[0];
    ws.open();
    ws.msg(hello());
    const feed = setInterval(() => ws.msg({ type: 'message', event: 'tick', data: 1 }), 20);
    try {
      await until('a ping while messages keep coming', () => ws.sent.some((f) => f.type === 'ping'));
      ws.msg({ type: 'pong' });
      const first = ws.sent.filter((f) => f.type === 'ping').length;
      await until('the next ping', () => ws.sent.filter((f) => f.type === 'ping').length > first);
      assert.equal(hub.state, 'open', 'the socket alive (frames kept coming) is kept');
    } finally {
      clearInterval(feed);
      hub.close();
    }
  },

  // With no frame at all after a ping, the socket is given up and replaced.
  async 'a socket silent after a ping is dropped and replaced'() {
    const hub = new SessionHub({ url: 'ws://x/ws', WebSocket: ScriptedSocket, pingInterval: 100, pongTimeout: 50, minDelay: 1, maxDelay: 1 });
    hub.connect();
    sockets[0].open();
    sockets[0].msg(hello());
    await until('the silent socket to be closed', () => sockets[0].closedWith === 4000);
    await until('a new socket', () => sockets.length === 2);
    hub.close();
  },

  // A recovering hello carries the user's latest offset; the client must keep
  // asking from where it was until the missed frames have come.
  async 'a drop during recovery asks again from where the client was'() {
    const hub = new SessionHub({ url: 'ws://x/ws', WebSocket: ScriptedSocket, pingInterval: 0, minDelay: 1, maxDelay: 1 });
    hub.connect();
    sockets[0].open();
    sockets[0].msg(hello({ epoch: 'e1', offset: '5' }));
    sockets[0].drop();
    await until('the first reconnect', () => sockets.length === 2);
    assert.match(sockets[1].url, /since=5&epoch=e1/);
    sockets[1].open();
    sockets[1].msg(hello({ epoch: 'e1', offset: '10', recovered: true, missed: 5 }));
    sockets[1].drop(); // before 6..10 came
    await until('the second reconnect', () => sockets.length === 3);
    assert.match(sockets[2].url, /since=5&epoch=e1/);
    sockets[2].open();
    sockets[2].msg(hello({ epoch: 'e1', offset: '10', recovered: true, missed: 5 }));
    sockets[2].msg({ type: 'message', event: 'm', data: 6, offset: '6' });
    sockets[2].drop(); // after 6, before 7..10
    await until('the third reconnect', () => sockets.length === 4);
    assert.match(sockets[3].url, /since=6&epoch=e1/);
    hub.close();
  },

  // `online` while the client asks whether a refused socket's session still lives:
  // one socket, never two (the other would stay open for the page's life).
  async 'coming back online during the session check opens one socket'() {
    let answer;
    const fetch = () => new Promise((r) => (answer = () => r({ status: 200 })));
    const hub = new SessionHub({ url: 'ws://x/ws', sessionUrl: '/api/v1/me', WebSocket: ScriptedSocket, pingInterval: 0, minDelay: 20, maxDelay: 20, fetch });
    hub.connect();
    sockets[0].drop(); // never opened: the client asks sessionUrl
    events.dispatchEvent(new Event('online'));
    await until('the online socket', () => sockets.length === 2);
    answer();
    await sleep(100); // past any reconnect delay
    assert.equal(sockets.length, 2, 'a second socket was opened');
    sockets[1].open();
    hub.close();
    assert.ok(sockets.every((s) => s.readyState === 3), 'a socket left open after close()');
  },

  // A server that closes every socket right after its hello is not hammered: the
  // backoff resets only once a socket has lasted.
  async 'closes right after hello still back off'() {
    const hub = new SessionHub({ url: 'ws://x/ws', WebSocket: ScriptedSocket, pingInterval: 0, minDelay: 100, maxDelay: 1e6 });
    const ceilings = [];
    hub.on('disconnected', (e) => ceilings.push(e.reconnectIn));
    hub.connect();
    for (let i = 0; i < 6; i++) {
      const ws = sockets.at(-1);
      ws.open();
      ws.msg(hello());
      ws.drop(1013);
      clearTimeout(hub._timer); // do not wait for the delay itself
      hub._open();
    }
    hub.close();
    // Full jitter draws from [0, 100·2^i]: by the sixth close the ceiling is 3.2 s,
    // and six draws all under 200 ms would have 1 chance in ~10^4.
    assert.ok(Math.max(...ceilings) > 200, `delays did not grow: ${ceilings}`);
  },
};

let failed = 0;
for (const [name, run] of Object.entries(cases)) {
  sockets = [];
  try {
    await run();
    console.log(`ok ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAILED ${name}: ${e.stack ?? e}`);
  }
}
process.exit(failed ? 1 : 0);

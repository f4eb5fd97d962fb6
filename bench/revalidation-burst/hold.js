// Holds N sockets per node (ports from argv), each on its own session, until killed.
const WebSocket = require(require('path').join(__dirname, '../peers/socketio/node_modules/ws'));
const http = require('http');
const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
const ports = process.argv[2].split(',').map(Number);
const per = Number(process.argv[3]);
function req(port, method, path, body) {
  return new Promise((res, rej) => {
    const r = http.request({ agent, port, method, path, headers: { authorization: 'Bearer peer-bench-key-0123456789', 'content-type': 'application/json' } }, (m) => { let b = ''; m.on('data', (c) => (b += c)); m.on('end', () => res(b)); });
    r.on('error', rej); if (body) r.write(JSON.stringify(body)); r.end();
  });
}
let n = 0;
async function one(port, i) {
  const s = JSON.parse(await req(port, 'POST', '/api/v1/sessions', { user_id: 'h' + port + '_' + i, user_agent: 'x' }));
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, { headers: { cookie: 'sh_session=' + s.token, origin: `http://127.0.0.1:${port}` } });
  await new Promise((r, j) => { ws.on('message', (d) => { if (JSON.parse(d).type === 'hello') r(); }); ws.on('error', j); });
  n++;
}
(async () => {
  for (const port of ports) {
    let i = 0;
    await Promise.all(Array.from({ length: 32 }, async () => { while (i < per) await one(port, i++); }));
  }
  console.log('held', n);
})();

#!/usr/bin/env python3
"""A node's instructions per HTTP request, by route, under callgrind.

    bench/request-cost/run.sh [binary]

Runs the node twice under `valgrind --tool=callgrind`, on a free port: on the
embedded in-memory engine (no Redis work anywhere), then on a private redis-server
(the node's side of each Redis call counted too: encoding the command, reading the
reply). Over one keep-alive connection it sends one request at a time: sessions to
look up and to kill first, a warm-up of each route, then each route's requests; the
last phase publishes to a user with one WebSocket on the node and reads each message
from it (less the publish phase, where the user has none: a delivery's cost), then
sends it batches of 32 messages (printed per message). The
instruction count of each phase (every thread of the node, its log line included:
the default `info` level) is dumped with `callgrind_control -d` and printed per
request. Counts repeat for one binary whatever the machine is doing (within ~1 %:
hash seeds, and on Redis the node's heartbeats), unlike times on a shared VM, so two
builds compare by running this on each. REQUEST_COST_KEEP=1 keeps the callgrind
files (one per phase) for callgrind_annotate. Needs valgrind, python3 and
redis-server.
"""
import base64, glob, http.client, json, os, re, shutil, socket, subprocess, sys, tempfile, time

binary = sys.argv[1] if len(sys.argv) > 1 else 'target/release/sessionhub'
KEY = 'request-cost-key-0123456789abcdef'
N = 500                                     # requests per phase
BATCH = 32                                  # messages per request of the batch phase


def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    return port


def ws_connect(port, token):
    """A WebSocket to the node with the session cookie, past its hello frame."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f'GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n'
                  f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n'
                  f'Origin: http://127.0.0.1:{port}\r\nCookie: sh_session={token}\r\n\r\n').encode())
    head = b''
    while b'\r\n\r\n' not in head:
        head += sock.recv(1)
    if not head.startswith(b'HTTP/1.1 101'):
        sys.exit(f'request-cost: the upgrade answered {head!r}')
    hello = json.loads(ws_read(sock))
    if hello.get('type') != 'hello':
        sys.exit(f'request-cost: the first frame was {hello!r}')
    return sock


def recv_exactly(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            sys.exit('request-cost: the socket closed')
        data += chunk
    return data


def ws_read(sock):
    """The payload of the next (unmasked, unfragmented) server frame."""
    b0, b1 = recv_exactly(sock, 2)
    n = b1 & 0x7f
    if n == 126:
        n = int.from_bytes(recv_exactly(sock, 2), 'big')
    elif n == 127:
        n = int.from_bytes(recv_exactly(sock, 8), 'big')
    return recv_exactly(sock, n)


def measure(redis_url):
    """Instructions per request of each phase, on Redis at `redis_url` or in memory."""
    port = free_port()
    out = tempfile.mkdtemp(prefix='request-cost-')
    env = {k: v for k, v in os.environ.items() if not k.startswith('SESSIONHUB_')}
    env.update(SESSIONHUB_API_KEY=KEY, SESSIONHUB_LISTEN=f'127.0.0.1:{port}', RUST_LOG='info')
    if redis_url:
        env['SESSIONHUB_REDIS_URL'] = redis_url
    vg = subprocess.Popen(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}/cg.%p', binary],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
            conn.request('GET', '/readyz'); res = conn.getresponse(); res.read()
            if res.status == 200:
                break
            conn.close()
        except OSError:
            pass
        if time.time() > deadline or vg.poll() is not None:
            sys.exit('request-cost: the node under valgrind did not start')
        time.sleep(0.5)

    def call(method, path, body=None):
        headers = {'Authorization': f'Bearer {KEY}'}
        if body is not None:
            body = json.dumps(body); headers['Content-Type'] = 'application/json'
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        return res.status, res.read()

    def new_session(i):
        status, body = call('POST', '/api/v1/sessions', {'user_id': f'u{i}'})
        if status != 201:
            sys.exit(f'request-cost: creating a session answered {status}: {body!r}')
        return json.loads(body)['session_id']

    # Sessions to look up and to kill, made before the measured phases.
    looked_up = new_session(0)
    doomed = iter([new_session(i) for i in range(1, N + 101)])
    # A socket of user `ws`, to which the last phase publishes: that phase less the
    # publish phase (user u1 has no socket) is the node's work to deliver a message.
    status, body = call('POST', '/api/v1/sessions', {'user_id': 'ws'})
    sock = ws_connect(port, json.loads(body)['token'])

    def publish_and_read():
        status, body = call('POST', '/api/v1/publish', {'to': {'user': 'ws'}, 'event': 'e', 'data': 1})
        frame = json.loads(ws_read(sock))
        if frame.get('type') != 'message':
            sys.exit(f'request-cost: the socket got {frame!r}')
        return status, body
    def batch_and_read():
        status, body = call('POST', '/api/v1/publish',
                            [{'to': {'user': 'ws'}, 'event': 'e', 'data': i} for i in range(BATCH)])
        for i in range(BATCH):
            frame = json.loads(ws_read(sock))
            if frame.get('type') != 'message' or frame.get('data') != i:
                sys.exit(f'request-cost: the socket got {frame!r} as message {i} of a batch')
        return status, body
    phases = [
        ('health', 'GET /healthz', lambda: call('GET', '/healthz'), 200),
        ('session', 'GET /api/v1/sessions/{id}', lambda: call('GET', f'/api/v1/sessions/{looked_up}'), 200),
        ('kill', 'DELETE /api/v1/sessions/{id}', lambda: call('DELETE', f'/api/v1/sessions/{next(doomed)}'), 204),
        ('publish', 'POST /api/v1/publish (a user)',
         lambda: call('POST', '/api/v1/publish', {'to': {'user': 'u1'}, 'event': 'e', 'data': 1}), 202),
        ('members', 'GET /api/v1/groups/{g}/members', lambda: call('GET', '/api/v1/groups/g/members'), 200),
        ('deliver', 'POST /api/v1/publish + its delivery', publish_and_read, 202),
        ('batch', f'a batch of {BATCH} + delivery, per message', batch_and_read, 202),
    ]

    def dump(tag):
        subprocess.run(['callgrind_control', '-d', tag, str(vg.pid)], capture_output=True, check=True)

    for _, _, fn, _ in phases:              # warm-up: a hundred requests of each
        for _ in range(100):
            fn()
    dump('setup')
    for phase, label, fn, want in phases:
        for _ in range(N):
            got, body = fn()
            if got != want:
                sys.exit(f'request-cost: {label} answered {got}, expected {want}: {body!r}')
        dump(phase)
    conn.close()
    sock.close()
    vg.terminate(); vg.wait(timeout=60)

    got = {}
    for f in glob.glob(f'{out}/cg.*'):
        text = open(f).read()
        m = re.search(r'^desc: Trigger: .*?dump (\S+)', text, re.M)
        t = re.search(r'^(?:summary|totals): (\d+)', text, re.M)
        if m and t:
            got[m.group(1)] = int(t.group(1))
    if os.environ.get('REQUEST_COST_KEEP'):
        print(f'callgrind files kept in {out} (callgrind_annotate --inclusive=yes <file>)', file=sys.stderr)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return [(label, got[phase] / N / (BATCH if phase == 'batch' else 1)) for phase, label, _, _ in phases]


memory = measure(None)
rport = free_port()
rdir = tempfile.mkdtemp(prefix='request-cost-redis-')
redis = subprocess.Popen(['redis-server', '--port', str(rport), '--bind', '127.0.0.1', '--save', '',
                          '--appendonly', 'no', '--dir', rdir],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    on_redis = measure(f'redis://127.0.0.1:{rport}')
finally:
    redis.terminate(); redis.wait(timeout=30)
    shutil.rmtree(rdir, ignore_errors=True)

print(f'binary: {binary}')
print(f'{"request":40s} {"in memory":>12s} {"on Redis":>12s}   (node instructions per request)')
for (label, mem), (_, red) in zip(memory, on_redis):
    print(f'{label:40s} {mem:12,.0f} {red:12,.0f}')

#!/usr/bin/env python3
"""A node's instructions per HTTP request, by route, under callgrind.

    bench/request-cost/run.sh [binary]

Starts the node (the embedded in-memory engine, so that no Redis work is counted)
under `valgrind --tool=callgrind` on a free port and sends it, over one keep-alive
connection, one request at a time: a warm-up, then each phase's requests. The
instruction count of each phase (every thread of the node) is dumped with
`callgrind_control -d` and printed per request. Counts repeat for one binary
whatever the machine is doing, unlike times on a shared VM, so two builds compare
by running this on each. Needs valgrind and python3.
"""
import glob, http.client, json, os, re, socket, subprocess, sys, tempfile, time

binary = sys.argv[1] if len(sys.argv) > 1 else 'target/release/sessionhub'
KEY = 'request-cost-key-0123456789abcdef'
N = 500                                     # requests per phase
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
out = tempfile.mkdtemp(prefix='request-cost-')
env = {k: v for k, v in os.environ.items() if not k.startswith('SESSIONHUB_')}
env.update(SESSIONHUB_API_KEY=KEY, SESSIONHUB_LISTEN=f'127.0.0.1:{port}', RUST_LOG='warn')
vg = subprocess.Popen(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}/cg.%p', binary],
                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
conn = None
deadline = time.time() + 120
while True:
    try:
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        conn.request('GET', '/healthz'); conn.getresponse().read()
        break
    except OSError:
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
PHASES = [
    ('health', 'GET /healthz', lambda: call('GET', '/healthz'), 200),
    ('session', 'GET /api/v1/sessions/{id}', lambda: call('GET', f'/api/v1/sessions/{looked_up}'), 200),
    ('kill', 'DELETE /api/v1/sessions/{id}', lambda: call('DELETE', f'/api/v1/sessions/{next(doomed)}'), 204),
    ('publish', 'POST /api/v1/publish (a user)',
     lambda: call('POST', '/api/v1/publish', {'to': {'user': 'u1'}, 'event': 'e', 'data': 1}), 202),
    ('members', 'GET /api/v1/groups/{g}/members', lambda: call('GET', '/api/v1/groups/g/members'), 200),
]

def dump(tag):
    subprocess.run(['callgrind_control', '-d', tag, str(vg.pid)], capture_output=True, check=True)

for _, _, fn, _ in PHASES:                  # warm-up: a hundred requests of each
    for _ in range(100):
        fn()
dump('setup')
for phase, label, fn, want in PHASES:
    for _ in range(N):
        got, _ = fn()
        if got != want:
            sys.exit(f'request-cost: {label} answered {got}, expected {want}')
    dump(phase)
conn.close()
vg.terminate(); vg.wait(timeout=60)

got = {}
for f in glob.glob(f'{out}/cg.*'):
    text = open(f).read()
    m = re.search(r'^desc: Trigger: .*?dump (\S+)', text, re.M)
    t = re.search(r'^(?:summary|totals): (\d+)', text, re.M)
    if m and t:
        got[m.group(1)] = int(t.group(1))
print(f'binary: {binary}')
for phase, label, _, _ in PHASES:
    print(f'{label:40s} {got[phase] / N:10,.0f} instructions per request')

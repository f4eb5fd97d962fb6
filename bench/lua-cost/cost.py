#!/usr/bin/env python3
"""Redis's own instructions per call of sessionhub's hot functions, under callgrind.

    bench/lua-cost/run.sh [lua/sessionhub.lua]     # or a library from another commit

Starts redis-server under `valgrind --tool=callgrind` on a free port, loads the
library, and drives the functions the way nodes do (FCALL with their arguments):
400 logins, 1,200 registrations (three sockets per session, on three nodes), 400
publishes to a user (with history), 50 batches of 32 messages to users of random
buckets, 400 kills of a session with three sockets, 100 publishes to a user with three
sessions of one socket each. The instruction count of each
phase is dumped (callgrind_control -d) and printed per call, with the commands the
functions ran per call (counted in a first run of the same workload without
valgrind, from INFO commandstats). Instructions are
repeatable for one redis-server binary and one library whatever the machine is
doing, unlike times on a shared 2-core VM. Needs valgrind, redis-server and the
Python package `redis` (pip install redis).
"""
import glob, json, os, random, re, socket, subprocess, sys, tempfile, time

import redis

args = [a for a in sys.argv[1:] if a != '--count']
lib = args[0] if args else 'lua/sessionhub.lua'
# With --count the same workload runs on a plain redis-server and prints, per phase,
# how many commands the functions ran (INFO commandstats); the callgrind run starts
# one such run first, so that no INFO lands in its instruction counts.
counting = '--count' in sys.argv
if not counting:
    per_call_commands = json.loads(subprocess.run(
        [sys.executable, __file__, lib, '--count'], capture_output=True, text=True, check=True).stdout)
random.seed(1)
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
out = tempfile.mkdtemp(prefix='lua-cost-')
server = ['redis-server', '--port', str(port), '--bind', '127.0.0.1', '--save', '',
          '--appendonly', 'no', '--dir', out]
if not counting:
    server = ['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}/cg.%p'] + server
vg = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
r = redis.Redis(port=port)
deadline = time.time() + 60
while True:
    try:
        r.ping(); break
    except redis.ConnectionError:
        if time.time() > deadline or vg.poll() is not None:
            sys.exit('redis-server under valgrind did not start')
        time.sleep(0.2)

def commands_run():
    """Commands run so far, but FCALL, FUNCTION and INFO: those the functions ran."""
    return sum(st['calls'] for name, st in r.info('commandstats').items()
               if not name.startswith(('cmdstat_fcall', 'cmdstat_function', 'cmdstat_info')))

inner, last = {}, [0]                        # phase -> commands its calls ran

def dump(tag):
    if counting:
        now = commands_run()
        inner[tag], last[0] = now - last[0], now
    else:
        subprocess.run(['callgrind_control', '-d', tag, str(vg.pid)], capture_output=True, check=True)

r.function_load(open(lib).read(), replace=True)
H = '0123456789abcdef' * 4                   # the stored secret hash (and the one sent)
NOW = int(time.time() * 1000)
EXP, LEASE, DAY = NOW + 86400000, NOW + 86400000, 86400000
HIST = (100, 300000, DAY)                    # history size, TTL ms, meta TTL ms
FRAME = '{"type":"message","event":"e","data":1}'

def hexid(prefix, n=32):
    return prefix + ''.join(random.choice('0123456789abcdef') for _ in range(n - len(prefix)))

def login(i, b):
    sid, uid = hexid(b), f'u{i}'
    r.fcall('sh_create_session', 2, f'sh:{{{b}}}:session:{sid}', f'sh:{{{b}}}:user:{uid}:sessions',
            uid, H, 'ua', '1.2.3.4', NOW, EXP, DAY, 0, '', '{"type":"session_created"}', *HIST)
    return b, sid, uid

def register(b, sid, node):
    r.fcall('sh_register_connection', 1, f'sh:{{{b}}}:session:{sid}', H, hexid(sid[:8]), node,
            NOW, 1000, 1000, LEASE, 0, *HIST)

N = 400
counts = {}
PHASES = [('login', 'login'), ('register', 'register'), ('publish', 'publish'),
          ('batch', 'batch message'), ('kill', 'kill (3 sockets)'),
          ('publish-multi', 'publish, 3 sessions')]
dump('setup')
sessions = [login(i, '%02x' % random.randrange(256)) for i in range(N)]
dump('login'); counts['login'] = N
for b, sid, _ in sessions:
    for node in ('node-1', 'node-2', 'node-3'):
        register(b, sid, node)
dump('register'); counts['register'] = 3 * N
for b, _, uid in sessions:
    r.fcall('sh_publish', 1, f'sh:{{{b}}}:user:{uid}:sessions', FRAME, 0, *HIST)
dump('publish'); counts['publish'] = N

def batch_one_call(group):
    keys = [f'sh:{{{b}}}:user:{uid}:sessions' for b, _, uid in group]
    r.fcall('sh_publish_batch', len(keys), *keys, 0, *HIST, *([FRAME] * len(keys)))

def batch_per_bucket(group):                 # what a node did before one call served any buckets
    for b, _, uid in group:
        r.fcall('sh_publish_batch', 1, f'sh:{{{b}}}:user:{uid}:sessions', 0, *HIST, FRAME)

group = sessions[:32]
try:
    batch_one_call(group); batch = batch_one_call
except redis.ResponseError:
    batch = batch_per_bucket
dump('batch-setup')
for _ in range(50):
    batch(group)
dump('batch'); counts['batch message'] = 50 * 32
for b, sid, _ in sessions:
    r.fcall('sh_kill_session', 1, f'sh:{{{b}}}:session:{sid}', 'killed', '', 0)
dump('kill'); counts['kill (3 sockets)'] = N
# A user logged in on three devices: three sessions with one socket each.
multi = []
for i in range(N // 4):
    b = '%02x' % random.randrange(256)
    for d in range(3):
        _, sid, uid = login(f'm{i}', b)
        register(b, sid, f'node-{d + 1}')
    multi.append((b, f'um{i}'))
dump('multi-setup')
for b, uid in multi:
    r.fcall('sh_publish', 1, f'sh:{{{b}}}:user:{uid}:sessions', FRAME, 0, *HIST)
dump('publish-multi'); counts['publish, 3 sessions'] = len(multi)
r.shutdown(nosave=True)
vg.wait()
if counting:
    print(json.dumps({label: inner[phase] / n for (phase, label), n in
                      ((p, counts[p[1]]) for p in PHASES)}))
    sys.exit(0)

got = {}
for f in glob.glob(f'{out}/cg.*'):
    text = open(f).read(4096)
    m = re.search(r'^desc: Trigger: .*?dump (\S+)', text, re.M)
    t = re.search(r'^(?:summary|totals): (\d+)', open(f).read(), re.M)
    if m and t:
        got[m.group(1)] = int(t.group(1))
print(f'library: {lib}, redis-server {subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]}')
print(f'batch calls: {"one per batch" if batch is batch_one_call else "one per target bucket"}')
for phase, label in PHASES:
    print(f'{label:20s} {got[phase] / counts[label]:10,.0f} instructions per call, '
          f'{per_call_commands[label]:5.1f} commands')

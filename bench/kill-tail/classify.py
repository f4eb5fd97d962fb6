#!/usr/bin/env python3
"""Why the slow kill trials were slow: lines a kill-only run's trial log (bench.js
--trial-log) up with a scheduler trace of the whole machine (perf sched_switch and
sched_wakeup events, `perf script` text, CLOCK_MONOTONIC) and, for each trial slower
than the threshold, finds the longest time one of the processes a kill goes through
(the load client's main thread, a server, Redis) was runnable but not running during
the trial, and what ran on that CPU meanwhile.

    classify.py TRIALS.json SCHED.txt [THRESHOLD_MS] [--list]
"""
import bisect
import collections
import json
import re
import sys

args = [a for a in sys.argv[1:] if not a.startswith('--')]
listing = '--list' in sys.argv
log = json.load(open(args[0]))
threshold = float(args[2]) if len(args) > 2 else 2.5
WAIT_MS = 0.5  # shorter waits are the ordinary hand-overs between processes

client = log['client_pid']
servers = set(log['server_pids'])
aux = {a['pid']: a['name'] for a in log['aux_pids']}


def role(pid, tid):
    if pid == client:
        return 'client main thread' if tid == client else 'client helper thread'
    if pid in servers:
        return 'server'
    if pid in aux:
        return aux[pid]
    return 'other'


LINE = re.compile(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$')
SWITCH = re.compile(r'prev_pid=(\d+).*prev_state=(\S+) ==> next_comm=.*? next_pid=(\d+)')
WAKE = re.compile(r'pid=(\d+)')
pid_of = {}          # tid -> pid (tgid), from the events each thread ran
comm_of = {}         # tid -> thread name
runnable = {}        # tid -> since when it waits for a CPU
waits = []           # (from, to, tid, cpu)
on_cpu = {}          # cpu -> (tid, since)
runs = collections.defaultdict(list)  # cpu -> [(from, to, tid)]
for line in open(args[1]):
    m = LINE.match(line)
    if not m:
        continue
    t, cpu, kind = float(m[5]) * 1000, int(m[4]), m[6]
    pid_of[int(m[3])] = int(m[2])
    comm_of[int(m[3])] = m[1].strip()
    if kind == 'sched_wakeup':
        runnable.setdefault(int(WAKE.search(m[7])[1]), t)
        continue
    s = SWITCH.search(m[7])
    prev, state, nxt = int(s[1]), s[2], int(s[3])
    if state.startswith('R'):
        runnable[prev] = t          # preempted: still wants the CPU
    else:
        runnable.pop(prev, None)
    if cpu in on_cpu:
        runs[cpu].append((on_cpu[cpu][1], t, on_cpu[cpu][0]))
    on_cpu[cpu] = (nxt, t)
    since = runnable.pop(nxt, None)
    if since is not None and nxt != 0 and t - since >= WAIT_MS:
        waits.append((since, t, nxt, cpu))
starts = {cpu: [r[0] for r in rs] for cpu, rs in runs.items()}


def holder(cpu, a, b):
    """Who ran longest on `cpu` between a and b."""
    took = collections.Counter()
    rs = runs[cpu]
    i = max(0, bisect.bisect_left(starts[cpu], a) - 1)
    while i < len(rs) and rs[i][0] < b:
        f, to, tid = rs[i]
        if tid != 0 and to > a:
            took[(role(pid_of.get(tid, tid), tid), tid)] += min(b, to) - max(a, f)
        i += 1
    return took.most_common(1)[0][0] if took else ('nobody (idle)', 0)


off = log['mono_offset_ms']
trials = log['trials']
slow = [tr for tr in trials if tr[1] >= threshold]
why = collections.Counter()
for tr in slow:
    a, b = tr[0] + off - 0.5, tr[0] + off + tr[1]
    mine = [w for w in waits if w[1] > a and w[0] < b
            and role(pid_of.get(w[2], w[2]), w[2]) not in ('other', 'client helper thread')]
    if not mine:
        why[('no wait over %.1f ms' % WAIT_MS, '')] += 1
        if listing:
            print('%6.2f ms (answer %.2f): no wait' % (tr[1], tr[2]))
        continue
    w = max(mine, key=lambda w: min(w[1], b) - max(w[0], a))
    who = role(pid_of.get(w[2], w[2]), w[2])
    held, htid = holder(w[3], w[0], w[1])
    if who == held == 'server':
        held = 'same server' if pid_of.get(htid) == pid_of.get(w[2]) else 'another server'
    why[(who, held)] += 1
    if listing:
        print('%6.2f ms (answer %.2f): %s %s/%d waited %.2f ms, its CPU ran %s/%d' % (
            tr[1], tr[2], who, comm_of.get(w[2]), w[2], w[1] - w[0], comm_of.get(htid), htid))
print('%d of %d trials took %.1f ms or more' % (len(slow), len(trials), threshold))
for (who, held), n in why.most_common():
    print('  %3d  %s' % (n, who + (' waited for a CPU that ran the ' + held if held else '')))

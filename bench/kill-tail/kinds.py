#!/usr/bin/env python3
"""The two kinds of slow kill trials, from trial logs alone (bench.js --trial-log; no
trace needed): for each log, the trials slower than the threshold, and how many of
them had their HTTP answer on time (under ANSWER_MS) while a socket ended late. The
other kind (the answer late too) waited before or during the killing node's call;
this kind is one node delivering late after Redis told it.

    kinds.py TRIALS.json... [--threshold MS (2.5)] [--answer MS (1.5)]

Each trial in the log is [start, total ms, answer ms, killing node, [end ms per socket]].
"""
import json
import math
import sys


def option(name, default):
    if name in sys.argv:
        return float(sys.argv[sys.argv.index(name) + 1])
    return default


threshold = option('--threshold', 2.5)
answer_ms = option('--answer', 1.5)
skip = {sys.argv.index(o) + 1 for o in ('--threshold', '--answer') if o in sys.argv}
files = [a for i, a in enumerate(sys.argv[1:], 1) if not a.startswith('--') and i not in skip]
if not files:
    sys.exit(__doc__)
print(f'{"log":48} {"trials":>6} {"p99 ms":>7} {"slow":>5} {"answer on time":>15}')
for path in files:
    log = json.load(open(path))
    trials = log['trials'] if isinstance(log, dict) else log
    totals = sorted(t[1] for t in trials)
    # bench.js's percentile: the ceil(p·n)-th smallest
    p99 = totals[max(0, math.ceil(0.99 * len(totals)) - 1)] if totals else float('nan')
    slow = [t for t in trials if t[1] >= threshold]
    on_time = sum(1 for t in slow if t[2] < answer_ms)
    print(f'{path[-48:]:48} {len(trials):>6} {p99:>7.2f} {len(slow):>5} {on_time:>15}')

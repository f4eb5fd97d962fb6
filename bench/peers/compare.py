#!/usr/bin/env python3
"""Interleaved side-by-side run of the peers and sessionhub on the same bench.js workload.

Run from the sessionhub checkout after `cargo build --release`:
    python3 bench/peers/compare.py [--rounds 3] [--systems socketio,socketioxide,sessionhub] [-- bench flags]
Each round runs every system once, in a rotated order, so machine drift hits all alike.
Prints the median of each figure per system, and sessionhub's ratio to the best peer.
Exit status 1 when sessionhub is behind the best peer on a headline figure (--strict).
"""
import os, re, subprocess, sys, statistics, time, json

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNERS = {
    "socketio": [os.path.join(HERE, "socketio", "run.sh")],
    "socketioxide": [os.path.join(HERE, "socketioxide", "run.sh")],
    "sessionhub": [os.path.join(HERE, "socketio", "run-sessionhub.sh")],
}
# figure, better direction
HEADLINE = [("connect_rate", "hi"), ("rss_per_conn_mean", "lo"), ("kill_p50", "lo"), ("kill_p99", "lo"),
            ("fanout_probe_latency_p50", "lo"), ("fanout_http_delivered_rate", "hi"),
            ("fanout_http_latency_p99", "lo"), ("fanout_http_server_cpu_per_notify", "lo"),
            ("kill_http_response_p50", "lo"), ("fanout_inproc_delivered_rate", "hi")]
# shown beside the headline, no verdict: what the probe's median is made of (the socket on
# the node the message was sent to, and the two on the other nodes)
DETAIL = ["fanout_probe_latency_local_p50", "fanout_probe_latency_remote_p50"]
LOSS = ["kill_trials_failed", "fanout_http_lost", "fanout_misrouted", "connect_failed", "bg_conn_dropped"]

def main():
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        i = args.index("--"); extra = args[i + 1:]; args = args[:i]
    rounds, systems, strict = 3, ["socketio", "socketioxide", "sessionhub"], False
    while args:
        a = args.pop(0)
        if a == "--rounds": rounds = int(args.pop(0))
        elif a == "--systems": systems = args.pop(0).split(",")
        elif a == "--strict": strict = True
    figs = {s: {} for s in systems}
    if os.environ.get("COMPARE_FROM"):  # summarise earlier runs: a file listing results.txt paths as "system path"
        for line in open(os.environ["COMPARE_FROM"]):
            s, path = line.split()
            block = re.search(r"==== RESULTS.*?==== END RESULTS", open(path).read(), re.S)
            for m in re.finditer(r"^(\w+): (\S+)", block.group(0), re.M):
                try: v = float(m.group(2))
                except ValueError: continue
                figs[s].setdefault(m.group(1), []).append(v)
        rounds = 0
    for r in range(rounds):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            t = time.time()
            p = subprocess.run(RUNNERS[s] + extra, capture_output=True, text=True, timeout=400)
            block = re.search(r"==== RESULTS.*?==== END RESULTS", p.stdout, re.S)
            if not block:
                print(f"round {r+1} {s}: no results (exit {p.returncode}): {p.stderr[-400:]}", flush=True)
                continue
            for m in re.finditer(r"^(\w+): (\S+)", block.group(0), re.M):
                try: v = float(m.group(2))
                except ValueError: continue
                figs[s].setdefault(m.group(1), []).append(v)
            print(f"round {r+1} {s}: ok in {time.time()-t:.0f} s", flush=True)
    med = {s: {k: statistics.median(v) for k, v in figs[s].items()} for s in systems}
    w = max(len(k) for k, _ in HEADLINE + [(x, 0) for x in LOSS + DETAIL])
    print("\n" + "figure".ljust(w) + "".join(s.rjust(14) for s in systems) + "   sessionhub vs best peer")
    behind = []
    for k, d in HEADLINE:
        row = k.ljust(w) + "".join((f"{med[s][k]:.4g}" if k in med[s] else "-").rjust(14) for s in systems)
        peers = [med[s][k] for s in systems if s != "sessionhub" and k in med[s]]
        if "sessionhub" in med and k in med["sessionhub"] and peers:
            best = max(peers) if d == "hi" else min(peers)
            mine = med["sessionhub"][k]
            ratio = mine / best if d == "hi" else best / mine
            row += f"   {ratio:.2f}x {'ahead' if ratio >= 1 else 'BEHIND'}"
            if ratio < 1: behind.append(k)
        print(row)
    for k in DETAIL:
        print(k.ljust(w) + "".join((f"{med[s][k]:.4g}" if k in med[s] else "-").rjust(14) for s in systems) + "   (detail)")
    for k in LOSS:
        print(k.ljust(w) + "".join((f"{max(figs[s].get(k, [0])):.4g}").rjust(14) for s in systems) + "   (worst run)")
    print(f"\nmedian of {max(len(v) for v in figs['sessionhub'].values()) if figs.get('sessionhub') else rounds} interleaved rounds; behind the best peer on: {', '.join(behind) or 'nothing'}")
    lost = [s for s in systems if any(max(figs[s].get(k, [0])) > 0 for k in LOSS)]
    if lost: print("loss or failure in: " + ", ".join(lost))
    sys.exit(1 if strict and (behind or "sessionhub" in lost) else 0)

main()

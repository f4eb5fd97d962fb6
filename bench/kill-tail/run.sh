#!/usr/bin/env bash
# Why the slowest kills were slow: one kill-only run of the peers harness under a
# scheduler trace of the whole machine, then classify.py on the two. Needs root (or
# kernel.perf_event_paranoid=-1) for the sched tracepoints, perf, and what the
# harness needs (node, redis-server; cargo build --release for sessionhub).
#
#   bench/kill-tail/run.sh [sessionhub|socketioxide|socketio] [kill trials (1000)] [threshold ms (2.5)]
#
# Writes trials.json, sched.data and sched.txt to bench/kill-tail/out/<system>-<time>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
SYSTEM="${1:-sessionhub}"; TRIALS="${2:-1000}"; THRESHOLD="${3:-2.5}"
case "$SYSTEM" in
  sessionhub) RUN=(bench/peers/socketio/run-sessionhub.sh) ;;
  socketioxide) RUN=(bench/peers/socketioxide/run.sh) ;;
  socketio) RUN=(bench/peers/socketio/run.sh) ;;
  *) echo "run.sh: unknown system $SYSTEM (sessionhub, socketioxide or socketio)" >&2; exit 2 ;;
esac
command -v perf >/dev/null || { echo "run.sh: perf is missing (apt-get install -y linux-perf)" >&2; exit 1; }
OUT="$PWD/bench/kill-tail/out/$SYSTEM-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
perf record -q -k CLOCK_MONOTONIC -e sched:sched_switch -e sched:sched_wakeup -a \
  -o "$OUT/sched.data" >"$OUT/perf.log" 2>&1 &
PERF=$!
trap 'kill -INT $PERF 2>/dev/null || true' EXIT
# perf writes its header once the tracepoints are open.
for _ in $(seq 100); do
  [ -s "$OUT/sched.data" ] && break
  kill -0 $PERF 2>/dev/null || { cat "$OUT/perf.log" >&2; echo "run.sh: perf record failed (root, or sysctl kernel.perf_event_paranoid=-1)" >&2; exit 1; }
  sleep 0.1
done
"${RUN[@]}" --phases connect,kill --kill-trials "$TRIALS" --trial-log "$OUT/trials.json" \
  >"$OUT/bench.log" 2>&1 || { tail -20 "$OUT/bench.log" >&2; exit 1; }
kill -INT $PERF; wait $PERF || true
trap - EXIT
perf script -i "$OUT/sched.data" -F comm,pid,tid,cpu,time,event,trace >"$OUT/sched.txt" 2>/dev/null
grep -E '^kill_(p50|p99|http_response_p50):' "$OUT/bench.log"
python3 bench/kill-tail/classify.py "$OUT/trials.json" "$OUT/sched.txt" "$THRESHOLD"
echo "run.sh: trace and trials in $OUT (classify.py ... --list for each trial)"

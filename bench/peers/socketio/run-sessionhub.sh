#!/usr/bin/env bash
# The same bench.js workload against sessionhub: 3 nodes (ports 3201-3203) and a
# private redis-server (no persistence, as for the Socket.IO peer). Run it from the
# sessionhub checkout after `cargo build --release`, or set SESSIONHUB_BIN.
# Stops exactly the processes it started (by PID).
#
#   bench/peers/socketio/run-sessionhub.sh [bench.js flags]
#
# A node refuses an unknown SESSIONHUB_* variable (a misspelt setting must not
# pass silently), so the load client's own variables (SESSIONHUB_FANOUT_MODE,
# SESSIONHUB_BIN, SESSIONHUB_COMMIT) are taken out of the nodes' environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${SESSIONHUB_BIN:-$PWD/target/release/sessionhub}"
[ -x "$BIN" ] || { echo "run-sessionhub.sh: no binary at $BIN (build it or set SESSIONHUB_BIN)" >&2; exit 1; }
COMMIT="$(git -C "$(dirname "$BIN")" rev-parse --short HEAD 2>/dev/null || echo unknown)"
cd "$HERE"

REDIS_PORT="${REDIS_PORT:-7389}"
PORTS=(3201 3202 3203)
BENCH_TIMEOUT="${BENCH_TIMEOUT:-255}"
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-sessionhub"
LOGDIR="$HERE/logs/$RUN_ID"
mkdir -p "$LOGDIR" "$HERE/results"
export SESSIONHUB_API_KEY="peer-bench-key-0123456789"

ulimit -n "$(ulimit -Hn)"
if ! node -e "require.resolve('ws')" 2>/dev/null; then npm ci --no-audit --no-fund >&2; fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$REDIS_PORT" "${PORTS[@]}"; do
  if port_busy "$p"; then echo "run-sessionhub.sh: port $p on 127.0.0.1 is already in use; not starting" >&2; exit 1; fi
done

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  local pid i alive
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 120); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "run-sessionhub.sh: stopped PIDs ${PIDS[*]:-none}" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --logfile "$LOGDIR/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for i in $(seq 100); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

SERVER_PIDS=()
n=0
for p in "${PORTS[@]}"; do
  n=$((n + 1))
  SESSIONHUB_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" SESSIONHUB_NODE_ID="node-$n" \
  SESSIONHUB_LISTEN="127.0.0.1:$p" \
    env -u SESSIONHUB_FANOUT_MODE -u SESSIONHUB_BIN -u SESSIONHUB_COMMIT \
    "$BIN" >"$LOGDIR/server-$p.log" 2>&1 &
  SERVER_PIDS+=("$!")
  PIDS+=("$!")
done
echo "run-sessionhub.sh: redis pid $REDIS_PID, nodes ${SERVER_PIDS[*]}, logs $LOGDIR" >&2

NODES="$(IFS=,; echo "${PORTS[*]}")"
SPIDS="$(IFS=,; echo "${SERVER_PIDS[*]}")"
set +e
SESSIONHUB_COMMIT="$COMMIT" timeout "$BENCH_TIMEOUT" node bench.js --transport sessionhub --nodes "$NODES" \
  --pids "$SPIDS" --aux-pids "redis=$REDIS_PID" --redis-port "$REDIS_PORT" --fanout-mode "${SESSIONHUB_FANOUT_MODE:-probe,http}" \
  --json "results/$RUN_ID.json" "$@" \
  >"$LOGDIR/bench.out" 2> >(tee "$LOGDIR/bench.err" >&2)
RC=$?
set -e
{
  echo "run_id: $RUN_ID"
  echo "bench_exit: $RC"
  echo "sessionhub_commit: $COMMIT"
  echo "cpu_cores: $(nproc)"
  sed -n '/^==== RESULTS/,/^==== END RESULTS/p' "$LOGDIR/bench.out"
} | tee "$LOGDIR/results.txt"
exit "$RC"

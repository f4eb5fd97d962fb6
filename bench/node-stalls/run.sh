#!/usr/bin/env bash
# How long a node's thread stalls in its periodic work while it holds many idle
# sockets: starts a private redis-server and one node (the given binary), holds N
# sockets on it (each its own session, bench/revalidation-burst/hold.js), then asks
# the node for /healthz every millisecond for a while (stall.py: 25 s spans two
# reconciliation rounds and 80 revalidation slices) and prints the distribution.
#
#   bench/node-stalls/run.sh [path/to/sessionhub] [sockets, default 18000] [seconds, default 25]
#
# One process may open 20,000 files on this project's machines, so one node holds
# at most ~19,000 sockets. Needs redis-server, node (with bench/peers/socketio's npm
# packages: `npm ci` there) and curl. Uses ports 7521 and 3421 on 127.0.0.1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-$HERE/../../target/release/sessionhub}"
N="${2:-18000}"
SECS="${3:-25}"
[ -x "$BIN" ] || { echo "run.sh: no binary at $BIN (cargo build --release)" >&2; exit 1; }
for tool in redis-server node python3 curl; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (apt-get install -y redis-server nodejs python3 curl)" >&2; exit 1; }
done
node -e "require('$HERE/../peers/socketio/node_modules/ws')" 2>/dev/null \
  || (cd "$HERE/../peers/socketio" && npm ci --no-audit --no-fund >&2)
RP=7521; PORT=3421
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$RP" "$PORT"; do
  if port_busy "$p"; then echo "run.sh: port $p is already in use" >&2; exit 1; fi
done
D=$(mktemp -d); PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --dir "$D" --daemonize no >/dev/null &
PIDS+=("$!")
for i in $(seq 100); do redis-cli -p $RP ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
SESSIONHUB_REDIS_URL=redis://127.0.0.1:$RP SESSIONHUB_NODE_ID=node-1 SESSIONHUB_LISTEN=127.0.0.1:$PORT \
  SESSIONHUB_API_KEY=peer-bench-key-0123456789 "$BIN" >"$D/node.log" 2>&1 &
PIDS+=("$!")
for i in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
node "$HERE/../revalidation-burst/hold.js" $PORT "$N" >"$D/hold.log" 2>&1 &
PIDS+=("$!")
for i in $(seq 1500); do grep -q held "$D/hold.log" && break; sleep 0.2; done
cat "$D/hold.log"
grep -q held "$D/hold.log" || { echo "run.sh: the sockets were not all held" >&2; tail -5 "$D/node.log" >&2; exit 1; }
sleep 2
python3 "$HERE/stall.py" $PORT "$SECS"

#!/usr/bin/env bash
# How long Redis stalls while three idle nodes revalidate their sockets' sessions:
# starts a private redis-server and 3 nodes (the given binary), holds 3,000 sockets
# per node (each its own session, bench/revalidation-burst/hold.js), then PINGs Redis
# every millisecond for 20 s (lat.py) and prints the latency distribution.
#
#   bench/revalidation-burst/run.sh [path/to/sessionhub]   # default target/release/sessionhub
#
# Needs redis-server, node (with bench/peers/socketio's npm packages: `npm ci` there)
# and the Python package redis. Uses ports 7511 and 3411-3413 on 127.0.0.1.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${1:-$HERE/../../target/release/sessionhub}"
[ -x "$BIN" ] || { echo "run.sh: no binary at $BIN (cargo build --release)" >&2; exit 1; }
for tool in redis-server node python3 curl; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (apt-get install -y redis-server nodejs python3 curl)" >&2; exit 1; }
done
python3 -c 'import redis' 2>/dev/null || { echo "run.sh: the Python package redis is missing (pip install redis)" >&2; exit 1; }
node -e "require('$HERE/../peers/socketio/node_modules/ws')" 2>/dev/null \
  || (cd "$HERE/../peers/socketio" && npm ci --no-audit --no-fund >&2)
RP=7511; PORTS=(3411 3412 3413)
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$RP" "${PORTS[@]}"; do
  if port_busy "$p"; then echo "run.sh: port $p is already in use" >&2; exit 1; fi
done
D=$(mktemp -d); PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --dir "$D" --daemonize no >/dev/null &
PIDS+=("$!")
for i in $(seq 100); do redis-cli -p $RP ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
n=0
for p in "${PORTS[@]}"; do
  n=$((n + 1))
  SESSIONHUB_REDIS_URL=redis://127.0.0.1:$RP SESSIONHUB_NODE_ID=node-$n SESSIONHUB_LISTEN=127.0.0.1:$p \
    SESSIONHUB_API_KEY=peer-bench-key-0123456789 "$BIN" >"$D/node-$n.log" 2>&1 &
  PIDS+=("$!")
done
for p in "${PORTS[@]}"; do
  for i in $(seq 100); do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.1; done
done
ulimit -n "$(ulimit -Hn)"
node "$HERE/hold.js" 3411,3412,3413 3000 >"$D/hold.log" 2>&1 &
PIDS+=("$!")
for i in $(seq 600); do grep -q held "$D/hold.log" && break; sleep 0.2; done
cat "$D/hold.log"
sleep 2
python3 "$HERE/lat.py" $RP 20

#!/usr/bin/env bash
# sessionhub side by side with Socket.IO 4.8 and socketioxide 0.18: the same load
# client (bench/peers/socketio/bench.js) against 3 nodes of each, one private
# redis-server each, on loopback; interleaved rounds; prints the median of every
# headline figure and sessionhub's ratio to the best peer (bench/peers/README.md).
#
#   scripts/peers.sh                          # 3 rounds of all three (~6 min on 2 cores)
#   scripts/peers.sh --rounds 1 --systems sessionhub -- --bg-per-node 300   # quick look
#
# Needs node + npm (the runners run `npm ci`), redis-server, and cargo (the
# socketioxide peer is built on first use, ~2 min). Run nothing else meanwhile:
# compare only figures of one interleaved run.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in node npm redis-server python3; do
  command -v "$tool" >/dev/null || {
    echo "peers.sh: $tool is missing (apt-get install -y nodejs npm redis-server python3)" >&2
    exit 1
  }
done
cargo build --release --bins
# Batch publish (the `inproc` mode) is measured too.
export SESSIONHUB_FANOUT_MODE="${SESSIONHUB_FANOUT_MODE:-probe,http,inproc}"
exec python3 bench/peers/compare.py "$@"

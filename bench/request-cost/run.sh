#!/usr/bin/env bash
# A node's own instructions per HTTP request, by route (see cost.py).
#   bench/request-cost/run.sh                      # target/release/sessionhub
#   bench/request-cost/run.sh /tmp/other-build     # another binary, to compare
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in valgrind callgrind_control python3 redis-server; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (apt-get install -y valgrind python3 redis-server)" >&2; exit 1; }
done
BIN="${1:-target/release/sessionhub}"
[ -x "$BIN" ] || { echo "run.sh: no binary at $BIN (cargo build --release)" >&2; exit 1; }
exec python3 bench/request-cost/cost.py "$BIN"

#!/usr/bin/env bash
# Redis's instructions and commands per call of sessionhub's functions (see cost.py).
#   bench/lua-cost/run.sh                         # the working tree's library
#   git show <commit>:lua/sessionhub.lua > /tmp/old.lua && bench/lua-cost/run.sh /tmp/old.lua
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in valgrind callgrind_control redis-server python3; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (apt-get install -y valgrind redis-server python3)" >&2; exit 1; }
done
python3 -c 'import redis' 2>/dev/null || { echo "run.sh: the Python package redis is missing (pip install redis)" >&2; exit 1; }
exec python3 bench/lua-cost/cost.py "${1:-lua/sessionhub.lua}"

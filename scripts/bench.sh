#!/usr/bin/env bash
# Benchmarks a local cluster: builds in release, starts its own redis-server and
# sessionhub nodes on free loopback ports (in a temp dir), runs sessionhub-bench
# (every workload), prints one line per figure (`name: value unit`) on stdout, and
# stops exactly what it started.
#
#   scripts/bench.sh                  # full run: 10,000 background sockets
#   scripts/bench.sh --small          # every workload at a small N, well under a minute
#   scripts/bench.sh --sockets 5000   # background sockets of the main load process
#   scripts/bench.sh --holders 2 --hold-sockets 15000   # extra load processes that
#                                     # only hold sockets (one process holds <= 16,000)
#   scripts/bench.sh --nodes 5        # more nodes (each holds < 20,000 open files)
#   scripts/bench.sh -- --kills 500   # anything after -- goes to `sessionhub-bench all`
#
# Environment: BENCH_SMALL=1 is --small; BENCH_AOF=no runs Redis without AOF (the
# default is the README's setup: appendonly yes, appendfsync everysec);
# RUST_LOG is passed to the nodes (default info).
set -euo pipefail
cd "$(dirname "$0")/.."

small=${BENCH_SMALL:-0}
nodes=3
sockets=""
holders=0
hold_sockets=10000
extra=()
while (($#)); do
  case "$1" in
    --small) small=1 ;;
    --nodes) nodes=$2; shift ;;
    --sockets) sockets=$2; shift ;;
    --holders) holders=$2; shift ;;
    --hold-sockets) hold_sockets=$2; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$small" = 1 ]; then
  sockets=${sockets:-300}
  workload=(--kills 30 --users 100 --messages 3000 --cost-ops 20 --cost-idle-ms 1000)
else
  sockets=${sockets:-10000}
  workload=(--kills 300 --users 1000 --messages 30000 --cost-ops 100)
fi

command -v redis-server >/dev/null || {
  echo "bench.sh: redis-server is not installed (apt-get install -y redis-server)" >&2
  exit 1
}

# As many open files as this shell may have (nodes and load processes inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "bench.sh: open files per process: $(ulimit -n)" >&2

cargo build --release --bins >&2
bin=target/release

work=$(mktemp -d "${TMPDIR:-/tmp}/sessionhub-bench.XXXXXX")
pids=()
cleanup() {
  local pid end
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  end=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# A port nothing listens on right now (redis-server retries if it is taken anyway).
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

# Waits (bounded) until file $1 has a line matching $2, and prints it.
wait_line() {
  local file=$1 pattern=$2 what=$3 pid=$4 end=$((SECONDS + 30)) line
  while ((SECONDS < end)); do
    line=$(grep -m1 -e "$pattern" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "$line"; return; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench.sh: $what did not start; its output:" >&2
  cat "$file" "${file%.out}.log" >&2 2>/dev/null || true
  exit 1
}

# Redis on its own port and directory.
aof=(--appendonly yes --appendfsync everysec)
[ "${BENCH_AOF:-yes}" = no ] && aof=(--appendonly no)
for _ in 1 2 3 4 5; do
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" "${aof[@]}" \
    --dir "$work" --logfile redis.log --maxclients 10000 &
  redis_pid=$!
  end=$((SECONDS + 10))
  while ((SECONDS < end)) && kill -0 "$redis_pid" 2>/dev/null &&
    ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
  if redis-cli -p "$redis_port" ping >/dev/null 2>&1; then pids+=("$redis_pid"); break; fi
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
done
[ -n "${redis_pid:-}" ] || { echo "bench.sh: redis-server did not start" >&2; cat "$work/redis.log" >&2; exit 1; }
redis_url="redis://127.0.0.1:$redis_port"

api_key="bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
node_args=()
pid_args=()
for i in $(seq 1 "$nodes"); do
  SESSIONHUB_REDIS_URL=$redis_url SESSIONHUB_NODE_ID="bench-node-$i" \
    SESSIONHUB_API_KEY=$api_key SESSIONHUB_LISTEN=127.0.0.1:0 RUST_LOG=${RUST_LOG:-info} \
    "$bin/sessionhub" >"$work/node$i.out" 2>"$work/node$i.log" &
  pid=$!
  pids+=("$pid")
  line=$(wait_line "$work/node$i.out" "listening on http://" "node $i" "$pid")
  addr=$(sed -n 's|.*listening on \(http://[^ ]*\).*|\1|p' <<<"$line")
  node_args+=(--node "$addr")
  pid_args+=(--node-pid "$pid")
  echo "bench.sh: node $i (pid $pid) on $addr" >&2
done

export SESSIONHUB_API_KEY=$api_key
for h in $(seq 1 "$holders"); do
  "$bin/sessionhub-bench" "${node_args[@]}" --source-octet $((10 + h)) \
    hold --sockets "$hold_sockets" --hold-secs 1800 >"$work/hold$h.out" 2>"$work/hold$h.log" &
  pid=$!
  pids+=("$pid")
  end=$((SECONDS + 600))
  until grep -q '^held:' "$work/hold$h.out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null && ((SECONDS < end)) || {
      echo "bench.sh: holder $h failed:" >&2; cat "$work/hold$h.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "bench.sh: holder $h (pid $pid) holds $hold_sockets sockets" >&2
done

cmd=("$bin/sessionhub-bench" "${node_args[@]}" all "${pid_args[@]}" --redis-pid "$redis_pid"
  --redis-url "$redis_url"
  --sockets "$sockets" "${workload[@]}" "${extra[@]}")
echo "bench.sh: ${cmd[*]}" >&2
"${cmd[@]}"

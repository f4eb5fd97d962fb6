#!/usr/bin/env bash
# Benchmarks a local cluster: builds in release, starts its own Redis (one
# redis-server, or a Redis Cluster with --cluster) and sessionhub nodes on free
# loopback ports (in a temp dir), runs sessionhub-bench, prints one line per figure
# (`name: value unit`) on stdout, and stops exactly what it started.
#
#   scripts/bench.sh                  # full run: 10,000 background sockets
#   scripts/bench.sh --small          # every workload at a small N, well under a minute
#   scripts/bench.sh --sockets 5000   # background sockets of the main load process
#   scripts/bench.sh --holders 2 --hold-sockets 15000   # extra load processes that
#                                     # only hold sockets (one process holds <= 16,000)
#   scripts/bench.sh --nodes 5        # more nodes (each holds < 20,000 open files)
#   scripts/bench.sh --deliver        # only the targeted-delivery workload
#   scripts/bench.sh --rolling        # only the rolling-restart workload (it starts
#                                     # and restarts its own nodes on this Redis)
#   scripts/bench.sh --webhook        # only the lifecycle-event webhook workload (the
#                                     # load tool is the receiver; 10,000 events)
#   scripts/bench.sh --cluster        # on a 3-master Redis Cluster (SESSIONHUB_REDIS_CLUSTER)
#   scripts/bench.sh --cluster --shards 5   # ... with 5 masters (no replicas)
#   scripts/bench.sh -- --kills 500   # anything after -- goes to `sessionhub-bench`
#                                     # (after the defaults above, so it overrides them)
#
# After the workload it prints, for each Redis server, the calls of FCALL, PUBLISH
# and SPUBLISH it ran during the workload (`redis_shard<i>_<command>`; counters reset
# just before): on a Redis Cluster that is how the load spread over the shards.
# With --cluster the Redis cost workload is skipped (it counts commands with MONITOR,
# which sees one server only); every other workload runs as on one Redis.
#
# Environment: BENCH_SMALL=1 is --small; BENCH_AOF=no runs Redis without AOF, =yes
# with (defaults: one Redis has AOF on, appendfsync everysec, the README's setup; a
# Redis Cluster has it off); RUST_LOG is passed to the nodes (default info).
set -euo pipefail
cd "$(dirname "$0")/.."

small=${BENCH_SMALL:-0}
nodes=3
cluster=0
shards=3
deliver_only=0
rolling=0
webhook_only=0
sockets=""
holders=0
hold_sockets=10000
extra=()
while (($#)); do
  case "$1" in
    --small) small=1 ;;
    --nodes) nodes=$2; shift ;;
    --cluster) cluster=1 ;;
    --shards) cluster=1; shards=$2; shift ;;
    --deliver) deliver_only=1 ;;
    --rolling) rolling=1 ;;
    --webhook) webhook_only=1 ;;
    --sockets) sockets=$2; shift ;;
    --holders) holders=$2; shift ;;
    --hold-sockets) hold_sockets=$2; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$small" = 1 ]; then
  sockets=${sockets:-300}
  workload=(--kills 30 --users 100 --messages 3000 --cost-ops 20 --cost-idle-ms 1000)
  deliver_workload=(--users 100 --messages 3000)
  webhook_workload=(--events 500)
else
  sockets=${sockets:-10000}
  workload=(--kills 300 --users 1000 --messages 30000 --cost-ops 100)
  deliver_workload=(--users 1000 --messages 30000)
  webhook_workload=(--events 10000)
fi
if ((cluster)) && ! ((shards >= 3)); then
  echo "bench.sh: a Redis Cluster needs at least 3 masters (--shards $shards)" >&2
  exit 2
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

# Starts redis-server on a free port with its own directory $1 and extra arguments
# (retrying on another port if the chosen one is taken before it binds); sets
# $started_port and $started_pid, and adds the PID to $pids.
start_redis() {
  local dir=$1 port pid end
  shift
  mkdir -p "$dir"
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$dir" \
      --logfile redis.log --maxclients 10000 "$@" &
    pid=$!
    end=$((SECONDS + 10))
    while ((SECONDS < end)) && kill -0 "$pid" 2>/dev/null &&
      ! redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
      pids+=("$pid")
      started_port=$port started_pid=$pid
      return
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "bench.sh: redis-server did not start" >&2
  cat "$dir/redis.log" >&2
  exit 1
}

redis_ports=()
redis_pids=()
if ((cluster)); then
  aof=(--appendonly no)
  [ "${BENCH_AOF:-no}" = yes ] && aof=(--appendonly yes --appendfsync everysec)
  # Masters only, no replicas; each with its own directory, nodes.conf and bus port
  # (given explicitly: the default, port + 10000, may be past 65535).
  for i in $(seq 0 $((shards - 1))); do
    start_redis "$work/redis$i" "${aof[@]}" --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-port "$(free_port)"
    redis_ports+=("$started_port")
    redis_pids+=("$started_pid")
  done
  create=()
  for p in "${redis_ports[@]}"; do create+=("127.0.0.1:$p"); done
  timeout 60 redis-cli --cluster create "${create[@]}" --cluster-replicas 0 --cluster-yes \
    >"$work/cluster-create.log" 2>&1 || {
    echo "bench.sh: redis-cli --cluster create failed:" >&2
    cat "$work/cluster-create.log" >&2
    exit 1
  }
  # Until every master says the cluster is ok, knows every other master, and sees
  # all 16384 slots assigned (bounded; polled).
  end=$((SECONDS + 30))
  for p in "${redis_ports[@]}"; do
    until info=$(redis-cli -p "$p" cluster info 2>/dev/null | tr -d '\r') &&
      grep -qx 'cluster_state:ok' <<<"$info" &&
      grep -qx "cluster_known_nodes:$shards" <<<"$info" &&
      grep -qx 'cluster_slots_assigned:16384' <<<"$info"; do
      ((SECONDS < end)) || {
        echo "bench.sh: the Redis Cluster did not become ok; CLUSTER INFO of :$p:" >&2
        echo "$info" >&2
        exit 1
      }
      sleep 0.05
    done
  done
  seeds=()
  for p in "${redis_ports[@]}"; do seeds+=("redis://127.0.0.1:$p"); done
  redis_env=(SESSIONHUB_REDIS_CLUSTER="$(IFS=,; echo "${seeds[*]}")")
  echo "bench.sh: Redis Cluster of $shards masters on ports ${redis_ports[*]} (pids ${redis_pids[*]})" >&2
else
  aof=(--appendonly yes --appendfsync everysec)
  [ "${BENCH_AOF:-yes}" = no ] && aof=(--appendonly no)
  start_redis "$work" "${aof[@]}"
  redis_ports+=("$started_port")
  redis_pids+=("$started_pid")
  redis_url="redis://127.0.0.1:$started_port"
  redis_env=(SESSIONHUB_REDIS_URL="$redis_url")
  echo "bench.sh: Redis on port $started_port (pid $started_pid)" >&2
fi

api_key="bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
if ((rolling)); then
  ((cluster)) && { echo "bench.sh: --rolling runs on one Redis" >&2; exit 2; }
  cmd=("$bin/sessionhub-bench" rolling --server-bin "$bin/sessionhub" --redis-url "$redis_url"
    --nodes "$nodes" "${extra[@]}")
  echo "bench.sh: ${cmd[*]}" >&2
  SESSIONHUB_API_KEY=$api_key "${cmd[@]}"
  exit
fi
webhook_env=()
if ((webhook_only)); then
  webhook_port=$(free_port)
  export SESSIONHUB_WEBHOOK_SECRET="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  webhook_env=(SESSIONHUB_WEBHOOK_URL="http://127.0.0.1:$webhook_port/hook")
fi
node_args=()
pid_args=()
for i in $(seq 1 "$nodes"); do
  env "${redis_env[@]}" "${webhook_env[@]}" SESSIONHUB_NODE_ID="bench-node-$i" \
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

redis_pid_args=()
for pid in "${redis_pids[@]}"; do redis_pid_args+=(--redis-pid "$pid"); done
if ((webhook_only)); then
  memory=()
  ((cluster)) || memory=(--redis-url "$redis_url")
  cmd=("$bin/sessionhub-bench" "${node_args[@]}" webhook --listen "127.0.0.1:$webhook_port"
    "${memory[@]}" "${webhook_workload[@]}" "${extra[@]}")
elif ((deliver_only)); then
  cmd=("$bin/sessionhub-bench" "${node_args[@]}" deliver "${pid_args[@]}" "${redis_pid_args[@]}"
    "${deliver_workload[@]}" "${extra[@]}")
else
  cost=()
  if ((cluster)); then
    echo "bench.sh: Redis Cluster: the Redis cost workload is skipped (MONITOR sees one server)" >&2
  else
    cost=(--redis-url "$redis_url")
  fi
  cmd=("$bin/sessionhub-bench" "${node_args[@]}" all "${pid_args[@]}" "${redis_pid_args[@]}"
    "${cost[@]}" --sockets "$sockets" "${workload[@]}" "${extra[@]}")
fi

# What each Redis server runs during the workload alone.
for p in "${redis_ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
echo "bench.sh: ${cmd[*]}" >&2
"${cmd[@]}"

# Calls of `cmdstat_<name>` in `INFO commandstats` of the server on port $1.
calls() {
  redis-cli -p "$1" info commandstats | tr -d '\r' |
    sed -n "s/^cmdstat_$2:calls=\([0-9]*\),.*/\1/p" | grep . || echo 0
}
for i in "${!redis_ports[@]}"; do
  p=${redis_ports[$i]}
  echo "bench.sh: Redis server $i is on port $p" >&2
  for c in fcall publish spublish; do
    echo "redis_shard${i}_$c: $(calls "$p" "$c") calls"
  done
done

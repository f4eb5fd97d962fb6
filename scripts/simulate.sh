#!/usr/bin/env bash
# The many-node simulation of issue 21: starts its own Redis (one redis-server, or a
# 3-master Redis Cluster with --cluster) and N sessionhub nodes with
# SESSIONHUB_WORKERS=1 on free loopback ports (in a temp dir), and measures, printing
# one `name: value unit` line per figure on stdout:
#
#   - start-up: the time from launching all N nodes at once to each answering
#     /readyz (p50, max), and the Redis commands until the sweeps of their start
#     are done;
#   - idle: Redis commands a second (INFO commandstats of every master, the commands
#     run inside functions included) and CPU (nodes, Redis) over --idle-secs, once
#     the start-up sweeps are done (no bucket of sh:sweep due in the window);
#   - load: the same over a login/kill/publish mix driven by `sessionhub-bench all`
#     (a few sockets per node; its own figures are printed too);
#   - reaping: the time from SIGKILLing one node (holding sockets) until its lease
#     left sh:nodes, i.e. its records were dropped from every bucket.
#
#   scripts/simulate.sh --nodes 100              # one Redis
#   scripts/simulate.sh --nodes 100 --cluster    # a 3-master Redis Cluster
#   scripts/simulate.sh --nodes 3 --no-build --bin target/debug
#
# Options: --nodes N (default 100), --cluster, --idle-secs S (default 20),
# --sockets-per-node K (background sockets, default 3), --no-build, --bin DIR
# (default target/release). Stops exactly what it started. Needs redis-server and
# redis-cli (Redis >= 7) and `ulimit -n` well above 4 x N.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=100
cluster=0
shards=3
idle_secs=20
per_node=3
build=1
bin=target/release
while (($#)); do
  case "$1" in
    --nodes) nodes=$2; shift ;;
    --cluster) cluster=1 ;;
    --idle-secs) idle_secs=$2; shift ;;
    --sockets-per-node) per_node=$2; shift ;;
    --no-build) build=0 ;;
    --bin) bin=$2; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "simulate.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
((build)) && cargo build --release --bins >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/sessionhub-sim.XXXXXX")
pids=()
cleanup() {
  local pid end
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  end=$((SECONDS + 20))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

now_ms() { date +%s%3N; }

# Starts redis-server on a free port in directory $1 with extra arguments; sets
# $started_port and $started_pid.
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
  echo "simulate.sh: redis-server did not start" >&2
  exit 1
}

redis_ports=()
redis_pids=()
if ((cluster)); then
  for i in $(seq 0 $((shards - 1))); do
    start_redis "$work/redis$i" --appendonly no --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-port "$(free_port)"
    redis_ports+=("$started_port")
    redis_pids+=("$started_pid")
  done
  create=()
  for p in "${redis_ports[@]}"; do create+=("127.0.0.1:$p"); done
  timeout 60 redis-cli --cluster create "${create[@]}" --cluster-replicas 0 --cluster-yes \
    >"$work/cluster-create.log" 2>&1 || { cat "$work/cluster-create.log" >&2; exit 1; }
  end=$((SECONDS + 30))
  for p in "${redis_ports[@]}"; do
    until info=$(redis-cli -p "$p" cluster info 2>/dev/null | tr -d '\r') &&
      grep -qx 'cluster_state:ok' <<<"$info" &&
      grep -qx "cluster_known_nodes:$shards" <<<"$info" &&
      grep -qx 'cluster_slots_assigned:16384' <<<"$info"; do
      ((SECONDS < end)) || { echo "simulate.sh: the Redis Cluster did not become ok" >&2; exit 1; }
      sleep 0.05
    done
  done
  seeds=()
  for p in "${redis_ports[@]}"; do seeds+=("redis://127.0.0.1:$p"); done
  redis_env=(SESSIONHUB_REDIS_CLUSTER="$(IFS=,; echo "${seeds[*]}")")
  index_cli=(redis-cli -c -p "${redis_ports[0]}")   # follows sh:sweep to its master
else
  start_redis "$work" --appendonly yes --appendfsync everysec
  redis_ports+=("$started_port")
  redis_pids+=("$started_pid")
  redis_env=(SESSIONHUB_REDIS_URL="redis://127.0.0.1:$started_port")
  index_cli=(redis-cli -p "$started_port")
fi
echo "simulate.sh: Redis on ${redis_ports[*]}; $nodes nodes" >&2

# Sum of `calls` over INFO commandstats of every master, less INFO/CONFIG (ours).
commands_total() {
  local p total=0 n
  for p in "${redis_ports[@]}"; do
    n=$(redis-cli -p "$p" info commandstats | tr -d '\r' |
      grep -v -e '^cmdstat_info:' -e '^cmdstat_config' |
      sed -n 's/^cmdstat_[^:]*:calls=\([0-9]*\),.*/\1/p' | awk '{ t += $1 } END { print t + 0 }')
    total=$((total + ${n:-0}))
  done
  echo "$total"
}
# Per-command calls summed over masters, as "name=calls" words.
commands_by_name() {
  for p in "${redis_ports[@]}"; do redis-cli -p "$p" info commandstats | tr -d '\r'; done |
    grep -v -e '^cmdstat_info:' -e '^cmdstat_config' |
    sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p' |
    awk '{ c[$1] += $2 } END { for (k in c) printf "%s=%d ", k, c[k] }'
}
# CPU ticks (utime + stime) summed over the given PIDs.
cpu_ticks() {
  local pid t=0 f
  for pid in "$@"; do
    f=$(cut -d' ' -f14,15 "/proc/$pid/stat" 2>/dev/null || echo "0 0")
    t=$((t + ${f% *} + ${f#* }))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
# Prints <what>_redis_cmds_per_sec(_per_node) and <what>_cpu_{nodes,redis} from the
# counters c0/c1, n0/n1, r0/r1 over $secs.
rates() {
  awk -v w="$1" -v c="$((c1 - c0))" -v n="$((n1 - n0))" -v r="$((r1 - r0))" -v s="$secs" \
    -v hz="$hz" -v nodes="$nodes" 'BEGIN {
      printf "%s_redis_cmds_per_sec: %.1f cmds/s\n", w, c / s
      printf "%s_redis_cmds_per_sec_per_node: %.2f cmds/s\n", w, c / s / nodes
      printf "%s_cpu_nodes: %.3f cores\n", w, n / hz / s
      printf "%s_cpu_redis: %.3f cores\n", w, r / hz / s }'
}
reset_stats() { for p in "${redis_ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done; }

api_key="sim-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
node_pids=()
reset_stats
launched=$(now_ms)
for i in $(seq 1 "$nodes"); do
  # The kill and cost workloads give one session a socket on every node: the
  # per-session and per-user socket caps (32 / 128) must allow one per node.
  env "${redis_env[@]}" SESSIONHUB_NODE_ID="sim-node-$i" SESSIONHUB_WORKERS=1 \
    SESSIONHUB_MAX_SOCKETS_PER_SESSION=$((nodes + 32)) SESSIONHUB_MAX_SOCKETS_PER_USER=$((nodes + 128)) \
    SESSIONHUB_API_KEY=$api_key SESSIONHUB_LISTEN=127.0.0.1:0 RUST_LOG=${RUST_LOG:-warn} \
    "$bin/sessionhub" >"$work/node$i.out" 2>"$work/node$i.log" &
  pids+=("$!")
  node_pids+=("$!")
done
addrs=()
ready_ms=()
end=$((SECONDS + 300))
for i in $(seq 1 "$nodes"); do
  until addr=$(sed -n 's|.*listening on \(http://[^ ]*\).*|\1|p' "$work/node$i.out" 2>/dev/null) &&
    [ -n "$addr" ]; do
    ((SECONDS < end)) || { echo "simulate.sh: node $i did not start:" >&2; cat "$work/node$i.log" >&2; exit 1; }
    sleep 0.05
  done
  addrs+=("$addr")
done
pending=$(seq 0 $((nodes - 1)))
while [ -n "$pending" ]; do
  ((SECONDS < end)) || { echo "simulate.sh: nodes not ready: $pending" >&2; exit 1; }
  left=""
  for j in $pending; do
    if curl -sf -o /dev/null --max-time 2 "${addrs[$j]}/readyz"; then
      ready_ms[j]=$(($(now_ms) - launched))
    else
      left="$left $j"
    fi
  done
  pending=$left
  [ -n "$pending" ] && sleep 0.1
done
sorted=$(printf '%s\n' "${ready_ms[@]}" | sort -n)
echo "nodes: $nodes"
echo "startup_ready_p50: $(sed -n "$(((nodes + 1) / 2))p" <<<"$sorted") ms"
echo "startup_ready_max: $(tail -1 <<<"$sorted") ms"

# Idle: once no bucket is due before the window ends and no sweep visit is still
# running (sh_sweep_next, twice per visit, is the only idle caller of EXISTS: its
# count must hold still for 2 s; two nodes may visit one bucket at once).
exists_calls() {
  for p in "${redis_ports[@]}"; do redis-cli -p "$p" info commandstats | tr -d '\r'; done |
    sed -n 's/^cmdstat_exists:calls=\([0-9]*\),.*/\1/p' | awk '{ t += $1 } END { print t + 0 }'
}
end=$((SECONDS + 180))
last_exists=-1
still_since=$(now_ms)
while :; do
  horizon=$(($(now_ms) + idle_secs * 1000 + 3000))
  due=$("${index_cli[@]}" zcount sh:sweep -inf "$horizon")
  ex=$(exists_calls)
  if [ "$due" != 0 ] || [ "$ex" != "$last_exists" ]; then
    last_exists=$ex
    still_since=$(now_ms)
  elif (($(now_ms) - still_since >= 2000)); then
    break
  fi
  ((SECONDS < end)) || { echo "simulate.sh: sweep index never settled ($due due)" >&2; break; }
  sleep 0.2
done
echo "startup_sweeps_done: $(($(now_ms) - launched - 2000)) ms"
started_cmds=$(commands_total)
echo "startup_redis_cmds_per_node: $((started_cmds / nodes)) cmds"
reset_stats
c0=$(commands_total); n0=$(cpu_ticks "${node_pids[@]}"); r0=$(cpu_ticks "${redis_pids[@]}"); t0=$(now_ms)
sleep "$idle_secs"   # the measuring window: the nodes just idle
c1=$(commands_total); n1=$(cpu_ticks "${node_pids[@]}"); r1=$(cpu_ticks "${redis_pids[@]}"); t1=$(now_ms)
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1000 }')
rates idle
echo "simulate.sh: idle commands by name: $(commands_by_name)" >&2

# Load: a login/kill/publish mix through every node.
node_args=()
pid_args=()
for a in "${addrs[@]}"; do node_args+=(--node "$a"); done
for p in "${node_pids[@]}"; do pid_args+=(--node-pid "$p"); done
redis_pid_args=()
for p in "${redis_pids[@]}"; do redis_pid_args+=(--redis-pid "$p"); done
cost=()
((cluster)) || cost=(--redis-url "redis://127.0.0.1:${redis_ports[0]}" --cost-ops 20)
export SESSIONHUB_API_KEY=$api_key
reset_stats
c0=$(commands_total); n0=$(cpu_ticks "${node_pids[@]}"); r0=$(cpu_ticks "${redis_pids[@]}"); t0=$(now_ms)
"$bin/sessionhub-bench" "${node_args[@]}" all "${pid_args[@]}" "${redis_pid_args[@]}" "${cost[@]}" \
  --sockets $((nodes * per_node)) --sessions-per-user 1 --sockets-per-session 1 \
  --kills 30 --users 10 --messages 1000 --concurrency 16 --settle-ms 0 \
  >"$work/bench.out" 2>"$work/bench.err" || { cat "$work/bench.err" >&2; exit 1; }
c1=$(commands_total); n1=$(cpu_ticks "${node_pids[@]}"); r1=$(cpu_ticks "${redis_pids[@]}"); t1=$(now_ms)
grep -E '^(redis_c|kill_latency_p50|kill_latency_p99|connect_rate|deliver_rate|deliver_latency_p99|deliver_lost|deliver_duplicated|deliver_misrouted)' "$work/bench.out"
grep -E 'redis cost per|background' "$work/bench.err" >&2 || true
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1000 }')
echo "load_secs: $secs s"
rates load
echo "simulate.sh: load commands by name: $(commands_by_name)" >&2

# Reaping: one node with sockets is SIGKILLed.
"$bin/sessionhub-bench" --node "${addrs[0]}" hold --sockets 5 --hold-secs 120 \
  >"$work/hold.out" 2>"$work/hold.err" &
hold_pid=$!
pids+=("$hold_pid")
end=$((SECONDS + 60))
until grep -q '^held:' "$work/hold.out" 2>/dev/null; do
  ((SECONDS < end)) && kill -0 "$hold_pid" 2>/dev/null || { cat "$work/hold.err" >&2; exit 1; }
  sleep 0.1
done
victim=${node_pids[0]}
kill -KILL "$victim"
killed=$(now_ms)
zscore_of() { "${index_cli[@]}" zscore sh:nodes sim-node-1; }
end=$((SECONDS + 60))
while [ -n "$(zscore_of)" ]; do
  ((SECONDS < end)) || { echo "simulate.sh: node 1 was not reaped within 60 s" >&2; break; }
  sleep 0.05
done
echo "reap_after_sigkill: $(($(now_ms) - killed)) ms"

#!/usr/bin/env bash
# A sessionhub cluster on one machine, without Docker: redis-server (AOF on), three
# nodes and nginx as the load balancer, all on loopback, for development and tests.
#
#   scripts/cluster.sh start [RUN_DIR]   start everything; prints the nginx URL and
#                                        what it serves (the demo app only with
#                                        SESSIONHUB_DEMO=true: it is off on Redis)
#   scripts/cluster.sh stop RUN_DIR      stop exactly what `start` started there
#
# RUN_DIR (default: a new temp dir) holds the logs, the AOF, the generated nginx
# config, the PIDs and `env`: NGINX_URL, REDIS_PORT, NODE_URLS, SESSIONHUB_API_KEY.
# Settings: SESSIONHUB_BIN (default the newer of target/release and target/debug),
# NODES (3), NGINX_PORT (default: a free port), SESSIONHUB_API_KEY (a dev key), and
# any other SESSIONHUB_* variable, passed to the nodes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "cluster.sh: $*" >&2; exit 1; }

# A free loopback port: nothing answers on it. Picked below the kernel's ephemeral
# range (32768 and up by default), so no outgoing connection holds it meanwhile.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  die "no free port found"
}

# Whether nginx (and not something else) answers on port $1.
nginx_answers() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    head=$(timeout 2 head -c 400 <&3)
    [[ $head == *"Server: nginx"* ]]
  ) 2>/dev/null
}

# The HTTP status code of GET $2 on port $1 (nginx's answer, through to the nodes).
http_status() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$2" "$1" >&3
    read -r -t 5 _ code _ <&3 && echo "$code"
  ) 2>/dev/null
}

# Polls a command until it succeeds, for at most $1 seconds.
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
}

# The program a running process executes ("" if it is gone): recorded with its PID,
# so that `stop` never signals a process that merely got the same PID later. A
# program replaced on disk since (a rebuild) reads "<path> (deleted)".
program_of() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 0
  echo "${exe% (deleted)}"
}

# Records process $2 as $1 in the run's PID file, with its program: $4, the
# program it was started with (resolved as /proc shows it), else what it runs now.
record() {
  local program=${4:+$(readlink -f "$4")}
  echo "$1 $2 ${program:-$(program_of "$2")}" >>"$3/pids"
}

# Whether process $2, recorded as $1 with program $3, is still that process. A PID
# file of an older cluster.sh has no program: the process's name must match.
still_ours() {
  local what=$1 pid=$2 program=${3:-}
  # Explicit statuses: a bare `return` in a function run by the EXIT trap returns
  # the status from before the trap.
  if [ -n "$program" ]; then
    if [ "$(program_of "$pid")" = "$program" ]; then return 0; else return 1; fi
  fi
  local comm want
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  case $what in
    node-*) want=sessionhub ;;
    redis) want=redis-server ;;
    nginx) want=nginx ;;
    *) return 1 ;;
  esac
  if [ "$comm" = "$want" ]; then return 0; else return 1; fi
}

# Whether the node with this stdout file and PID listens, or is gone.
listening_or_gone() {
  grep -q "listening on" "$1" || ! kill -0 "$2" 2>/dev/null
}

start() {
  local run=${1:-$(mktemp -d -t sessionhub-cluster.XXXXXX)}
  mkdir -p "$run/tmp"
  run=$(cd "$run" && pwd)
  [ -e "$run/pids" ] && die "$run already has a running cluster (stop it first)"
  local bin=${SESSIONHUB_BIN:-}
  if [ -z "$bin" ]; then
    # The newer build: a fresh `cargo build` must not lose to an old release build.
    for b in "$root/target/release/sessionhub" "$root/target/debug/sessionhub"; do
      [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; } && bin=$b
    done
  fi
  [ -x "${bin:-}" ] || die "no sessionhub binary: run 'cargo build --release --bin sessionhub' first"
  command -v redis-server >/dev/null || die "redis-server is missing: apt-get install -y redis-server"
  local nginx
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  [ -x "$nginx" ] || die "nginx is missing: apt-get install -y nginx"
  local key=${SESSIONHUB_API_KEY:-dev-only-key-change-me}
  : >"$run/pids"
  # A start that fails half-way stops what it had started.
  trap 'stop "$run" >/dev/null 2>&1 || true' EXIT

  local redis_port="" redis_pid
  for _ in 1 2 3; do
    local try
    try=$(free_port)
    redis-server --port "$try" --bind 127.0.0.1 --dir "$run" --appendonly yes \
      --save "" --logfile redis.log --daemonize no </dev/null >/dev/null 2>&1 &
    redis_pid=$!
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)) && kill -0 "$redis_pid" 2>/dev/null; do
      if redis-cli -p "$try" ping >/dev/null 2>&1; then
        redis_port=$try
        break
      fi
      sleep 0.1
    done
    [ -n "$redis_port" ] && break
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  done
  [ -n "$redis_port" ] || die "redis-server did not start: $(tail -3 "$run/redis.log" 2>/dev/null)"
  record redis "$redis_pid" "$run"

  local urls=() upstreams=""
  # nginx reaches the nodes from 127.0.0.1: they believe its X-Forwarded-For (the
  # client's address) and X-Forwarded-Proto, and nobody else's.
  for i in $(seq 1 "${NODES:-3}"); do
    # SESSIONHUB_BIN is this script's setting, not the node's (which refuses
    # SESSIONHUB_* variables it does not know).
    env -u SESSIONHUB_BIN SESSIONHUB_LISTEN=127.0.0.1:0 SESSIONHUB_NODE_ID="node-$i" \
      SESSIONHUB_REDIS_URL="redis://127.0.0.1:$redis_port" SESSIONHUB_API_KEY="$key" \
      SESSIONHUB_TRUSTED_PROXIES="${SESSIONHUB_TRUSTED_PROXIES:-127.0.0.1}" \
      "$bin" </dev/null >"$run/node-$i.out" 2>"$run/node-$i.log" &
    local pid=$!
    # Recorded at once: a start that times out below stops it too.
    record "node-$i" "$pid" "$run" "$bin"
    # A node that stops at once (a bad setting) says why on its last line.
    wait_for 40 "node-$i to listen" listening_or_gone "$run/node-$i.out" "$pid"
    kill -0 "$pid" 2>/dev/null || die "node-$i exited: $(tail -1 "$run/node-$i.log")"
    local addr
    addr=$(grep -o 'http://[0-9.:]*' "$run/node-$i.out" | head -1)
    urls+=("$addr")
    upstreams+="server ${addr#http://} max_fails=2 fail_timeout=5s;"$'\n'
  done

  printf '%s' "$upstreams" >"$run/sessionhub-upstreams.conf"
  # The shipped config as it is, with the header file it includes.
  cp "$root/deploy/nginx/sessionhub.conf" "$root/deploy/nginx/sessionhub-proxy-headers.conf" "$run/"
  local user=""
  [ "$(id -u)" = 0 ] && user="user root;"
  cat >"$run/nginx.conf" <<CONF
$user
worker_processes 1;
daemon off;
pid $run/nginx.pid;
error_log $run/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log $run/nginx-access.log;
    client_body_temp_path $run/tmp/body;
    proxy_temp_path $run/tmp/proxy;
    fastcgi_temp_path $run/tmp/fastcgi;
    uwsgi_temp_path $run/tmp/uwsgi;
    scgi_temp_path $run/tmp/scgi;
    include sessionhub.conf;
}
CONF
  # A port taken between the check and nginx's bind makes nginx exit: try another.
  # A port asked for must be free: nginx keeps retrying its bind for seconds, and
  # whatever answers there meanwhile is not this cluster.
  if [ -n "${NGINX_PORT:-}" ] && (exec 3<>"/dev/tcp/127.0.0.1/$NGINX_PORT") 2>/dev/null; then
    die "NGINX_PORT $NGINX_PORT is in use by another program: pick a free port, or leave NGINX_PORT unset"
  fi
  local port="" nginx_pid
  for _ in 1 2 3; do
    local try=${NGINX_PORT:-$(free_port)}
    echo "listen 127.0.0.1:$try;" >"$run/sessionhub-listen.conf"
    "$nginx" -p "$run" -c "$run/nginx.conf" -t -q 2>"$run/nginx-test.log" ||
      die "nginx rejected the config: $(cat "$run/nginx-test.log")"
    : >"$run/nginx-error.log"
    "$nginx" -p "$run" -c "$run/nginx.conf" </dev/null >"$run/nginx.out" 2>&1 &
    nginx_pid=$!
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)) && kill -0 "$nginx_pid" 2>/dev/null; do
      # Ours answers only once it has bound the port (it logs a failed bind).
      if ! grep -q "bind() to" "$run/nginx.out" "$run/nginx-error.log" 2>/dev/null &&
        nginx_answers "$try"; then
        port=$try
        break
      fi
      sleep 0.1
    done
    [ -n "$port" ] && break
    kill "$nginx_pid" 2>/dev/null || true
    wait "$nginx_pid" 2>/dev/null || true
  done
  [ -n "$port" ] || die "nginx did not start: $(tail -3 "$run/nginx-error.log" 2>/dev/null)"
  record nginx "$nginx_pid" "$run"

  cat >"$run/env" <<ENV
NGINX_URL=http://127.0.0.1:$port
REDIS_PORT=$redis_port
NODE_URLS="${urls[*]}"
SESSIONHUB_API_KEY=$key
ENV
  trap - EXIT
  # Say what the URL serves: the demo app is off by default on Redis.
  local serves="the demo app at /, the API under /api/v1/"
  [ "$(http_status "$port" /)" = 200 ] ||
    serves="the API under /api/v1/ only: / answers 404 (SESSIONHUB_DEMO=true serves the demo app)"
  echo "sessionhub cluster up: http://127.0.0.1:$port: $serves (run dir $run)"
}

stop() {
  local run=${1:?usage: scripts/cluster.sh stop RUN_DIR}
  [ -f "$run/pids" ] || die "no cluster recorded in $run"
  local pids=()
  # nginx first (no new traffic), then the nodes (they close sockets with 1001 and
  # remove their records), then Redis (it writes its AOF).
  for name in nginx node redis; do
    while read -r what pid program; do
      [[ $what == $name* ]] || continue
      # Only the process started there: one that exited may have left its PID to
      # another program since.
      if ! still_ours "$what" "$pid" "${program:-}"; then
        echo "$what (PID $pid) is not running any more" >&2
        continue
      fi
      kill -TERM "$pid" 2>/dev/null && pids+=("$what $pid ${program:-}")
    done <"$run/pids"
    for entry in "${pids[@]}"; do
      read -r what pid program <<<"$entry"
      for _ in $(seq 1 150); do
        still_ours "$what" "$pid" "${program:-}" || break
        sleep 0.1
      done
      if still_ours "$what" "$pid" "${program:-}"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    pids=()
  done
  rm -f "$run/pids"
  echo "sessionhub cluster in $run stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: scripts/cluster.sh start [RUN_DIR] | stop RUN_DIR" >&2; exit 2 ;;
esac

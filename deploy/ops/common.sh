# Shared by the ops scripts; not run on its own.
#   REDIS_CLI_ARGS   extra redis-cli arguments, e.g. "-h redis.internal -p 6379"
#                    (on Redis Cluster add -c: redis-cli then follows each key's slot)
#   SESSIONHUB_KEY_PREFIX   key prefix (default sh:)
set -euo pipefail
# Set but empty is the empty prefix, as the nodes read it.
P=${SESSIONHUB_KEY_PREFIX-sh:}
read -r -a _rcli_args <<<"${REDIS_CLI_ARGS:-}"
rcli() { redis-cli "${_rcli_args[@]}" "$@"; }
# A user's bucket, the hash tag of their keys: the first 2 hex digits of SHA-256 of
# the user id (also the first 2 characters of their session and connection ids).
user_bucket() { printf %s "$1" | sha256sum | cut -c1-2; }
# Every bucket, 00 to ff.
buckets() { local i; for i in {0..255}; do printf '%02x\n' "$i"; done; }
need_arg() { [ -n "${1:-}" ] || { echo "usage: $(basename "$0") $2" >&2; exit 2; }; }
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
# Joins redis-cli's alternating key/value lines into "key value" lines.
pairs() { awk 'NR % 2 { k = $0; next } { print k, $0 }'; }

# redis-cli's output without the "-> Redirected" notes of -c; an error reply stops
# the script (redis-cli itself exits 0 on one). With -v pong=1, the first line must
# be PONG (see rcli_batch).
_rcli_filter() {
  awk -v pong="${1:-0}" '
    /^-> Redirected to slot / { next }
    pong && !seen { seen = 1; if ($0 == "PONG") next; bad = 1; print "redis-cli: no PONG from Redis: " $0 > "/dev/stderr"; exit 1 }
    /^(ERR|WRONGTYPE|NOSCRIPT|BADKEY|CLUSTERDOWN|MOVED|ASK|TRYAGAIN|LOADING|BUSY|NOPERM|NOAUTH|READONLY|MASTERDOWN|MISCONF|OOM|NOREPLICAS|CROSSSLOT|UNKILLABLE) / {
      bad = 1; print "redis-cli: " $0 > "/dev/stderr"; exit 1 }
    { print }
    END { if (!bad && pong && !seen) { print "redis-cli: no answer from Redis (see above)" > "/dev/stderr"; exit 1 } }'
}
# One command, checked.
rcli_one() { rcli "$@" | _rcli_filter; }
# Runs the commands on stdin (one a line, in redis-cli's quoting) in one redis-cli
# process, so that a script costs one process and one connection, not one per
# bucket; with -c, redis-cli follows each command to the master of its slot.
# redis-cli reading stdin exits 0 even when it cannot connect, hence the PING first.
rcli_batch() { { echo PING; cat; } | rcli | _rcli_filter 1; }

# Times are printed in UTC, as the API prints them: 2026-12-01T21:40:03.123Z.
export TZ=UTC
# Unix milliseconds -> RFC 3339 UTC (bash's printf: no process per time).
utc() { printf '%(%Y-%m-%dT%H:%M:%S)T.%03dZ' $(($1 / 1000)) $(($1 % 1000)); }
# Now, in Unix milliseconds.
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }

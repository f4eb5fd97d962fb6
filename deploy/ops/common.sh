# Shared by the ops scripts; not run on its own.
#   REDIS_CLI_ARGS   extra redis-cli arguments, e.g. "-h redis.internal -p 6379"
#   SESSIONHUB_KEY_PREFIX   key prefix (default sh:)
set -euo pipefail
P=${SESSIONHUB_KEY_PREFIX:-sh:}
read -r -a _rcli_args <<<"${REDIS_CLI_ARGS:-}"
rcli() { redis-cli "${_rcli_args[@]}" "$@"; }
# A user's bucket, the hash tag of their keys: the first 2 hex digits of SHA-256 of
# the user id (also the first 2 characters of their session and connection ids).
user_bucket() { printf %s "$1" | sha256sum | cut -c1-2; }
# Every bucket, 00 to ff.
buckets() { for i in $(seq 0 255); do printf '%02x\n' "$i"; done; }
need_arg() { [ -n "${1:-}" ] || { echo "usage: $(basename "$0") $2" >&2; exit 2; }; }
# Joins redis-cli's alternating key/value lines into "key value" lines.
pairs() { awk 'NR % 2 { k = $0; next } { print k, $0 }'; }

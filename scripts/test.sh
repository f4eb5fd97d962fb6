#!/usr/bin/env bash
# The test command: installs what the tests need, builds the binaries, runs every
# test (unit and property tests, the engine conformance suite, end-to-end tests with
# real redis-server, node, nginx and Chromium processes).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v openssl >/dev/null || need+=(openssl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null || need+=(nodejs npm)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if ((${#need[@]})); then
  echo "test.sh: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    echo "test.sh: need root for: apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The browser tests drive Debian's Chromium with playwright-core (no browser download).
if [ -f tests/browser/package.json ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# The end-to-end tests start the built binaries (target/debug/sessionhub, ...).
cargo build --workspace --bins --locked
cargo test --workspace --locked

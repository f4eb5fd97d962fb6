#!/usr/bin/env bash
# The test command: installs what the tests need, builds the node binary, runs every
# test (unit tests, the engine conformance suite, end-to-end tests with real
# redis-server and node processes).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
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
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}"
fi

# The end-to-end tests start the built binary (target/debug/sessionhub).
cargo build --workspace --bins --locked
cargo test --workspace --locked

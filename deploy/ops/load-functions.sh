#!/usr/bin/env bash
# Loads lua/sessionhub.lua (the functions every script below calls) into Redis.
# Nodes do this at start-up; run it only on a Redis no node has used yet.
source "$(dirname "$0")/common.sh"
loaded=$(rcli -x FUNCTION LOAD REPLACE <"$(dirname "$0")/../../lua/sessionhub.lua" | _rcli_filter)
[ "$loaded" = sessionhub ] || die "unexpected answer from Redis: $loaded"
echo "$loaded"

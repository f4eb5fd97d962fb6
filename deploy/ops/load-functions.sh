#!/usr/bin/env bash
# Loads lua/sessionhub.lua (the functions every script below calls) into Redis.
# Nodes do this at start-up; run it only on a Redis no node has used yet.
source "$(dirname "$0")/common.sh"
rcli -x FUNCTION LOAD REPLACE <"$(dirname "$0")/../../lua/sessionhub.lua"

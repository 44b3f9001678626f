#!/usr/bin/env bash
# stack-down.sh (make down) - stop everything stack-up.sh started; data is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
PIDS=target/stack/pids
for name in agent-1 agent-2 gateway-a gateway-b samba redis; do
  f=$PIDS/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $name ($pid)"
  fi
  rm -f "$f"
done

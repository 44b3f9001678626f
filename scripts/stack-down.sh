#!/usr/bin/env bash
# stack-down.sh (make down) - stop everything stack-up.sh started; data, keys and tokens are kept.
# Agents first, then the gateways (they drain agent sessions on SIGTERM), then Samba and Redis.
# Each group gets SIGTERM, up to STOP_WAIT_SECS (default 25) to exit, then SIGKILL.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
S=target/stack PIDS=target/stack/pids
WAIT=${STOP_WAIT_SECS:-25}

# A zombie (exited, not yet reaped: init takes a second or so here) counts as stopped.
running() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=${st##*) }; [ "${st:0:1}" != Z ] && [ "${st:0:1}" != X ]; }
comm_of() { case $1 in redis) echo redis-server ;; samba) echo samba ;; gateway-*) echo cloud-gateway ;; agent-*) echo onprem-agent ;; esac; }
# pid of NAME if its pid file names a live process of the right executable (not a reused pid)
pid_of() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(comm_of "$1")" ] && running "$pid" && echo "$pid"
}
stop_group() { # names...
  local n pid left i
  declare -A pids=()
  for n in "$@"; do
    if pid=$(pid_of "$n"); then pids[$n]=$pid; kill -TERM "$pid" 2>/dev/null; fi
  done
  for ((i = 0; i < WAIT * 10; i++)); do
    left=0
    for n in "${!pids[@]}"; do running "${pids[$n]}" && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for n in "$@"; do
    if [ -n "${pids[$n]:-}" ]; then
      if running "${pids[$n]}"; then
        kill -KILL "${pids[$n]}" 2>/dev/null; echo "killed $n (pid ${pids[$n]}, still running after ${WAIT}s)"
      else
        echo "stopped $n (pid ${pids[$n]})"
      fi
    fi
    rm -f "$PIDS/$n.pid"
  done
}

[ -d "$PIDS" ] || { echo "no stack in $S"; exit 0; }
stop_group agent-1 agent-2
stop_group gateway-a gateway-b
stop_group samba redis
# a DC whose pid file was lost: ad-dc.sh knows it by its own run/samba.pid
if [ -f "$S/samba/run/samba.pid" ] && [ -x scripts/ad-dc.sh ]; then
  scripts/ad-dc.sh --stop "$S/samba" | grep -v '^not running' || true
fi
exit 0

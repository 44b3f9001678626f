#!/usr/bin/env bash
# Finds Redis servers and Samba DCs that tests left running: processes whose working directory
# or open files lie under this checkout's target/testkit (testkit runs every Redis in
# target/testkit/redis/* and every DC from target/testkit/{dcs,templates}/*). Test processes'
# pipes are not held by these servers, so nextest's leak detection cannot see them. Run after
# the tests have ended: then nothing at all should hold those directories.
#   check-leftovers.sh          report and kill them; exit 1 if there were any
#   check-leftovers.sh --clean  kill them quietly (leftovers of an interrupted earlier run)
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(realpath -m "${CARGO_TARGET_DIR:-target}")/testkit"
mode=${1:-check}
found=0
for proc in /proc/[0-9]*; do
  pid=${proc#/proc/}
  [ "$pid" = "$$" ] && continue
  cwd=$(readlink "$proc/cwd" 2>/dev/null) || continue
  hit=""
  case "$cwd" in "$root"/*) hit="cwd $cwd" ;; esac
  if [ -z "$hit" ]; then
    hit=$(ls -l "$proc/fd" 2>/dev/null | grep -oF -- "-> $root/" | head -1)
  fi
  [ -n "$hit" ] || continue
  comm=$(cat "$proc/comm" 2>/dev/null || echo '?')
  found=$((found + 1))
  if [ "$mode" != "--clean" ]; then
    echo "leftover: pid $pid ($comm) ${hit}: $(tr '\0' ' ' < "$proc/cmdline" 2>/dev/null)"
  fi
  kill -KILL "$pid" 2>/dev/null || true
done
if [ "$mode" = "--clean" ]; then
  [ "$found" -gt 0 ] && echo "check-leftovers: stopped $found server(s) left by an earlier run"
  exit 0
fi
if [ "$found" -gt 0 ]; then
  echo "check-leftovers: FAILED: tests left $found server(s) running (killed now)"
  exit 1
fi
echo "check-leftovers: no Redis or Samba left running by the tests"

#!/usr/bin/env bash
# bench.sh - `make bench`: the benchmark scenarios of issue 11 in one run, release build.
# Builds cloud-gateway, onprem-agent and the bench binaries in release mode, runs
# bench-scenarios (real Redis, gateway and agent processes, a Samba DC for scenario 2), and
# prints where the report is: target/bench/report.md plus one SVG plot per scenario.
# Knobs (environment, see bench/src/bin/bench-scenarios.rs): BENCH_SCENARIOS=1,2,3,4
# BENCH_SECS BENCH_WARMUP_SECS BENCH_CONCURRENCY=1,8,32,128 BENCH_RATES=500,2000
# BENCH_AGENT_IN_FLIGHT BENCH_AD_N BENCH_AD_USERS BENCH_FANIN_N BENCH_IDLE_SECS BENCH_FOOTPRINT_N.
# Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
scripts/install-deps.sh
# 10,000 streams need a file descriptor each in the load process and in the gateway (plus, today,
# a Redis connection each in the gateway and in Redis).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
t0=$SECONDS
# A profile of the relay-overhead step when perf can sample here (cpu-clock works in VMs that have
# no hardware counters).
if [ -z "${BENCH_PERF_DIR:-}" ] && command -v perf >/dev/null \
   && perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
  export BENCH_PERF_DIR=${BENCH_OUT:-${CARGO_TARGET_DIR:-target}/bench}
fi
$CARGO build --release -p cloud-gateway -p onprem-agent -p bench --bins
target_dir=${CARGO_TARGET_DIR:-target}
BENCH_OUT=${BENCH_OUT:-$target_dir/bench} "$target_dir/release/bench-scenarios"
echo "make bench: done in $((SECONDS - t0)) s; report: ${BENCH_OUT:-$target_dir/bench}/report.md (plots beside it)"

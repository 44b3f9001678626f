#!/usr/bin/env bash
# `make soak`: the long form of the fault-injection suite (e2e/tests/faults.rs), FAULT_ROUNDS
# rounds (default 9) of six faults each under a steady stream of resets. Prints the one-line
# verdict and the recovery figures; exits non-zero when any count is not zero.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null || exit 1
cargo build --workspace --bins || exit 1
log=target/soak.log
mkdir -p target
FAULT_ROUNDS=${FAULT_ROUNDS:-9} cargo nextest run --profile soak -p e2e --test faults --no-capture >"$log" 2>&1
rc=$?
grep -E '^(ops |recovery |answers |round )' "$log" | sed 's/\x1b\[[0-9;]*m//g'
[ $rc -eq 0 ] || { grep -A30 'panicked' "$log" | head -40; echo "soak: FAILED (full log: $log)"; }
exit $rc

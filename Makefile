# The two commands: `make up` (local stack with a demo reset) and `make test` (everything).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: up down test soak bench build fmt lint deps k8s-check package image

up:
	@scripts/stack-up.sh

down:
	@scripts/stack-down.sh

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

# Offline checks of k8s/: render every overlay, validate it strictly against the Kubernetes
# schemas, promtool check + test the alerting rules (scripts/k8s-check.sh).
k8s-check:
	@scripts/k8s-check.sh

# The agent's Debian package (release build): target/package/onprem-agent_<version>_<arch>.deb.
package:
	$(CARGO) build --release -p onprem-agent
	@scripts/package-agent.sh --profile release

# The container image as an OCI layout, without pulling a base image: target/image/oci.
image:
	$(CARGO) build --release --bins
	@scripts/build-image.sh --profile release

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# install what is missing, fmt --check, clippy -D warnings, the k8s/ checks (scripts/k8s-check.sh:
# overlays rendered and validated, alerting rules unit-tested), build the binaries (the end-to-end
# tests run target/debug/{cloud-gateway,onprem-agent,relayctl}), then every test with nextest
# (profile in .config/nextest.toml; a run that selects no test fails), or cargo test when
# cargo-nextest is not installed; then no Redis or Samba may be left running
# (scripts/check-leftovers.sh).
test:
	@set -uo pipefail; start=$$SECONDS; t=$$SECONDS; times=""; \
	phase() { times="$$times $$1 $$((SECONDS - t))s"; t=$$SECONDS; }; \
	run() { echo "+ $$*"; "$$@"; }; \
	finish() { echo "make test: $$1 in $$((SECONDS - start)) s ($${times# })"; exit $$2; }; \
	run scripts/install-deps.sh || finish "FAILED (install-deps)" 1; phase deps; \
	run $(CARGO) fmt --all --check || finish "FAILED (cargo fmt --check)" 1; phase fmt; \
	run $(CARGO) clippy --workspace --all-targets -- -D warnings || finish "FAILED (clippy)" 1; phase clippy; \
	run scripts/k8s-check.sh || finish "FAILED (k8s-check)" 1; phase k8s; \
	run $(CARGO) build --workspace --bins || finish "FAILED (build)" 1; phase build; \
	scripts/check-leftovers.sh --clean; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  run $(CARGO) nextest run --workspace; rc=$$?; \
	else \
	  echo "cargo-nextest not found: falling back to cargo test"; \
	  run $(CARGO) test --workspace; rc=$$?; \
	fi; phase tests; \
	run scripts/check-leftovers.sh || { [ $$rc -ne 0 ] || rc=1; }; \
	if [ $$rc -eq 0 ]; then finish "passed" 0; else finish "FAILED (tests)" $$rc; fi

# The long form of the fault-injection suite (e2e/tests/faults.rs): 9 rounds of 6 faults
# (Redis kill -9; kill -9 of one gateway replica and SIGTERM of the other, and kill -9 of one
# agent, alternating so that every replica and agent is killed; DC frozen; agent path
# blackholed) under a steady stream of resets; restarted replicas and agents run with their wall
# clocks skewed in rotation (replicas +4/-4/0 s, agents -3/+3/0 s, by libfaketime), each skewed
# run counted as a clock-skew fault. Prints the one-line verdict and the recovery figures.
soak:
	@scripts/soak.sh

# The benchmark scenarios of issue 11 (scripts/bench.sh): release build; relay overhead with the
# no-op writer, relay vs direct LDAPS on Samba AD, 10,000 idle agent streams, Redis footprint.
# Writes target/bench/report.md and one SVG plot per scenario; about 5 minutes. Not in `make test`.
bench:
	@scripts/bench.sh

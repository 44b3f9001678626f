# The two commands: `make up` (local stack with a demo reset) and `make test` (everything).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: up down test build fmt lint deps

up:
	@scripts/stack-up.sh

down:
	@scripts/stack-down.sh

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps
	@start=$$(date +%s); \
	$(CARGO) fmt --all --check && \
	$(CARGO) clippy --workspace --all-targets -- -D warnings && \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) build --workspace --bins --quiet && $(CARGO) nextest run --workspace --no-tests=pass; \
	else \
	  $(CARGO) build --workspace --bins --quiet && $(CARGO) test --workspace; \
	fi; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

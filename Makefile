# The two commands of the README: `make run` (embedded gateway) and `make test` (the whole suite).
SHELL := /bin/bash
BUILD_CONFIG ?= release
GATEWAY_PORT ?= 8080
GATEWAY_HOST ?= 127.0.0.1
GATEWAY_DATA_DIR ?= ./data
export GATEWAY_PORT GATEWAY_HOST GATEWAY_DATA_DIR

.PHONY: run build test unit fuzz check-run bench bench-presence check-lb cluster loadtest conformance clean

## Build and start the embedded gateway (SQLite + in-process fan-out) on $(GATEWAY_HOST):$(GATEWAY_PORT).
run:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev
	swift build -c $(BUILD_CONFIG) --product gateway
	@BIN=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway scripts/run.sh

build:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev postgresql redis-server chromium openssl
	swift build --build-tests

## The whole suite: unit, integration and end-to-end tests, then the `make run` check.
test: build
	@# A hang must fail the run, not use up CI's time: the suite takes about 3 minutes here.
	@status=0; timeout --signal=KILL 1200 stdbuf -oL -eL swift test --skip-build --no-parallel || status=$$?; \
	  [ $$status -eq 137 ] && echo "make test: the suite did not finish within 20 minutes (killed)"; \
	  scripts/stop-test-services.sh; [ $$status -eq 0 ]
	$(MAKE) check-run

unit: build
	swift test --skip-build --filter 'SequencerTests|CursorAndChannelTests|WireTests'

## The property/fuzz tests with many more cases than `make test` runs (FUZZ_ITERATIONS, default 200,000).
fuzz: build
	FUZZ_ITERATIONS=$${FUZZ_ITERATIONS:-200000} swift test --skip-build --filter 'PropertyTests|UTF8ValidatorTests'

## Starts `make run` like a user would, publishes and streams one message, stops it.
check-run:
	scripts/check-run.sh

## Benchmarks (release build): group commit appends/s at 1, 16 and 256 publishers on Postgres and SQLite, and
## members publishing to threads (the membership checked by the append) at 1 and 16;
## then fan-out CPU per delivery (WebSocket, SSE) and memory per idle WebSocket, side by side with Nchan;
## then publish→deliver and publish→ack across three instances (Postgres + Redis) at 500, 1,000 and 2,000 msgs/s.
bench:
	@scripts/ensure-packages.sh libhiredis-dev zlib1g-dev postgresql redis-server nginx-light libnginx-mod-nchan
	swift build -c release --product bench
	swift build -c release --product gateway
	swift build -c release --product loadtest
	@D=/tmp/gw-bench-$$$$; scripts/services.sh start $$D >/dev/null; set -a; . $$D/env; set +a; \
	  $$(swift build -c release --show-bin-path)/bench; status=$$?; scripts/services.sh stop $$D; [ $$status -eq 0 ] || exit $$status
	@B=$$(swift build -c release --show-bin-path); BIN=$$B/gateway LOADTEST=$$B/loadtest BENCH=$$B/bench scripts/bench-fanout.sh
	@B=$$(swift build -c release --show-bin-path); BIN=$$B/gateway LOADTEST=$$B/loadtest scripts/bench-cluster.sh

## The cost of presence: 1,000 users joining one channel over three instances, with and without watching it.
bench-presence:
	@scripts/ensure-packages.sh curl bc libhiredis-dev zlib1g-dev postgresql redis-server
	swift build -c release --product gateway
	swift build -c release --product loadtest
	@B=$$(swift build -c release --show-bin-path); BIN=$$B/gateway LOADTEST=$$B/loadtest scripts/bench-presence.sh

## docker/nginx.conf in front of three real instances (no Docker engine needed): WS and SSE fan-out through it.
check-lb:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev postgresql redis-server nginx-light
	swift build -c release --product gateway
	swift build -c release --product loadtest
	@B=$$(swift build -c release --show-bin-path); BIN=$$B/gateway LOADTEST=$$B/loadtest scripts/check-lb.sh

## Postgres, Redis and three gateway instances on 8081-8083 (foreground; Ctrl-C stops them).
cluster:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev postgresql redis-server
	swift build -c $(BUILD_CONFIG) --product gateway
	@BIN=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway scripts/cluster.sh

## loadtest against `make cluster` (3 instances, Postgres, Redis): 1,000 subscribers over WS, SSE and
## long-poll, 20 channels, 60 s; ARGS adds or overrides flags (e.g. ARGS="--churn --duration 20").
loadtest:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev postgresql redis-server
	swift build -c $(BUILD_CONFIG) --product gateway
	swift build -c $(BUILD_CONFIG) --product loadtest
	@BIN=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway; LT=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/loadtest; \
	  BIN=$$BIN scripts/cluster.sh bash -c "\"$$LT\" \$$CLUSTER_URLS --subscribers 1000 --transports ws=2,sse=1,poll=1 \
	    --publishers 8 --rate 500 --channels 20 --duration 60 --ramp 5 $(ARGS)"

## RFC 6455 conformance: Autobahn|Testsuite cases 1-10 against /v1/echo (ARGS=-z adds 12.*/13.*).
conformance:
	@scripts/ensure-packages.sh curl libhiredis-dev zlib1g-dev
	swift build -c $(BUILD_CONFIG) --product gateway
	@BIN=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway scripts/conformance.sh $(ARGS)

clean:
	rm -rf .build data

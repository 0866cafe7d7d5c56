# The two commands of the README: `make run` (embedded gateway) and `make test` (the whole suite).
SHELL := /bin/bash
BUILD_CONFIG ?= release
GATEWAY_PORT ?= 8080
GATEWAY_HOST ?= 127.0.0.1
GATEWAY_DATA_DIR ?= ./data
export GATEWAY_PORT GATEWAY_HOST GATEWAY_DATA_DIR

.PHONY: run build test unit check-run conformance clean

## Build and start the embedded gateway (SQLite + in-process fan-out) on $(GATEWAY_HOST):$(GATEWAY_PORT).
run:
	@scripts/ensure-packages.sh curl
	swift build -c $(BUILD_CONFIG) --product gateway
	@BIN=$$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway scripts/run.sh

build:
	swift build --build-tests

## The whole suite: unit, integration and end-to-end tests, then the `make run` check.
test: build
	swift test --skip-build --parallel
	$(MAKE) check-run

unit: build
	swift test --skip-build --filter 'SequencerTests|CursorAndChannelTests|WireTests'

## Starts `make run` like a user would, publishes and streams one message, stops it.
check-run:
	scripts/check-run.sh

## RFC 6455 conformance (Autobahn|Testsuite) against /v1/echo.
conformance:
	swift build -c $(BUILD_CONFIG) --product gateway
	scripts/conformance.sh $$(swift build -c $(BUILD_CONFIG) --show-bin-path)/gateway

clean:
	rm -rf .build data

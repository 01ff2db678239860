# hsm-gateway: the two commands the README promises, and the pieces they are made of.
#
#   make run    build, create the project-local SoftHSM2 dev token, run preflight against it
#   make test   every test, against a real SoftHSM2 token (what .ci/run calls)
#
# Both install what they need from Debian's packages first (sudo when not root).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SWIFT ?= swift
# Debian packages the project needs at build, test or run time.
APT_PACKAGES := softhsm2 opensc postgresql libp11-kit-dev libssl-dev libpq-dev
# The embedded default keeps everything it creates here (token, PIN files, later the SQLite file).
DATA_DIR ?= .hsm-dev
DEV_TOKEN_LABEL ?= hsmgw-dev
SOFTHSM2_MODULE ?= /usr/lib/softhsm/libsofthsm2.so

.PHONY: help deps build run dev-token test bench format lint clean

help:
	@echo "make run    build, create the dev token in $(DATA_DIR)/ and run hsm-admin preflight on it"
	@echo "make test   install dependencies, build, run every test"
	@echo "make bench  release build; AES-GCM and key-service benchmarks on throwaway tokens and stores (docs/benchmarks.md)"

# Installs only what is missing, so a machine that has everything never needs root or the network.
deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	    echo "deps: installing$$missing"; \
	    $$sudo apt-get update -q; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi; \
	command -v $(SWIFT) >/dev/null || { echo "deps: Swift 6.1 or later must be on PATH (https://swift.org/install)"; exit 1; }

build: deps
	$(SWIFT) build

dev-token: deps
	DATA_DIR="$(DATA_DIR)" TOKEN_LABEL="$(DEV_TOKEN_LABEL)" hsm-config/dev-token.sh

# In this issue the gateway does not serve yet: run stops after preflight on the dev token.
run: build dev-token
	SOFTHSM2_CONF="$(CURDIR)/$(DATA_DIR)/softhsm2.conf" .build/debug/hsm-admin preflight \
	    --module "$(SOFTHSM2_MODULE)" --token "$(DEV_TOKEN_LABEL)" --pin-file "$(DATA_DIR)/user.pin"

test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

bench: deps
	$(SWIFT) build -c release --product hsm-bench
	.build/release/hsm-bench gcm --module "$(SOFTHSM2_MODULE)"
	.build/release/hsm-bench keys --module "$(SOFTHSM2_MODULE)" --store sqlite --tasks 16
	.build/release/hsm-bench keys --module "$(SOFTHSM2_MODULE)" --store postgres --tasks 16

format:
	$(SWIFT) format -i -r Package.swift Sources Tests

lint:
	$(SWIFT) format lint -r --strict Package.swift Sources Tests

clean:
	rm -rf .build

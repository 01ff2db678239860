# hsm-gateway: the two commands the README promises, and the pieces they are made of.
#
#   make run    build and start `hsm-gateway --dev`: SoftHSM2 dev token + SQLite under .hsm-dev/,
#               plaintext on 127.0.0.1:7700, health and metrics on 127.0.0.1:7701
#   make test   every test, against a real SoftHSM2 token and PostgreSQL; the PKCS#11 and a set of
#               end-to-end suites again against NSS's softoken; then the Python SDK's tests
#               (clients/python: unit, live against real gateways in plaintext, TLS and mTLS, and
#               envelopes across languages with the `hsmgw` CLI), then the monitoring files (alert
#               rules and dashboard) against real gateways, then the refusal of openCryptoki's token
#               (no AES-GCM) by preflight and the gateway (what .ci/run calls)
#
# Both install what they need from Debian's packages first (sudo when not root).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SWIFT ?= swift
# Debian packages the project needs at build, test or run time.
# openssl makes the test PKI; python3-venv serves the Python SDK's tests, and protobuf-compiler
# regenerates its committed messages (clients/python/generate.sh) and checks they are current;
# gcc compiles the tests' fault-injecting PKCS#11 module (Tests/FaultInjection) at run time;
# jq, curl and procps (pgrep) serve scripts/bench-deployment.sh; python3-yaml serves
# scripts/check-monitoring.sh (which fetches promtool itself, without installing Prometheus);
# opencryptoki is a second PKCS#11 implementation without AES-GCM, which the gateway must refuse
# (scripts/opencryptoki-refusal-test.sh); libnss3 has NSS's softoken, the second PKCS#11
# implementation the tests run against (docs/hsm/nss-softoken.md).
APT_PACKAGES := softhsm2 opensc postgresql libp11-kit-dev libssl-dev libpq-dev openssl protobuf-compiler p11-kit p11-kit-modules \
    python3 python3-venv python3-yaml gcc jq curl procps opencryptoki libnss3
# The embedded default keeps everything it creates here (token, PIN files, later the SQLite file).
DATA_DIR ?= .hsm-dev
DEV_TOKEN_LABEL ?= hsmgw-dev
SOFTHSM2_MODULE ?= /usr/lib/softhsm/libsofthsm2.so

LISTEN ?= 127.0.0.1:7700
METRICS_LISTEN ?= 127.0.0.1:7701

.PHONY: help deps build run dev-token preflight test test-nss test-nss-run interop python-sdk-test check-monitoring bench bench-deployment format lint clean

help:
	@echo "make run    build and start hsm-gateway --dev (token and SQLite in $(DATA_DIR)/, $(LISTEN))"
	@echo "make test   install dependencies, build, run every test (PKCS#11 and end-to-end suites also on NSS's softoken)"
	@echo "make test-nss  only the suites that run against NSS's softoken (HSMGW_TEST_PKCS11=nss)"
	@echo "make check-monitoring  alert rules, dashboard and compose stack, checked against live gateways"
	@echo "make bench  release build; AES-GCM and key-service benchmarks on throwaway tokens and stores (docs/benchmarks.md)"
	@echo "make bench-deployment  release build; the gateway as its own process over TLS on both stores, driven by"
	@echo "            hsm-bench load, with CPU per call and the token's and PostgreSQL's ceilings (docs/benchmarks.md)"

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

# The embedded default: creates (first start) or reopens the dev token, the SQLite file and the
# first admin token (printed once, kept in $(DATA_DIR)/admin.token for hsm-admin). Ctrl-C drains.
run: build
	exec .build/debug/hsm-gateway --dev --data-dir "$(DATA_DIR)" --listen "$(LISTEN)" \
	    --metrics-listen "$(METRICS_LISTEN)"

preflight: build dev-token
	SOFTHSM2_CONF="$(CURDIR)/$(DATA_DIR)/softhsm2.conf" .build/debug/hsm-admin preflight \
	    --module "$(SOFTHSM2_MODULE)" --token "$(DEV_TOKEN_LABEL)" --pin-file "$(DATA_DIR)/user.pin"

# Every test target, found by folder name, so a new one cannot be left out.
TEST_TARGETS := $(sort $(notdir $(wildcard Tests/*Tests)))

# One test process per target, one after another: within a target swift-testing runs suites in
# parallel, but all 500-odd tests at once on two cores starved the ones that wait on real
# deadlines (handshakes, session acquisition, admission). A failing target does not stop the
# others; the step fails at the end, naming them.
test: deps
	$(SWIFT) build --build-tests
	@failed=""; \
	for target in $(TEST_TARGETS); do \
	    echo "== $$target"; \
	    $(SWIFT) test --skip-build --filter "^$$target\." || failed="$$failed $$target"; \
	done; \
	if [ -n "$$failed" ]; then echo "test: failed:$$failed"; exit 1; fi
	$(MAKE) --no-print-directory test-nss-run
	HSM_GATEWAY_BIN=.build/debug/hsm-gateway HSMGW_BIN=.build/debug/hsmgw scripts/python-sdk-test.sh
	HSM_GATEWAY_BIN=.build/debug/hsm-gateway scripts/check-monitoring.sh
	@# openCryptoki's slot daemon and token store are system-wide: root, through sudo when not root.
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	$$sudo env HSM_GATEWAY_BIN=.build/debug/hsm-gateway HSM_ADMIN_BIN=.build/debug/hsm-admin scripts/opencryptoki-refusal-test.sh

# The second, independent PKCS#11 implementation: NSS's softoken (docs/hsm/nss-softoken.md). The
# PKCS#11 suites and a set of end-to-end suites run again with HSMGW_TEST_PKCS11=nss (the
# fixtures then make NSS databases instead of SoftHSM2 tokens); suites that test SoftHSM2 itself
# say so and are skipped. One process per filter, like the targets above. The key-hierarchy suites
# are a subset: NSS writes each token key to SQLite (~7-11 ms) and reads it back for every use
# (~10k GCM operations/s), so they take three times as long as on SoftHSM2; ~2 minutes in all.
NSS_TEST_FILTERS := \
    '^PKCS11Tests\.' \
    '^KeyStoreConformanceTests\.(HierarchyTests|BindingTests|RotationTests|AuditAnchorTests|MessageIVTests)' \
    '^GatewayServerTests\.(EveryMethodTests|ModuleUnderTestProcessTests)' \
    '^HSMAdminTests\.PreflightInitializeArgumentsTests'

test-nss: deps
	$(SWIFT) build --build-tests
	$(MAKE) --no-print-directory test-nss-run

test-nss-run:
	@failed=""; \
	for filter in $(NSS_TEST_FILTERS); do \
	    echo "== NSS softoken: $$filter"; \
	    HSMGW_TEST_PKCS11=nss $(SWIFT) test --skip-build --filter "$$filter" || failed="$$failed $$filter"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-nss: failed:$$failed"; exit 1; fi

# The Python SDK's tests alone (clients/python/README.md): unit tests, live tests against a dev
# gateway and a TLS + mTLS gateway, envelopes across languages with the `hsmgw` CLI.
python-sdk-test interop: deps
	$(SWIFT) build --product hsm-gateway
	$(SWIFT) build --product hsmgw
	HSM_GATEWAY_BIN=.build/debug/hsm-gateway HSMGW_BIN=.build/debug/hsmgw scripts/python-sdk-test.sh

# Alert rules (promtool check and unit tests), Prometheus's configuration, the Grafana dashboard
# and the compose stack, with every metric name checked against live gateways
# (docs/operations.md, "Dashboards and alerts").
check-monitoring: deps
	$(SWIFT) build --product hsm-gateway
	$(SWIFT) build --product hsm-admin
	HSM_GATEWAY_BIN=.build/debug/hsm-gateway scripts/check-monitoring.sh

bench: deps
	$(SWIFT) build -c release --product hsm-bench
	.build/release/hsm-bench gcm --module "$(SOFTHSM2_MODULE)"
	.build/release/hsm-bench keys --module "$(SOFTHSM2_MODULE)" --store sqlite --tasks 16
	.build/release/hsm-bench keys --module "$(SOFTHSM2_MODULE)" --store postgres --tasks 16
	.build/release/hsm-bench wire --module "$(SOFTHSM2_MODULE)" --store sqlite --concurrency 16,64
	.build/release/hsm-bench wire --module "$(SOFTHSM2_MODULE)" --store postgres --concurrency 16,64

# The gateway as it is deployed; the script builds, and takes its settings from the environment
# (STORES, MIXES, CONCURRENCY, DURATION, WARMUP, OUT, …; its header lists them all).
bench-deployment: deps
	SOFTHSM2_MODULE="$(SOFTHSM2_MODULE)" scripts/bench-deployment.sh

format:
	$(SWIFT) format -i -r Package.swift Sources Tests

lint:
	$(SWIFT) format lint -r --strict Package.swift Sources Tests

clean:
	rm -rf .build

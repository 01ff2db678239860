#!/usr/bin/env bash
# Checks the monitoring files in docker/monitoring/ (alert rules, their unit tests, Prometheus's
# scrape configuration, the Grafana dashboard and its provisioning) and the compose stack that
# loads them, against real gateways.
#
#   scripts/check-monitoring.sh
#
# Steps:
# 1. promtool (Debian 12's `prometheus` package; see below): `check config` of prometheus.yml
#    (which checks the rule file too), `check rules`, `test rules` with hsm-gateway.rules.test.yml,
#    and `check rules` of the dashboard's queries (as recording rules) so they parse as PromQL.
# 2. `hsm-gateway --dev` on free loopback ports in a temporary data directory (SQLite), given a
#    little traffic with hsm-admin (answers OK, NOT_FOUND, UNAUTHENTICATED) and one refused frame,
#    so the lazily made series (requests, latency, refusals) exist; its /metrics is kept.
# 3. The same against PostgreSQL (scripts/throwaway-postgres.sh, a token from
#    hsm-config/dev-token.sh), for what only that store exports (cache invalidations).
# 4. scripts/check_monitoring.py: every metric, label, method and status name in the rules, their
#    tests and the dashboard is one those gateways export; the dashboard has its panels; the
#    compose file mounts what the configurations expect; docs/operations.md's alert table names
#    exactly the rules' alerts.
#
# promtool: $PROMTOOL, else `promtool` on PATH, else .build-tools/prometheus/usr/bin/promtool,
# which the first run makes with `apt-get download prometheus` and `dpkg-deb -x` (no root, and no
# Prometheus daemon installed or started; .build-*/ is gitignored).
#
# Environment: HSM_GATEWAY_BIN (default .build/debug/hsm-gateway; must exist), HSM_ADMIN_BIN
# (default: hsm-admin next to the gateway binary), PROMTOOL, PYTHON (default python3, with PyYAML:
# apt-get install python3-yaml), STARTUP_TIMEOUT seconds (default 120).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-120}"
MONITORING="docker/monitoring"
TOOLS_DIR=".build-tools/prometheus"

case "${1:-}" in
"") ;;
-h | --help)
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0" >&2
    exit 64
    ;;
esac

log() { echo "check-monitoring: $*"; }
started=$(date +%s)

tmp="$(mktemp -d "${TMPDIR:-/tmp}/hsmgw-monitoring.XXXXXX")"
# PostgreSQL's directory must be reachable by the postgres user when we are root: not under $tmp.
pg_dir="${TMPDIR:-/tmp}/hsmgw-monitoring-pg.$$"
gateway_pid=""
gateway_log=""

# free_ports, wait_gateway, stop_gateway.
# shellcheck source=scripts/lib/gateway-process.sh
source scripts/lib/gateway-process.sh

cleanup() {
    local status=$?
    stop_gateway "$gateway_pid"
    if [[ $status -ne 0 && -n "$gateway_log" && -s "$gateway_log" ]]; then
        log "last lines of the gateway's log (API tokens redacted):"
        tail -n 40 "$gateway_log" | sed -E 's/hsmgw_[A-Za-z0-9_-]{43}/hsmgw_<redacted>/g; s/^/  | /'
    fi
    if [[ -e "$pg_dir/.throwaway-postgres" ]]; then
        scripts/throwaway-postgres.sh stop "$pg_dir" >/dev/null 2>&1 || log "could not stop PostgreSQL in $pg_dir"
    fi
    rm -rf "$tmp"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. promtool --------------------------------------------------------------------------------
promtool="${PROMTOOL:-}"
if [[ -z "$promtool" ]]; then
    if command -v promtool >/dev/null; then
        promtool=$(command -v promtool)
    else
        promtool="$TOOLS_DIR/usr/bin/promtool"
        if [[ ! -x "$promtool" ]]; then
            log "fetching promtool: apt-get download prometheus into $TOOLS_DIR"
            mkdir -p "$TOOLS_DIR"
            (cd "$TOOLS_DIR" && rm -f prometheus_*.deb && apt-get download prometheus >/dev/null 2>&1) ||
                { log "apt-get download prometheus failed (Debian's archive unreachable?); set PROMTOOL"; exit 1; }
            dpkg-deb -x "$TOOLS_DIR"/prometheus_*.deb "$TOOLS_DIR"
            rm -f "$TOOLS_DIR"/prometheus_*.deb
        fi
    fi
fi
"$promtool" --version >/dev/null 2>&1 || { log "$promtool does not run"; exit 1; }
log "$("$promtool" --version 2>&1 | head -n 1)"
"$promtool" check config "$MONITORING/prometheus.yml"
"$promtool" check rules "$MONITORING/hsm-gateway.rules.yml"
"$promtool" test rules "$MONITORING/hsm-gateway.rules.test.yml"
# The dashboard's queries, parsed by promtool as the rules of a file of their own.
"$PYTHON" -c 'import yaml' 2>/dev/null || { log "$PYTHON has no PyYAML (apt-get install python3-yaml)"; exit 1; }
"$PYTHON" scripts/check_monitoring.py --write-dashboard-rules "$tmp/dashboard.rules.yml"
"$promtool" check rules "$tmp/dashboard.rules.yml" | sed "s|$tmp/dashboard.rules.yml|the dashboard's queries|"

# --- Gateways -----------------------------------------------------------------------------------
gateway="${HSM_GATEWAY_BIN:-.build/debug/hsm-gateway}"
admin="${HSM_ADMIN_BIN:-$(dirname "$gateway")/hsm-admin}"
[[ -x "$gateway" ]] || { log "no gateway binary at $gateway (swift build, or set HSM_GATEWAY_BIN)"; exit 1; }
[[ -x "$admin" ]] || { log "no hsm-admin binary at $admin (set HSM_ADMIN_BIN)"; exit 1; }

# wait_ready METRICS_PORT TOKEN_FILE: until the token file has a line and /readyz says 200.
wait_ready() {
    wait_gateway "$gateway_pid" "$2" \
        "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$1/readyz', timeout=1)" || exit 1
}

# traffic PORT TOKEN_FILE: answers of several statuses (the labelled series appear with their
# first answer), then a frame of protocol version 2, which the transport refuses.
traffic() {
    local port=$1 token_file=$2
    HSMGW_SERVER="127.0.0.1:$port" HSMGW_TOKEN_FILE="$token_file" "$admin" status >/dev/null
    HSMGW_SERVER="127.0.0.1:$port" HSMGW_TOKEN_FILE="$token_file" "$admin" tenant show monitoring-check \
        >/dev/null 2>&1 && { log "tenant monitoring-check exists on a new gateway?"; exit 1; }
    (umask 077 && printf 'hsmgw_%043d' 0 >"$tmp/wrong.token")
    HSMGW_SERVER="127.0.0.1:$port" HSMGW_TOKEN_FILE="$tmp/wrong.token" "$admin" status >/dev/null 2>&1 &&
        { log "a made-up token was accepted"; exit 1; }
    "$PYTHON" - "$port" <<'EOF'
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), 5) as s:
    s.sendall(bytes([0, 0, 0, 16, 2, 1]) + bytes(14))  # length 16, version 2, kind request
    s.settimeout(5)
    answer = s.recv(4096)
assert b"UNSUPPORTED_VERSION" in answer, answer
EOF
}

scrape() {
    "$PYTHON" -c "import urllib.request as u, sys; sys.stdout.write(u.urlopen('http://127.0.0.1:$1/metrics', timeout=5).read().decode())" >"$2"
}

# --- 2. hsm-gateway --dev (SQLite) --------------------------------------------------------------
read -r port metrics_port < <(free_ports "$PYTHON")
data_dir="$tmp/dev"
mkdir -m 700 "$data_dir"
gateway_log="$tmp/dev.log"
log "starting $gateway --dev on 127.0.0.1:$port (metrics $metrics_port)"
"$gateway" --dev --data-dir "$data_dir" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    >"$gateway_log" 2>&1 &
gateway_pid=$!
wait_ready "$metrics_port" "$data_dir/admin.token"
traffic "$port" "$data_dir/admin.token"
scrape "$metrics_port" "$tmp/sqlite.metrics"
stop_gateway "$gateway_pid"
gateway_pid=""

# --- 3. hsm-gateway on PostgreSQL ---------------------------------------------------------------
log "starting PostgreSQL in $pg_dir"
pg_out=$(scripts/throwaway-postgres.sh start "$pg_dir" --watch-pid $$)
pg_port=$(sed -n 's/^port=//p' <<<"$pg_out")
token_dir="$tmp/token"
DATA_DIR="$token_dir" TOKEN_LABEL=hsmgw-monitoring hsm-config/dev-token.sh >/dev/null
read -r port metrics_port < <(free_ports "$PYTHON")
cat >"$tmp/gateway.yaml" <<EOF
listen:
  - 127.0.0.1:$port
metrics_listen: 127.0.0.1:$metrics_port
hsm:
  module: ${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
  token_label: hsmgw-monitoring
  pin:
    file: $token_dir/user.pin
  softhsm2_conf: $token_dir/softhsm2.conf
store:
  kind: postgres
  postgres:
    host: 127.0.0.1
    port: $pg_port
    user: hsmgw
    database: postgres
    password_file: $pg_dir/password
    tls: disable
auth:
  bootstrap_token_file: $tmp/postgres-admin.token
EOF
gateway_log="$tmp/postgres.log"
log "starting $gateway on PostgreSQL on 127.0.0.1:$port (metrics $metrics_port)"
"$gateway" --config "$tmp/gateway.yaml" >"$gateway_log" 2>&1 &
gateway_pid=$!
wait_ready "$metrics_port" "$tmp/postgres-admin.token"
traffic "$port" "$tmp/postgres-admin.token"
scrape "$metrics_port" "$tmp/postgres.metrics"
stop_gateway "$gateway_pid"
gateway_pid=""
scripts/throwaway-postgres.sh stop "$pg_dir"
gateway_log=""

# --- 4. Names, dashboard, compose, docs ---------------------------------------------------------
"$PYTHON" scripts/check_monitoring.py "$tmp/sqlite.metrics" "$tmp/postgres.metrics"
log "passed in $(($(date +%s) - started)) s"

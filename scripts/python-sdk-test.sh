#!/usr/bin/env bash
# The Python SDK's tests (clients/python): unit tests, then live tests against real gateways, then
# envelopes across languages with the Swift `hsmgw` CLI.
#
#   scripts/python-sdk-test.sh              everything (what `make test` runs)
#   scripts/python-sdk-test.sh --unit-only  only the unit tests (no gateway needed)
#
# Steps:
#  1. a venv in .build-interop/venv (kept between runs; .build-*/ is gitignored), into which
#     `pip install "./clients/python[test]"` installs the SDK as a user would, with protobuf,
#     cryptography, pytest, mypy and types-protobuf from PyPI;
#  2. unit tests (tests/unit: framing, encodings, envelope vectors, retries, mypy --strict);
#  3. `hsm-gateway --dev` (plaintext, loopback) in a temporary data directory: tests/live/test_live.py
#     and tests/live/test_cross_language.py (the latter needs HSMGW_BIN: it FAILS without it);
#  4. a throwaway PKI made with openssl (CA; server certificate for localhost and 127.0.0.1; a
#     client certificate with clientAuth; one with serverAuth only), a SoftHSM2 token made by
#     hsm-config/dev-token.sh, and a gateway on TLS with client certificates optional plus a Unix
#     socket listener: tests/live/test_live.py again over TLS, tests/live/test_tls.py, and
#     tests/live/test_cross_language.py again with the CLI over TLS.
# Gateways are stopped and the temporary directory removed on every exit.
#
# Environment: HSM_GATEWAY_BIN (default .build/debug/hsm-gateway), HSMGW_BIN (the Swift `hsmgw`
# CLI; default .build/debug/hsmgw), PYTHON (default python3), STARTUP_TIMEOUT seconds (default 120),
# PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

PYTHON="${PYTHON:-python3}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-120}"
VENV_DIR=".build-interop/venv"
SDK_DIR="clients/python"
gateway="${HSM_GATEWAY_BIN:-.build/debug/hsm-gateway}"
cli="${HSMGW_BIN:-.build/debug/hsmgw}"
[[ "$cli" == /* ]] || cli="$root/$cli"

unit_only=false
case "${1:-}" in
"") ;;
--unit-only) unit_only=true ;;
-h | --help)
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [--unit-only]" >&2
    exit 64
    ;;
esac

log() { echo "python-sdk-test: $*"; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/hsmgw-pysdk.XXXXXX")"
pids=()
# free_ports, wait_gateway, stop_gateway.
# shellcheck source=scripts/lib/gateway-process.sh
source scripts/lib/gateway-process.sh
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do stop_gateway "$pid"; done
    if [[ $status -ne 0 ]]; then
        for logfile in "$tmp"/*.log; do
            [[ -s "$logfile" ]] || continue
            log "last lines of $(basename "$logfile") (API tokens redacted):"
            tail -n 30 "$logfile" | sed -E 's/hsmgw_[A-Za-z0-9_-]{43}/hsmgw_<redacted>/g; s/^/  | /'
        done
    fi
    rm -rf "$tmp"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. The venv and the SDK ------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || { log "$PYTHON not found (apt-get install python3 python3-venv)"; exit 1; }
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    log "creating $VENV_DIR"
    mkdir -p "$(dirname "$VENV_DIR")"
    "$PYTHON" -m venv "$VENV_DIR" || { log "python venv failed (apt-get install python3-venv)"; exit 1; }
fi
py="$root/$VENV_DIR/bin/python"
log "installing ./${SDK_DIR}[test] into $VENV_DIR"
"$py" -m pip install --quiet --disable-pip-version-check "./${SDK_DIR}[test]"
# The same version number may hold other code than last run's: install this tree's.
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "./$SDK_DIR"
# The installed copy is what the tests import, not the source tree.
rm -rf "$SDK_DIR/build"
export PYTHONDONTWRITEBYTECODE=1
pytest() { (cd "$SDK_DIR" && "$py" -m pytest -p no:cacheprovider -q -rA ${PYTEST_ARGS:-} "$@"); }
# A failing live step does not stop the others (each names what it covers); the script fails at
# the end, naming them.
failed_steps=()
live() { # NAME VAR=VALUE... -- TEST FILES...
    local name=$1 vars=()
    shift
    while [[ $1 != -- ]]; do
        vars+=("$1")
        shift
    done
    shift
    (cd "$SDK_DIR" && env "${vars[@]}" "$py" -m pytest -p no:cacheprovider -q -rA ${PYTEST_ARGS:-} "$@") ||
        failed_steps+=("$name")
}

# --- 2. Unit tests ----------------------------------------------------------------------------
log "unit tests ($("$py" -c 'import google.protobuf as p, cryptography as c; print("protobuf", p.__version__, "cryptography", c.__version__)'))"
pytest tests/unit
if $unit_only; then
    exit 0
fi

[[ -x "$gateway" ]] || { log "no gateway binary at $gateway (build it: swift build --product hsm-gateway)"; exit 1; }

# --- 3. The plaintext dev gateway -------------------------------------------------------------
read -r port metrics_port < <(free_ports "$py")
dev_dir="$tmp/dev"
mkdir -m 700 "$dev_dir"
log "starting $gateway --dev on 127.0.0.1:$port"
"$gateway" --dev --data-dir "$dev_dir" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    >"$tmp/dev-gateway.log" 2>&1 &
pids+=($!)
wait_gateway "${pids[-1]}" "$dev_dir/admin.token" "$py" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()"

log "live tests against the dev gateway (plaintext, 127.0.0.1:$port)"
live "live (plaintext)" HSMGW_LIVE_ADDRESS="127.0.0.1:$port" HSMGW_LIVE_TOKEN_FILE="$dev_dir/admin.token" \
    -- tests/live/test_live.py

log "cross-language envelopes with $cli"
live "cross-language (plaintext)" HSMGW_LIVE_ADDRESS="127.0.0.1:$port" \
    HSMGW_LIVE_TOKEN_FILE="$dev_dir/admin.token" HSMGW_BIN="$cli" -- tests/live/test_cross_language.py

# --- 4. TLS, mutual TLS and a Unix socket -----------------------------------------------------
command -v openssl >/dev/null || { log "openssl not found (apt-get install openssl)"; exit 1; }
pki="$tmp/pki"
mkdir -m 700 "$pki"
ossl() { openssl "$@" >/dev/null 2>&1 || { log "openssl $1 failed"; openssl "$@"; exit 1; }; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
    -days 2 -subj "/CN=hsmgw python-sdk test CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
issue() { # name subject extensions
    ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$pki/$1.key" -out "$pki/$1.csr" -subj "$2"
    printf '%s\n' "$3" >"$pki/$1.ext"
    ossl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -out "$pki/$1.crt" \
        -days 2 -extfile "$pki/$1.ext"
    chmod 600 "$pki/$1.key"
}
issue server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
client_cn="python-sdk-mtls-$$"
issue client "/CN=$client_cn" "extendedKeyUsage=clientAuth"
issue serveronly "/CN=python-sdk-serverauth" "extendedKeyUsage=serverAuth"

tls_dir="$tmp/tls"
mkdir -m 700 "$tls_dir"
DATA_DIR="$tls_dir" TOKEN_LABEL="hsmgw-pysdk" hsm-config/dev-token.sh >"$tmp/dev-token.log" 2>&1
read -r tls_port tls_metrics < <(free_ports "$py")
socket_path="$tls_dir/gateway.sock"
module="${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
log "starting $gateway on TLS 127.0.0.1:$tls_port (client certificates optional) and unix:$socket_path"
SOFTHSM2_CONF="$tls_dir/softhsm2.conf" "$gateway" --hsm-module "$module" --token-label hsmgw-pysdk \
    --pin-file "$tls_dir/user.pin" --store sqlite --sqlite-path "$tls_dir/gateway.sqlite" \
    --bootstrap-token-file "$tls_dir/admin.token" \
    --listen "127.0.0.1:$tls_port" --listen "unix:$socket_path" --metrics-listen "127.0.0.1:$tls_metrics" \
    --tls-certificate "$pki/server.crt" --tls-private-key "$pki/server.key" \
    --tls-client-ca "$pki/ca.crt" --client-certificates optional \
    >"$tmp/tls-gateway.log" 2>&1 &
pids+=($!)
wait_gateway "${pids[-1]}" "$tls_dir/admin.token" "$py" -c "import socket; socket.create_connection(('127.0.0.1', $tls_port), 1).close()"

log "live tests against the TLS gateway (127.0.0.1:$tls_port, Unix socket $socket_path)"
live "live (TLS, mTLS, Unix socket)" HSMGW_LIVE_ADDRESS="127.0.0.1:$tls_port" \
    HSMGW_LIVE_TOKEN_FILE="$tls_dir/admin.token" HSMGW_LIVE_CA_FILE="$pki/ca.crt" HSMGW_LIVE_SERVER_NAME="localhost" \
    HSMGW_LIVE_CLIENT_CERT="$pki/client.crt" HSMGW_LIVE_CLIENT_KEY="$pki/client.key" HSMGW_LIVE_CLIENT_CN="$client_cn" \
    HSMGW_LIVE_SERVERAUTH_CERT="$pki/serveronly.crt" HSMGW_LIVE_SERVERAUTH_KEY="$pki/serveronly.key" \
    HSMGW_LIVE_UNIX_SOCKET="$socket_path" \
    -- tests/live/test_live.py tests/live/test_tls.py

log "cross-language envelopes with $cli over TLS"
live "cross-language (TLS)" HSMGW_LIVE_ADDRESS="127.0.0.1:$tls_port" HSMGW_LIVE_TOKEN_FILE="$tls_dir/admin.token" \
    HSMGW_LIVE_CA_FILE="$pki/ca.crt" HSMGW_LIVE_SERVER_NAME="localhost" HSMGW_BIN="$cli" \
    -- tests/live/test_cross_language.py

if ((${#failed_steps[@]})); then
    log "failed: $(printf '%s; ' "${failed_steps[@]}")"
    exit 1
fi
log "all Python SDK tests passed"

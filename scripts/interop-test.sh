#!/usr/bin/env bash
# Interoperability test: a Python client written only from docs/protocol.md and the .proto file
# (Tests/Interop/python) against a real gateway in dev mode.
#
#   scripts/interop-test.sh                 framing unit tests, then the live test
#   scripts/interop-test.sh --framing-only  only the framing unit tests (no gateway needed)
#
# Steps: a Python venv in .build-interop/venv (kept between runs; .build-*/ is gitignored) with
# protobuf $PROTOBUF_VERSION from PyPI; the _pb2 module generated with protoc into a temporary
# directory (nothing generated is committed); test_framing.py (unit tests against the worked
# examples of docs/protocol.md); then `hsm-gateway --dev` on loopback ports in a temporary data
# directory, waiting for <data-dir>/admin.token and the port, and interop_test.py against it.
# The gateway is stopped and the temporary directory removed on every exit.
#
# Environment: HSM_GATEWAY_BIN (a gateway binary to use; without it `swift build --product
# hsm-gateway` runs first and .build/debug/hsm-gateway is used), PYTHON (default python3),
# STARTUP_TIMEOUT seconds (default 120).
set -euo pipefail
cd "$(dirname "$0")/.."

# protobuf 4.25.x runs the code Debian 12's protoc 3.21 generates (the builder API of 3.20+).
PROTOBUF_VERSION="4.25.8"
PYTHON="${PYTHON:-python3}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-120}"
VENV_DIR=".build-interop/venv"
PY_DIR="Tests/Interop/python"

framing_only=false
case "${1:-}" in
"") ;;
--framing-only) framing_only=true ;;
-h | --help)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [--framing-only]" >&2
    exit 64
    ;;
esac

log() { echo "interop-test: $*"; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/hsmgw-interop.XXXXXX")"
gateway_pid=""
cleanup() {
    local status=$?
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$gateway_pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$gateway_pid" 2>/dev/null; then
            log "the gateway did not stop within 10 s of SIGTERM; killing it"
            kill -KILL "$gateway_pid" 2>/dev/null || true
        fi
        wait "$gateway_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -s "$tmp/gateway.log" ]]; then
        log "last lines of the gateway's log (API tokens redacted):"
        tail -n 40 "$tmp/gateway.log" | sed -E 's/hsmgw_[A-Za-z0-9_-]{43}/hsmgw_<redacted>/g; s/^/  | /'
    fi
    rm -rf "$tmp"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Python and protobuf ----------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || { log "$PYTHON not found (apt-get install python3 python3-venv)"; exit 1; }
command -v protoc >/dev/null || { log "protoc not found (apt-get install protobuf-compiler)"; exit 1; }
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    log "creating $VENV_DIR"
    mkdir -p "$(dirname "$VENV_DIR")"
    "$PYTHON" -m venv "$VENV_DIR" || { log "python venv failed (apt-get install python3-venv)"; exit 1; }
fi
py="$VENV_DIR/bin/python"
if [[ "$("$py" -c 'import google.protobuf as p; print(p.__version__)' 2>/dev/null)" != "$PROTOBUF_VERSION" ]]; then
    log "installing protobuf==$PROTOBUF_VERSION"
    "$py" -m pip install --quiet --disable-pip-version-check "protobuf==$PROTOBUF_VERSION"
fi

mkdir -p "$tmp/gen"
protoc --proto_path=proto --python_out="$tmp/gen" proto/hsmgw/v1/gateway.proto
export PYTHONPATH="$tmp/gen:$PWD/$PY_DIR"
export PYTHONDONTWRITEBYTECODE=1

# --- Framing unit tests -----------------------------------------------------------------------
log "framing unit tests (protoc $(protoc --version | cut -d' ' -f2), protobuf $PROTOBUF_VERSION)"
(cd "$PY_DIR" && "$OLDPWD/$py" -m unittest -v test_framing)
if $framing_only; then
    exit 0
fi

# --- The gateway ------------------------------------------------------------------------------
gateway="${HSM_GATEWAY_BIN:-.build/debug/hsm-gateway}"
if [[ -z "${HSM_GATEWAY_BIN:-}" ]]; then
    log "building hsm-gateway"
    swift build --product hsm-gateway
fi
[[ -x "$gateway" ]] || { log "no gateway binary at $gateway"; exit 1; }

# Two free loopback ports, held open together while chosen so they differ.
read -r port metrics_port < <("$py" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
data_dir="$tmp/data"
mkdir -m 700 "$data_dir"
log "starting $gateway --dev on 127.0.0.1:$port (metrics $metrics_port), data in $data_dir"
"$gateway" --dev --data-dir "$data_dir" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    >"$tmp/gateway.log" 2>&1 &
gateway_pid=$!

# Ready when admin.token holds a line and the port accepts connections.
ready=false
for _ in $(seq 1 $((STARTUP_TIMEOUT * 5))); do
    if ! kill -0 "$gateway_pid" 2>/dev/null; then
        wait "$gateway_pid" && code=0 || code=$?
        gateway_pid=""
        log "the gateway exited (status $code) before it was ready"
        exit 1
    fi
    if [[ -s "$data_dir/admin.token" ]] && "$py" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null; then
        ready=true
        break
    fi
    sleep 0.2
done
$ready || { log "the gateway was not ready within ${STARTUP_TIMEOUT} s"; exit 1; }

log "live test against 127.0.0.1:$port"
(cd "$PY_DIR" && "$OLDPWD/$py" interop_test.py "127.0.0.1:$port" "$data_dir/admin.token")

# shellcheck shell=bash
# Shell functions for scripts that run hsm-gateway as a child process on loopback
# (scripts/python-sdk-test.sh, scripts/check-monitoring.sh). Source it after defining `log`.
#
#   free_ports PYTHON                    prints two free loopback TCP ports
#   wait_gateway PID TOKEN_FILE CMD...   until TOKEN_FILE has content and CMD succeeds; returns 1
#                                        when the gateway exits first or STARTUP_TIMEOUT (default
#                                        120) seconds pass
#   stop_gateway PID                     SIGTERM, up to 10 s to drain, then SIGKILL; reaps it

free_ports() {
    "$1" - <<'PYEOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PYEOF
}

wait_gateway() {
    local pid=$1 token_file=$2 code
    shift 2
    for _ in $(seq 1 $((${STARTUP_TIMEOUT:-120} * 5))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" && code=0 || code=$?
            log "the gateway exited (status $code) before it was ready"
            return 1
        fi
        if [[ -s "$token_file" ]] && "$@" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    log "the gateway was not ready within ${STARTUP_TIMEOUT:-120} s"
    return 1
}

stop_gateway() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "a gateway did not stop within 10 s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

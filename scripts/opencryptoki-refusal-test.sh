#!/bin/sh
# A second, independent PKCS#11 implementation that lacks AES-GCM: openCryptoki's software token
# (Debian 12's opencryptoki 3.8.1 lists AES-ECB, AES-CBC and AES-CBC-PAD, no CKM_AES_GCM).
# `hsm-admin preflight` and `hsm-gateway` against it must both refuse, exit non-zero, and name
# CKM_AES_GCM and the docs page (docs/hsm/README.md, docs/hsm/opencryptoki.md).
#
# openCryptoki keeps its tokens system-wide (/var/lib/opencryptoki/swtok) and needs its slot
# daemon, pkcsslotd, running as root. This script starts pkcsslotd when it is not running and
# stops what it started on exit; it (re)initialises slot 3's software token, but only when that
# token is uninitialised or is its own (label hsmgw-ock), never someone else's.
#
#   scripts/opencryptoki-refusal-test.sh      (run by `make test`; `make deps` installs opencryptoki)
#
# Environment: HSM_GATEWAY_BIN, HSM_ADMIN_BIN (default .build/debug/...).
set -eu

GATEWAY=${HSM_GATEWAY_BIN:-.build/debug/hsm-gateway}
ADMIN=${HSM_ADMIN_BIN:-.build/debug/hsm-admin}
MODULE=/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0
SLOT=3
LABEL=hsmgw-ock
SWTOK=/var/lib/opencryptoki/swtok
# Test-only PINs of a throwaway token (the soft token takes 4 to 8 characters).
DEFAULT_SO_PIN=87654321
SO_PIN=76543210
USER_PIN=4242

fail() {
    echo "opencryptoki-refusal-test: FAIL: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root: pkcsslotd and openCryptoki's token store are system-wide"
for tool in /usr/sbin/pkcsslotd /usr/sbin/pkcsconf "$MODULE"; do
    [ -e "$tool" ] || fail "$tool is missing: install opencryptoki (make deps)"
done
if [ ! -x "$GATEWAY" ] || [ ! -x "$ADMIN" ]; then fail "build first: $GATEWAY and $ADMIN (swift build)"; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hsmgw-ock.XXXXXX")
started_daemon=""
# Stops the daemon with pid $1 (one this script started) and waits until it is gone.
stop_daemon() {
    kill "$1" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        [ -n "$(daemon_pid)" ] || return 0
        sleep 0.2
    done
}
cleanup() {
    if [ -n "$started_daemon" ]; then
        # Only the daemon this script started, by its pid.
        stop_daemon "$started_daemon"
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The running pkcsslotd's pid, if any (a pid file left by a daemon that exited, or whose process
# is a zombie, does not count).
daemon_pid() {
    pid=$(cat /run/pkcsslotd.pid 2>/dev/null || true)
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 0
    state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [ "$state" != Z ] && grep -q pkcsslotd "/proc/$pid/comm" 2>/dev/null && echo "$pid"
    return 0
}

start_daemon() {
    /usr/sbin/pkcsslotd || fail "pkcsslotd did not start"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pid=$(daemon_pid)
        [ -n "$pid" ] && [ -S /run/pkcsslotd.socket ] && { started_daemon=$pid; return; }
        sleep 0.2
    done
    fail "pkcsslotd started but wrote no pid file or socket"
}

token_label() {
    pkcsconf -t -c "$SLOT" 2>/dev/null | sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' | sed 's/[[:space:]]*$//'
}
token_flags() {
    pkcsconf -t -c "$SLOT" 2>/dev/null | sed -n 's/^[[:space:]]*Flags:[[:space:]]*//p'
}

if [ -z "$(daemon_pid)" ]; then start_daemon; fi

# A fresh token: openCryptoki 3.8.1's C_InitToken over an initialised soft token leaves the SO
# login failing (CKR_FUNCTION_FAILED), so the store is emptied (with the daemon stopped) instead.
label=$(token_label)
case "$(token_flags)" in
*TOKEN_INITIALIZED*)
    [ "$label" = "$LABEL" ] || fail "slot $SLOT holds the token \"$label\", not this test's; not touching it"
    if [ -z "$started_daemon" ]; then
        fail "pkcsslotd was already running (not started by this test): stop it to let the test reset its token"
    fi
    stop_daemon "$started_daemon"
    started_daemon=""
    rm -rf "$SWTOK/NVTOK.DAT" "$SWTOK"/MK_* "$SWTOK"/TOK_OBJ/*
    start_daemon
    ;;
esac
echo "$LABEL" | pkcsconf -c "$SLOT" -I -S "$DEFAULT_SO_PIN" >/dev/null || fail "pkcsconf -I (initialise the token)"
pkcsconf -c "$SLOT" -P -S "$DEFAULT_SO_PIN" -n "$SO_PIN" >/dev/null || fail "pkcsconf -P (set the SO PIN)"
pkcsconf -c "$SLOT" -u -S "$SO_PIN" -n "$USER_PIN" >/dev/null || fail "pkcsconf -u (set the user PIN)"
case "$(token_flags)" in
*USER_PIN_INITIALIZED*) ;;
*) fail "the user PIN is not initialised: $(token_flags)" ;;
esac
pkcsconf -m -c "$SLOT" | grep -q CKM_AES_GCM && fail "openCryptoki lists CKM_AES_GCM now: this test no longer tests a token without it"

printf '%s' "$USER_PIN" >"$work/user.pin"
chmod 600 "$work/user.pin"
cat >"$work/gateway.yaml" <<EOF
hsm:
  module: $MODULE
  token_label: $LABEL
  pin:
    file: $work/user.pin
store:
  sqlite:
    path: $work/gateway.sqlite
listen: ["127.0.0.1:0"]
metrics_listen: "off"
EOF

status=0
"$ADMIN" preflight --config "$work/gateway.yaml" --rounds 10 >"$work/preflight.out" 2>&1 || status=$?
cat "$work/preflight.out"
[ "$status" = 1 ] || fail "hsm-admin preflight exited $status, expected 1"
grep -q 'FAIL  mechanism CKM_AES_GCM: not listed by the token' "$work/preflight.out" || fail "preflight did not name CKM_AES_GCM"
grep -q 'docs/hsm/README.md' "$work/preflight.out" || fail "preflight did not name docs/hsm/README.md"
grep -q 'preflight FAILED: 1 check failed' "$work/preflight.out" || fail "preflight failed on more than CKM_AES_GCM"
grep -q 'openCryptoki (detected' "$work/preflight.out" || fail "preflight did not detect openCryptoki"
grep -q 'docs/hsm/opencryptoki.md' "$work/preflight.out" || fail "preflight did not name docs/hsm/opencryptoki.md"
grep -q "$USER_PIN" "$work/preflight.out" && fail "preflight printed the PIN"

status=0
timeout 60 "$GATEWAY" --config "$work/gateway.yaml" >"$work/gateway.out" 2>&1 || status=$?
tail -n 3 "$work/gateway.out"
[ "$status" = 69 ] || fail "hsm-gateway exited $status, expected 69 (EX_UNAVAILABLE)"
grep -q 'does not list CKM_AES_GCM' "$work/gateway.out" || fail "hsm-gateway did not name CKM_AES_GCM"
grep -q 'docs/hsm/README.md' "$work/gateway.out" || fail "hsm-gateway did not name docs/hsm/README.md"

echo "opencryptoki-refusal-test: PASS: preflight exit 1 and hsm-gateway exit 69 on openCryptoki $(dpkg-query -W -f='${Version}' opencryptoki 2>/dev/null), both naming CKM_AES_GCM"

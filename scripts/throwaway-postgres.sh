#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests: private data directory, loopback only, a random
# scram-sha-256 password, a free port, durability left at the server's defaults.
#
#   throwaway-postgres.sh start DIR [--watch-pid PID] [--tls CERT KEY]
#       initdb into DIR/data (superuser `hsmgw`, password in DIR/password, mode 0600), start the
#       server on 127.0.0.1 and a free port with its Unix socket in DIR/socket, wait until it
#       accepts connections, then print:
#           port=N
#           socket=DIR/socket      (the socket directory; the socket is DIR/socket/.s.PGSQL.N)
#           bin=PATH               (the PostgreSQL binaries used, for psql)
#       With --watch-pid, a detached watcher stops and removes the cluster once PID has exited
#       (so a test process that crashes does not leave a server running).
#       With --tls, the server serves TLS with CERT and KEY (PEM; copied into DIR) and accepts
#       TCP logins only over TLS (`hostssl` in pg_hba.conf); the Unix socket stays as it is.
#   throwaway-postgres.sh stop DIR
#       stop the server (-m fast) and remove DIR. DIR must have been made by `start`.
#   throwaway-postgres.sh halt DIR [immediate|fast|smart]
#       stop the server (default -m immediate: a crash, as an outage looks) and keep DIR.
#   throwaway-postgres.sh resume DIR
#       start a halted server again on the same port and wait until it accepts logins.
#   throwaway-postgres.sh standby PRIMARY DIR [--watch-pid PID] [--synchronous]
#       a streaming standby of the cluster in PRIMARY (made by `start`, without --tls): a base
#       backup (pg_basebackup) into DIR/data with standby.signal and application_name
#       `hsmgw_standby`, started on a free port, waiting until it accepts logins and streams;
#       prints port=, socket= and bin= as `start` does. With --synchronous the primary then waits
#       for it at every commit (synchronous_standby_names), and the command returns once
#       pg_stat_replication says `sync`. `stop`, `halt` and `resume` work on DIR as on a primary.
#   throwaway-postgres.sh promote DIR
#       promote the standby in DIR (pg_ctl promote) and wait until it accepts writes.
#
# Binaries: $PG_BIN, else the newest /usr/lib/postgresql/*/bin. As root, initdb, pg_ctl and the
# server run as the `postgres` user (`runuser -u postgres --`), which owns DIR.
set -euo pipefail

# The superuser the tests connect as.
readonly PG_USER=hsmgw
# A file in DIR that marks it as ours: `stop` removes nothing without it.
readonly MARKER=.throwaway-postgres
# How many random ports to try before giving up (another process may take one between the
# check and the bind).
readonly PORT_ATTEMPTS=20
# One cluster serves a whole test process, where many suites each open a pool of up to 8
# connections at once (each gateway under test has its own); PostgreSQL's default of 100 ran out.
readonly MAX_CONNECTIONS=400
# Seconds pg_ctl waits for start-up and shut-down.
readonly PG_CTL_TIMEOUT=60

die() {
    echo "throwaway-postgres: $*" >&2
    exit 1
}

usage() {
    die "usage: $0 start DIR [--watch-pid PID] [--tls CERT KEY] | stop DIR | halt DIR [MODE] | resume DIR | standby PRIMARY DIR [--watch-pid PID] [--synchronous] | promote DIR"
}

find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then
        [[ -x "$PG_BIN/initdb" ]] || die "PG_BIN=$PG_BIN has no initdb"
        echo "$PG_BIN"
        return
    fi
    local newest candidates=(/usr/lib/postgresql/*/bin)
    newest=""
    if [[ -d "${candidates[0]}" ]]; then
        newest=$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)
    fi
    [[ -n "$newest" && -x "$newest/initdb" ]] ||
        die "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (install the postgresql package, or set PG_BIN)"
    echo "$newest"
}

# Runs a command as the cluster's owner: `postgres` when we are root, else ourselves.
as_owner() {
    if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

port_in_use() {
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Ready means a real login works (pg_ctl --wait only checks the socket).
wait_for_logins() {
    local dir=$1 bin=$2 port=$3 password=$4 sslmode=$5 tries
    for ((tries = 0; tries < 100; tries++)); do
        if PGPASSWORD=$password PGSSLMODE=$sslmode "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres \
            -c 'SELECT 1' >/dev/null 2>&1 </dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "the server on port $port does not accept logins; see $dir/postgres.log"
}

halt() {
    local dir=$1 mode=${2:-immediate} bin
    [[ -e "$dir/$MARKER" ]] || die "$dir was not made by $0 start"
    bin=$(find_bin)
    as_owner "$bin/pg_ctl" --pgdata="$dir/data" --mode="$mode" --wait --timeout="$PG_CTL_TIMEOUT" stop \
        >/dev/null 2>&1 </dev/null || die "pg_ctl stop failed; see $dir/postgres.log"
}

resume() {
    local dir=$1 bin options port
    [[ -e "$dir/$MARKER" ]] || die "$dir was not made by $0 start"
    bin=$(find_bin)
    options=$(cat "$dir/server.options")
    as_owner "$bin/pg_ctl" --pgdata="$dir/data" --log="$dir/postgres.log" --wait --timeout="$PG_CTL_TIMEOUT" \
        -o "$options" start >/dev/null 2>&1 </dev/null || die "pg_ctl start failed; see $dir/postgres.log"
    port=$(sed -n 's/^-p \([0-9]*\).*/\1/p' "$dir/server.options")
    wait_for_logins "$dir" "$bin" "$port" "$(cat "$dir/password")" "$(cat "$dir/sslmode")"
}

start() {
    local dir=$1 watch_pid=${2:-} tls_cert=${3:-} tls_key=${4:-}
    local bin
    bin=$(find_bin)
    [[ ! -e "$dir" ]] || [[ -z "$(ls -A "$dir")" ]] || die "$dir exists and is not empty"
    if [[ $(id -u) == 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs the postgres user (postgresql package)"
    fi

    mkdir -p "$dir"
    chmod 0700 "$dir"
    dir=$(cd "$dir" && pwd)
    touch "$dir/$MARKER"
    mkdir -p "$dir/socket"
    chmod 0700 "$dir/socket"
    local password
    password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    (umask 077 && printf '%s' "$password" >"$dir/password")
    touch "$dir/postgres.log"
    if [[ $(id -u) == 0 ]]; then
        chown -R postgres: "$dir"
        runuser -u postgres -- test -x "$dir" ||
            die "the postgres user cannot reach $dir (a parent directory is private); use a directory under /tmp"
    fi
    chmod 0600 "$dir/password"
    local server_options="-c listen_addresses=127.0.0.1 -c max_connections=$MAX_CONNECTIONS"
    if [[ -n "$tls_cert" ]]; then
        [[ -r "$tls_cert" && -r "$tls_key" ]] || die "--tls: cannot read $tls_cert or $tls_key"
        # The server refuses a key that others can read, and as root it must own it.
        install -m 0600 "$tls_cert" "$dir/server.crt"
        install -m 0600 "$tls_key" "$dir/server.key"
        if [[ $(id -u) == 0 ]]; then chown postgres: "$dir/server.crt" "$dir/server.key"; fi
        server_options+=" -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
    fi

    as_owner "$bin/initdb" --pgdata="$dir/data" --username="$PG_USER" --pwfile="$dir/password" \
        --auth=scram-sha-256 --encoding=UTF8 --no-locale >>"$dir/postgres.log" 2>&1 </dev/null ||
        die "initdb failed; see $dir/postgres.log"
    if [[ -n "$tls_cert" ]]; then
        # TCP logins over TLS only: a client that does not ask for TLS is refused.
        sed -i 's/^host\([[:space:]]\)/hostssl\1/' "$dir/data/pg_hba.conf"
    fi

    local attempt port started="" sslmode_for_start=prefer
    [[ -z "$tls_cert" ]] || sslmode_for_start=require
    for ((attempt = 0; attempt < PORT_ATTEMPTS; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        port_in_use "$port" && continue
        if as_owner "$bin/pg_ctl" --pgdata="$dir/data" --log="$dir/postgres.log" --wait \
            --timeout="$PG_CTL_TIMEOUT" \
            -o "-p $port -k $dir/socket $server_options" start >/dev/null 2>&1 </dev/null; then
            started=yes
            printf '%s' "-p $port -k $dir/socket $server_options" >"$dir/server.options"
            printf '%s' "$sslmode_for_start" >"$dir/sslmode"
            break
        fi
        # A port taken between the check and the bind: try another.
        grep -q "could not bind\|could not create any TCP/IP sockets\|Address already in use" \
            "$dir/postgres.log" || die "pg_ctl start failed; see $dir/postgres.log"
    done
    [[ -n "$started" ]] || die "no free port after $PORT_ATTEMPTS attempts; see $dir/postgres.log"

    wait_for_logins "$dir" "$bin" "$port" "$password" "$sslmode_for_start"

    if [[ -n "$watch_pid" ]]; then
        # Detached (own session, no inherited stdout) so the caller's pipe closes now.
        # shellcheck disable=SC2016 # $1..$3 are the inner shell's arguments
        setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"' \
            watcher "$watch_pid" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$dir" \
            </dev/null >/dev/null 2>&1 &
    fi

    echo "port=$port"
    echo "socket=$dir/socket"
    echo "bin=$bin"
}

stop() {
    local dir=$1
    [[ -d "$dir" ]] || return 0
    [[ -e "$dir/$MARKER" ]] || die "$dir was not made by $0 start; not removing it"
    local bin
    bin=$(find_bin)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_owner "$bin/pg_ctl" --pgdata="$dir/data" --mode=fast --wait --timeout="$PG_CTL_TIMEOUT" stop \
            >/dev/null 2>&1 </dev/null || true
    fi
    rm -rf "$dir"
}

# The application_name a standby streams under (what synchronous_standby_names names).
readonly STANDBY_NAME=hsmgw_standby

psql_as() {
    local bin=$1 port=$2 password=$3 sql=$4
    PGPASSWORD=$password PGSSLMODE=prefer "$bin/psql" -X -q -At -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres \
        -c "$sql" </dev/null
}

standby() {
    local primary=$1 dir=$2 watch_pid=$3 synchronous=$4 bin primary_port password
    [[ -e "$primary/$MARKER" ]] || die "$primary was not made by $0 start"
    [[ ! -e "$dir" ]] || [[ -z "$(ls -A "$dir")" ]] || die "$dir exists and is not empty"
    bin=$(find_bin)
    primary=$(cd "$primary" && pwd)
    primary_port=$(sed -n 's/^-p \([0-9]*\).*/\1/p' "$primary/server.options")
    password=$(cat "$primary/password")
    [[ $(cat "$primary/sslmode") == prefer ]] || die "a standby of a --tls cluster is not supported"

    mkdir -p "$dir/socket"
    chmod 0700 "$dir" "$dir/socket"
    dir=$(cd "$dir" && pwd)
    touch "$dir/$MARKER" "$dir/postgres.log"
    (umask 077 && printf '%s' "$password" >"$dir/password")
    printf 'prefer' >"$dir/sslmode"
    if [[ $(id -u) == 0 ]]; then chown -R postgres: "$dir"; fi
    as_owner env PGPASSWORD="$password" "$bin/pg_basebackup" --pgdata="$dir/data" --host=127.0.0.1 \
        --port="$primary_port" --username="$PG_USER" --wal-method=stream --checkpoint=fast --no-password \
        >>"$dir/postgres.log" 2>&1 </dev/null || die "pg_basebackup failed; see $dir/postgres.log"
    as_owner touch "$dir/data/standby.signal"
    # The password in primary_conninfo stays in the standby's private data directory.
    printf "primary_conninfo = 'host=127.0.0.1 port=%s user=%s password=%s application_name=%s'\n" \
        "$primary_port" "$PG_USER" "$password" "$STANDBY_NAME" | as_owner tee -a "$dir/data/postgresql.auto.conf" \
        >/dev/null

    local server_options attempt port started=""
    server_options=$(sed 's/^-p [0-9]* -k [^ ]* //' "$primary/server.options")
    for ((attempt = 0; attempt < PORT_ATTEMPTS; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        port_in_use "$port" && continue
        if as_owner "$bin/pg_ctl" --pgdata="$dir/data" --log="$dir/postgres.log" --wait \
            --timeout="$PG_CTL_TIMEOUT" \
            -o "-p $port -k $dir/socket $server_options" start >/dev/null 2>&1 </dev/null; then
            started=yes
            printf '%s' "-p $port -k $dir/socket $server_options" >"$dir/server.options"
            break
        fi
        grep -q "could not bind\|could not create any TCP/IP sockets\|Address already in use" \
            "$dir/postgres.log" || die "pg_ctl start failed; see $dir/postgres.log"
    done
    [[ -n "$started" ]] || die "no free port after $PORT_ATTEMPTS attempts; see $dir/postgres.log"
    wait_for_logins "$dir" "$bin" "$port" "$password" prefer

    local tries state
    if [[ -n "$synchronous" ]]; then
        psql_as "$bin" "$primary_port" "$password" \
            "ALTER SYSTEM SET synchronous_standby_names = '$STANDBY_NAME'" >/dev/null
        psql_as "$bin" "$primary_port" "$password" "SELECT pg_reload_conf()" >/dev/null
    fi
    for ((tries = 0; tries < 200; tries++)); do
        state=$(psql_as "$bin" "$primary_port" "$password" \
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME' AND state = 'streaming'" \
            2>/dev/null || true)
        if [[ -n "$state" && (-z "$synchronous" || "$state" == sync) ]]; then break; fi
        sleep 0.1
    done
    [[ -n "$state" && (-z "$synchronous" || "$state" == sync) ]] ||
        die "the standby on port $port does not stream${synchronous:+ synchronously}; see $dir/postgres.log"

    if [[ -n "$watch_pid" ]]; then
        # shellcheck disable=SC2016 # $1..$3 are the inner shell's arguments
        setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"' \
            watcher "$watch_pid" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" "$dir" \
            </dev/null >/dev/null 2>&1 &
    fi
    echo "port=$port"
    echo "socket=$dir/socket"
    echo "bin=$bin"
}

promote() {
    local dir=$1 bin port password tries
    [[ -e "$dir/$MARKER" && -e "$dir/data/standby.signal" ]] || die "$dir is not a standby made by $0 standby"
    bin=$(find_bin)
    as_owner "$bin/pg_ctl" --pgdata="$dir/data" --wait --timeout="$PG_CTL_TIMEOUT" promote >/dev/null 2>&1 </dev/null ||
        die "pg_ctl promote failed; see $dir/postgres.log"
    port=$(sed -n 's/^-p \([0-9]*\).*/\1/p' "$dir/server.options")
    password=$(cat "$dir/password")
    for ((tries = 0; tries < 100; tries++)); do
        [[ $(psql_as "$bin" "$port" "$password" "SELECT pg_is_in_recovery()" 2>/dev/null || true) == f ]] && return 0
        sleep 0.1
    done
    die "the server on port $port still does not accept writes; see $dir/postgres.log"
}

[[ $# -ge 2 ]] || usage
case "$1" in
start)
    dir=$2 watch="" cert="" key=""
    shift 2
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --watch-pid)
            [[ $# -ge 2 ]] || usage
            watch=$2
            shift 2
            ;;
        --tls)
            [[ $# -ge 3 ]] || usage
            cert=$2 key=$3
            shift 3
            ;;
        *) usage ;;
        esac
    done
    start "$dir" "$watch" "$cert" "$key"
    ;;
stop)
    [[ $# -eq 2 ]] || usage
    stop "$2"
    ;;
halt)
    [[ $# -eq 2 || $# -eq 3 ]] || usage
    halt "$2" "${3:-immediate}"
    ;;
resume)
    [[ $# -eq 2 ]] || usage
    resume "$2"
    ;;
standby)
    [[ $# -ge 3 ]] || usage
    primary=$2 dir=$3 watch="" synchronous=""
    shift 3
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --watch-pid)
            [[ $# -ge 2 ]] || usage
            watch=$2
            shift 2
            ;;
        --synchronous)
            synchronous=yes
            shift
            ;;
        *) usage ;;
        esac
    done
    standby "$primary" "$dir" "$watch" "$synchronous"
    ;;
promote)
    [[ $# -eq 2 ]] || usage
    promote "$2"
    ;;
*) usage ;;
esac

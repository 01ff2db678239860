#!/usr/bin/env bash
# Measures hsm-gateway the way it is deployed, with one command (`make bench-deployment`):
# release builds, the gateway as its own process with `--config`, TLS on 127.0.0.1, a SoftHSM2
# token of its own, and PostgreSQL (fsync and synchronous_commit on) or SQLite, driven by
# `hsm-bench load` from another process.
#
# For each store in STORES: a throwaway token (hsm-config/dev-token.sh), a throwaway CA and
# `localhost` certificate, a throwaway PostgreSQL cluster (scripts/throwaway-postgres.sh) or a
# SQLite file, a gateway configuration file, `hsm-gateway --config`, then one `hsm-bench load`
# run per mix in MIXES and concurrency in CONCURRENCY. Each run also records the CPU time used
# inside its measured window by the gateway and by the whole PostgreSQL cluster (every process
# of it, and those that exited meanwhile), read from /proc when `hsm-bench load --mark-window`
# says the window opens and closes, so the preload, the handshakes and the warm-up fall outside
# it; the load generator reports its own (`cpuSeconds` in its JSON). In the same run, two ceilings on the same machine: AES-GCM on a SoftHSM2 token
# (`hsm-bench gcm`, one thread, token-object key) and pgbench's durable one-row INSERT against
# the same cluster at 1 and 8 connections.
#
# Environment [default]:
#   STORES           stores to measure, postgres and/or sqlite ["postgres sqlite"]
#   MIXES            `hsm-bench load --mix` values, one run each ["generate=1 decrypt=1"]
#   CONCURRENCY      closed-loop workers, one run each ["1 4 16 64 256"]; an entry rN is an
#                    open-loop run at N requests a second instead (--rate N), e.g. "64 r10000"
#   MAX_OUTSTANDING  open-loop runs: the most calls in flight (--max-outstanding) [4096]
#   SEED_KEYS        PostgreSQL: synthetic data-key rows of another tenant inserted before the
#                    runs, so lookups walk an index of that size (issue 13 target 4) [0]
#   SAMPLE_SECONDS   every N s during each run, the gateway's RSS, open files, PostgreSQL
#                    connections and HSM sessions go to OUT/samples.tsv (0: none) [0]
#   DURATION         whole seconds measured per run [5]
#   WARMUP           whole seconds of unmeasured calls before each run [1]
#   PRELOAD          data keys made before each run whose mix needs them [1000]
#   CONNECTIONS      client connections of hsm-bench load [2]
#   GATEWAY_SET      extra gateway settings, space-separated key=value (`hsm-gateway --set`) [none]
#   GCM_SECONDS      seconds per figure of `hsm-bench gcm` [2]
#   PGBENCH_SECONDS  seconds per pgbench run [5]
#   SOFTHSM2_MODULE  the PKCS#11 module [/usr/lib/softhsm/libsofthsm2.so]
#   SKIP_BUILD       1: use the release binaries in .build/release as they are [build them]
#   OUT              where the results go [a new directory from mktemp, printed]
#
# Results: the Markdown tables on stdout; in OUT, load.jsonl (one line per run: the store, mix,
# concurrency, CPU seconds per process, and `load`, hsm-bench's own JSON), tables.md, the
# ceilings' raw output and each gateway's log. Everything else lives in a working directory
# that is removed on exit, after every process the script started is stopped, also on Ctrl-C
# and on failure.
set -euo pipefail

# Limits of the inputs: hsm-bench load's own where it has one, so a bad value fails here
# before anything is built or started.
readonly CONCURRENCY_MAX=4096
# hsm-bench load's own limits for --rate and --max-outstanding.
readonly RATE_MAX=1000000
readonly MAX_OUTSTANDING_MAX=100000
# Ten million rows take minutes to insert and gigabytes of disk: more is not a benchmark.
readonly SEED_KEYS_MAX=10000000
readonly SAMPLE_SECONDS_MAX=3600
readonly DURATION_MAX=3600
readonly WARMUP_MAX=600
readonly PRELOAD_MAX=100000
readonly CONNECTIONS_MAX=64
# hsm-bench gcm's own limit.
readonly GCM_SECONDS_MAX=600
# A ceiling needs seconds, not hours.
readonly PGBENCH_SECONDS_MAX=600
# pgbench connections: one, and the gateway's default pool (store.postgres.max_connections).
readonly PGBENCH_CLIENTS="1 8"
# How long the gateway may take to open the token and the store (a first start against
# PostgreSQL creates the schema) and report ready.
readonly READY_TIMEOUT_SECONDS=60
# How long the gateway may drain after SIGTERM before it is killed.
readonly STOP_TIMEOUT_SECONDS=30
# The lines `hsm-bench load --mark-window` prints on stderr (LoadBenchmark.windowOpenLine, …).
readonly WINDOW_OPEN="hsm-bench load: window open"
readonly WINDOW_CLOSED="hsm-bench load: window closed"

die() {
    echo "bench-deployment: $*" >&2
    exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$repo/.build/release

stores=${STORES:-postgres sqlite}
mixes=${MIXES:-generate=1 decrypt=1}
levels=${CONCURRENCY:-1 4 16 64 256}
duration=${DURATION:-5}
warmup=${WARMUP:-1}
preload=${PRELOAD:-1000}
connections=${CONNECTIONS:-2}
gcm_seconds=${GCM_SECONDS:-2}
pgbench_seconds=${PGBENCH_SECONDS:-5}
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
read -r -a gateway_settings <<<"${GATEWAY_SET:-}"

# NAME VALUE MIN MAX: VALUE must be a whole number in MIN..MAX.
check_range() {
    # 10#: a leading zero is not octal.
    if ! [[ $2 =~ ^[0-9]{1,9}$ ]] || ((10#$2 < $3 || 10#$2 > $4)); then
        die "$1 must be a whole number from $3 to $4, is '$2'"
    fi
}
max_outstanding=${MAX_OUTSTANDING:-4096}
seed_keys=${SEED_KEYS:-0}
sample_seconds=${SAMPLE_SECONDS:-0}
for level in $levels; do
    if [[ $level == r* ]]; then
        check_range "CONCURRENCY (rate)" "${level#r}" 1 "$RATE_MAX"
    else
        check_range CONCURRENCY "$level" 1 "$CONCURRENCY_MAX"
    fi
done
check_range MAX_OUTSTANDING "$max_outstanding" 1 "$MAX_OUTSTANDING_MAX"
check_range SEED_KEYS "$seed_keys" 0 "$SEED_KEYS_MAX"
check_range SAMPLE_SECONDS "$sample_seconds" 0 "$SAMPLE_SECONDS_MAX"
[[ -n ${levels// /} ]] || die "CONCURRENCY lists no level"
check_range DURATION "$duration" 1 "$DURATION_MAX"
check_range WARMUP "$warmup" 0 "$WARMUP_MAX"
check_range PRELOAD "$preload" 1 "$PRELOAD_MAX"
check_range CONNECTIONS "$connections" 1 "$CONNECTIONS_MAX"
check_range GCM_SECONDS "$gcm_seconds" 1 "$GCM_SECONDS_MAX"
check_range PGBENCH_SECONDS "$pgbench_seconds" 1 "$PGBENCH_SECONDS_MAX"
for store in $stores; do
    [[ $store == postgres || $store == sqlite ]] || die "STORES: '$store' is neither postgres nor sqlite"
done
[[ -n ${stores// /} ]] || die "STORES lists no store"
for mix in $mixes; do
    # hsm-bench checks the names and weights; this only keeps a typo from costing a whole build.
    [[ $mix =~ ^[a-z-]+(=[0-9]+)?(,[a-z-]+(=[0-9]+)?)*$ ]] || die "MIXES: '$mix' is not operation=weight,…"
done
for setting in "${gateway_settings[@]}"; do
    [[ $setting == *=* ]] || die "GATEWAY_SET: '$setting' is not key=value"
done
for tool in jq curl openssl pgrep softhsm2-util; do
    command -v "$tool" >/dev/null || die "$tool is missing (make deps installs it)"
done
[[ -r $module ]] || die "no PKCS#11 module at $module (SOFTHSM2_MODULE)"

if [[ ${SKIP_BUILD:-} != 1 ]]; then
    (cd "$repo" && swift build -c release --product hsm-gateway && swift build -c release --product hsm-bench)
fi
for program in hsm-gateway hsm-bench; do
    [[ -x $bin/$program ]] || die "$bin/$program is missing (run without SKIP_BUILD=1)"
done

if [[ -n ${OUT:-} ]]; then
    out=$OUT
    mkdir -p "$out"
else
    out=$(mktemp -d "${TMPDIR:-/tmp}/bench-deployment-results.XXXXXX")
fi
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-deployment.XXXXXX")
# The postgres user must reach the cluster's directory inside (throwaway-postgres.sh).
chmod 0711 "$work"
# hsm-bench gcm makes its throwaway token under TMPDIR: keep it in here too.
mkdir "$work/tmp"
export TMPDIR=$work/tmp

gateway_pid=""
load_pid=""
sampler_pid=""
metrics_port=""
clusters=()

stop_gateway() {
    [[ -n $gateway_pid ]] || return 0
    kill -TERM "$gateway_pid" 2>/dev/null || true
    local waited
    for ((waited = 0; waited < STOP_TIMEOUT_SECONDS * 10; waited++)); do
        kill -0 "$gateway_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $load_pid ]]; then
        kill -TERM "$load_pid" 2>/dev/null || true
        wait "$load_pid" 2>/dev/null || true
    fi
    stop_sampler
    stop_gateway
    local cluster
    for cluster in "${clusters[@]}"; do
        "$repo/scripts/throwaway-postgres.sh" stop "$cluster" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
    # A results directory of our own that nothing was written to is not worth keeping.
    if [[ -z ${OUT:-} ]]; then rmdir "$out" 2>/dev/null || true; fi
    exit "$status"
}
trap cleanup EXIT
# Ctrl-C: the gateway starts draining by itself, hsm-bench load (started in the background, so
# ignoring SIGINT) does not; this shell exits, and the EXIT trap stops them all.
trap 'exit 130' INT
trap 'exit 143' TERM

echo "bench-deployment: results in $out"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "cores: $(nproc), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "stores: $stores; mixes: $mixes; concurrency: $levels; duration ${duration} s, warm-up ${warmup} s;" \
        "preload $preload; connections $connections; gateway settings: ${GATEWAY_SET:-defaults}"
} | tee "$out/settings.txt"

# --- CPU time from /proc ------------------------------------------------------------------
# Read with builtins (one pgrep aside, no process per read), so a sample takes a millisecond or
# two of the window.

clock_ticks=$(getconf CLK_TCK)

# PID [children]: sets `ticks` to utime+stime of PID in clock ticks (fields 14 and 15 of
# /proc/PID/stat); with `children`, plus cutime+cstime (16, 17), the CPU of its children that
# have exited. 0 when the process is gone.
ticks_of() {
    local stat fields
    ticks=0
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 0
    # The fields after the command name, which is in parentheses and may hold spaces.
    read -r -a fields <<<"${stat##*) }"
    ticks=$((fields[11] + fields[12]))
    if [[ ${2:-} == children ]]; then
        ticks=$((ticks + fields[13] + fields[14]))
    fi
}

# Sets `sample` to "GATEWAY CLUSTER" ticks now. CLUSTER is the whole PostgreSQL cluster: the
# postmaster with its exited children, and every live child (backends, checkpointer, WAL
# writer, autovacuum); 0 without PostgreSQL. The load generator reports its own CPU time.
sample_ticks() {
    local gateway cluster=0 child children=()
    ticks_of "$gateway_pid"
    gateway=$ticks
    if [[ -n $postmaster_pid ]]; then
        # pgrep before reading: the child list changes as autovacuum workers come and go.
        mapfile -t children < <(pgrep -P "$postmaster_pid")
        ticks_of "$postmaster_pid" children
        cluster=$ticks
        for child in "${children[@]}"; do
            ticks_of "$child"
            cluster=$((cluster + ticks))
        done
    fi
    sample="$gateway $cluster"
}

# --- The pieces ---------------------------------------------------------------------------

# DIR: a CA and a certificate for localhost / 127.0.0.1 that it signed.
make_pki() {
    local dir=$1
    mkdir -p "$dir"
    (
        umask 077
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/ca.key" \
            -out "$dir/ca.crt" -days 2 -subj "/CN=bench-deployment CA" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/server.key" \
            -out "$dir/server.csr" -subj "/CN=localhost"
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
            -out "$dir/server.crt" -days 2 -extfile "$dir/server.ext"
    ) >/dev/null 2>&1 || die "openssl could not make the certificates"
}

# DIR: starts a throwaway cluster in DIR and makes the gateway's database; sets pg_port, pg_bin,
# pg_password_file, postmaster_pid.
start_postgres() {
    local dir=$1 output
    clusters+=("$dir")
    # --watch-pid: should this shell be killed outright, the cluster still goes.
    output=$("$repo/scripts/throwaway-postgres.sh" start "$dir" --watch-pid $$)
    pg_port=$(sed -n 's/^port=//p' <<<"$output")
    pg_bin=$(sed -n 's/^bin=//p' <<<"$output")
    pg_password_file=$dir/password
    postmaster_pid=$(head -n 1 "$dir/data/postmaster.pid")
    psql_at postgres -c 'CREATE DATABASE hsmgw' >/dev/null
    echo "postgres: $("$pg_bin/postgres" --version), fsync=$(psql_at postgres -c 'SHOW fsync')," \
        "synchronous_commit=$(psql_at postgres -c 'SHOW synchronous_commit')" | tee -a "$out/settings.txt"
}

# DATABASE ARGS…: psql as the cluster's superuser over TCP, unaligned, tuples only.
psql_at() {
    local database=$1
    shift
    PGPASSWORD=$(<"$pg_password_file") "$pg_bin/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$pg_port" -U hsmgw -d "$database" "$@" </dev/null
}

# pgbench's durable one-row INSERT at 1 and 8 connections, into a scratch table of the
# `postgres` database (not the gateway's); appends to ceilings.
pgbench_ceiling() {
    psql_at postgres -c 'CREATE TABLE bench_insert (id bigserial PRIMARY KEY, value bytea NOT NULL)'
    # 16 random bytes a row: about a wrapped data key's size.
    echo "INSERT INTO bench_insert (value) VALUES (decode(md5(random()::text), 'hex'));" >"$work/insert.sql"
    local clients threads tps
    for clients in $PGBENCH_CLIENTS; do
        threads=$((clients < $(nproc) ? clients : $(nproc)))
        PGPASSWORD=$(<"$pg_password_file") "$pg_bin/pgbench" -n -h 127.0.0.1 -p "$pg_port" -U hsmgw \
            -f "$work/insert.sql" -c "$clients" -j "$threads" -T "$pgbench_seconds" postgres \
            >"$out/pgbench-c$clients.txt" 2>&1 </dev/null || die "pgbench failed; see $out/pgbench-c$clients.txt"
        tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out/pgbench-c$clients.txt" | head -n 1)
        [[ -n $tps ]] || die "no tps in $out/pgbench-c$clients.txt"
        ceilings+=("| pgbench one-row INSERT, durable, $clients connection$( ((clients == 1)) || echo s) | $(printf '%.0f' "$tps") |")
    done
    psql_at postgres -c 'DROP TABLE bench_insert'
}

# STORE DIR: writes DIR/gateway.yaml for a gateway on DIR's token and store, TLS on
# 127.0.0.1, ports chosen by the system.
write_config() {
    local store=$1 dir=$2
    {
        echo "listen:"
        echo "  - 127.0.0.1:0"
        echo "metrics_listen: 127.0.0.1:0"
        echo "tls:"
        echo "  certificate: $work/pki/server.crt"
        echo "  private_key: $work/pki/server.key"
        echo "hsm:"
        echo "  module: $module"
        echo "  token_label: bench-$store"
        echo "  pin:"
        echo "    file: $dir/token/user.pin"
        echo "  softhsm2_conf: $dir/token/softhsm2.conf"
        echo "store:"
        echo "  kind: $store"
        if [[ $store == sqlite ]]; then
            echo "  sqlite:"
            echo "    path: $dir/gateway.sqlite"
        else
            echo "  postgres:"
            echo "    host: 127.0.0.1"
            echo "    port: $pg_port"
            echo "    user: hsmgw"
            echo "    database: hsmgw"
            echo "    password_file: $pg_password_file"
        fi
        echo "auth:"
        # Written on the first start against the empty database: hsm-bench load's API token.
        echo "  bootstrap_token_file: $dir/admin.token"
    } >"$dir/gateway.yaml"
}

# DIR: starts hsm-gateway --config DIR/gateway.yaml and waits until /readyz answers 200;
# sets gateway_pid and gateway_port.
start_gateway() {
    local dir=$1 settings=() setting serving="" waited
    for setting in "${gateway_settings[@]}"; do settings+=(--set "$setting"); done
    # Made here, so the loop below never reads it before the gateway has opened it.
    : >"$dir/gateway.log"
    "$bin/hsm-gateway" --config "$dir/gateway.yaml" "${settings[@]}" >"$dir/gateway.log" 2>&1 &
    gateway_pid=$!
    for ((waited = 0; waited < READY_TIMEOUT_SECONDS * 10; waited++)); do
        kill -0 "$gateway_pid" 2>/dev/null || die "hsm-gateway exited: $(tail -n 5 "$dir/gateway.log")"
        # With port 0 the gateway logs the ports it bound: `… listen=127.0.0.1:N metrics=127.0.0.1:M … serving`.
        serving=$(grep -m 1 ' serving$' "$dir/gateway.log" || true)
        if [[ -n $serving ]]; then
            gateway_port=$(sed -n 's/.* listen=127\.0\.0\.1:\([0-9]*\).*/\1/p' <<<"$serving")
            metrics_port=$(sed -n 's/.* metrics=127\.0\.0\.1:\([0-9]*\).*/\1/p' <<<"$serving")
            curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$metrics_port/readyz" 2>/dev/null && return 0
        fi
        sleep 0.1
    done
    die "hsm-gateway was not ready within $READY_TIMEOUT_SECONDS s; see $dir/gateway.log"
}

# STORE DIR MIX LEVEL: one hsm-bench load run, with the CPU time of each process in its
# measured window; appends a line to load.jsonl.
run_load() {
    local store=$1 dir=$2 mix=$3 level=$4 fifo=$work/marks line before="" after="" shape
    if [[ $level == r* ]]; then
        shape=(--rate "${level#r}" --max-outstanding "$max_outstanding")
    else
        shape=(--concurrency "$level")
    fi
    mkfifo "$fifo"
    "$bin/hsm-bench" load --target "127.0.0.1:$gateway_port" --tls --ca-file "$work/pki/ca.crt" \
        --server-name localhost --token-file "$dir/admin.token" --tenant bench --create-tenant \
        --mix "$mix" --preload "$preload" "${shape[@]}" --connections "$connections" \
        --warmup "$warmup" --duration "$duration" --json --mark-window >"$work/load.json" 2>"$fifo" &
    load_pid=$!
    start_sampler "$store" "$mix" "$level"
    while IFS= read -r line; do
        case $line in
        "$WINDOW_OPEN")
            sample_ticks
            before=$sample
            ;;
        "$WINDOW_CLOSED")
            sample_ticks
            after=$sample
            ;;
        *) printf '%s\n' "$line" >&2 ;;
        esac
    done <"$fifo"
    local status=0
    wait "$load_pid" || status=$?
    load_pid=""
    stop_sampler
    rm -f "$fifo"
    ((status == 0)) || die "hsm-bench load ($store, $mix, c=$level) exited with $status"
    [[ -n $before && -n $after ]] || die "hsm-bench load did not mark its window"
    local start end
    read -r -a start <<<"$before"
    read -r -a end <<<"$after"
    jq -c --arg store "$store" --arg mix "$mix" --arg concurrency "$level" --argjson hz "$clock_ticks" \
        --argjson gateway $((end[0] - start[0])) --argjson postgres $((end[1] - start[1])) \
        --argjson cluster "$([[ $store == postgres ]] && echo true || echo false)" \
        '{store: $store, mix: $mix, concurrency: $concurrency,
          cpuSeconds: {gateway: ($gateway / $hz), postgres: (if $cluster then $postgres / $hz else null end),
                       loadGenerator: .cpuSeconds},
          load: .}' "$work/load.json" >>"$out/load.jsonl"
    jq -r '"\(.store) \(.mix) c=\(.concurrency): \(.load.total.opsPerSecond) ops/s, \(.load.total.errorCount) errors"' \
        <<<"$(tail -n 1 "$out/load.jsonl")" >&2
}

# STORE MIX LEVEL: with SAMPLE_SECONDS, samples the gateway's resources in the background
# until stop_sampler: seconds since the run started, RSS in KiB, open file descriptors, TCP
# connections to PostgreSQL, and HSM sessions open (in use + idle, from /metrics).
start_sampler() {
    ((sample_seconds > 0)) || return 0
    local store=$1 mix=$2 level=$3
    [[ -s $out/samples.tsv ]] || echo -e "store\tmix\tlevel\tseconds\trss_kib\tfds\tpg_connections\thsm_sessions" >"$out/samples.tsv"
    (
        started=$SECONDS
        while kill -0 "$gateway_pid" 2>/dev/null; do
            rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$gateway_pid/status")
            fds=$(find "/proc/$gateway_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
            pg="-"
            [[ $store == postgres ]] && pg=$(ss -Htnp state established "( dport = :$pg_port )" | grep -c "pid=$gateway_pid," || true)
            sessions=$(curl -fsS --max-time 2 "http://127.0.0.1:$metrics_port/metrics" |
                awk '/^hsmgw_hsm_sessions_(in_use|idle) / { total += $2 } END { print total + 0 }')
            echo -e "$store\t$mix\t$level\t$((SECONDS - started))\t$rss\t$fds\t$pg\t$sessions" >>"$out/samples.tsv"
            sleep "$sample_seconds"
        done
    ) &
    sampler_pid=$!
}

stop_sampler() {
    [[ -n ${sampler_pid:-} ]] || return 0
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
}

# Inserts SEED_KEYS synthetic rows of a tenant of their own (random blobs: never decrypted, only
# there to make the table and its index that large), then ANALYZE and a CHECKPOINT (so the
# checkpointer does not write the seed out during the first run).
seed_postgres() {
    ((seed_keys > 0)) || return 0
    echo "seeding $seed_keys data keys" >&2
    local now
    now=$(($(date +%s) * 1000))
    psql_at hsmgw -c "INSERT INTO tenants (id, state, primary_version, created_at, updated_at)
        VALUES ('seeded', 'enabled', 1, $now, $now)" \
        -c "INSERT INTO master_key_versions (tenant_id, version, state, token_key_id, created_at, updated_at)
        VALUES ('seeded', 1, 'active', decode(md5(random()::text), 'hex'), $now, $now)" \
        -c "INSERT INTO data_keys (tenant_id, id, version, state, wrapped, context_hash, created_at, updated_at)
        SELECT 'seeded', gen_random_uuid(), 1, 'enabled', decode(repeat(md5(n::text), 3), 'hex'),
            sha256(n::text::bytea), $now, $now FROM generate_series(1, $seed_keys) AS n" \
        -c "ANALYZE" -c "CHECKPOINT" >/dev/null
}

# --- The run ------------------------------------------------------------------------------

ceilings=()
postmaster_pid=""

echo "ceiling: hsm-bench gcm --seconds $gcm_seconds" >&2
"$bin/hsm-bench" gcm --module "$module" --seconds "$gcm_seconds" >"$out/gcm.txt" 2>&1 || die "hsm-bench gcm failed; see $out/gcm.txt"
read -r gcm_encrypt gcm_decrypt < <(sed -n 's/^single thread, token-object master key: *encrypt \([0-9,]*\) *ops\/s *decrypt \([0-9,]*\) .*/\1 \2/p' "$out/gcm.txt") ||
    die "no single-thread token-object figures in $out/gcm.txt"
ceilings+=("| AES-256-GCM decrypt, 32 bytes, token-object key, one thread (hsm-bench gcm) | ${gcm_decrypt//,/} |")
ceilings+=("| AES-256-GCM encrypt, 32 bytes, token-object key, one thread (hsm-bench gcm) | ${gcm_encrypt//,/} |")

make_pki "$work/pki"
for store in $stores; do
    dir=$work/$store
    mkdir -p "$dir"
    DATA_DIR=$dir/token TOKEN_LABEL=bench-$store "$repo/hsm-config/dev-token.sh" >/dev/null
    postmaster_pid=""
    if [[ $store == postgres ]]; then
        start_postgres "$dir/pg"
        echo "ceiling: pgbench -T $pgbench_seconds" >&2
        pgbench_ceiling
    fi
    write_config "$store" "$dir"
    start_gateway "$dir"
    [[ $store == postgres ]] && seed_postgres
    for mix in $mixes; do
        for level in $levels; do
            run_load "$store" "$dir" "$mix" "$level"
        done
    done
    stop_gateway
    cp "$dir/gateway.log" "$out/gateway-$store.log"
    if [[ $store == postgres ]]; then
        "$repo/scripts/throwaway-postgres.sh" stop "$dir/pg"
        postmaster_pid=""
    fi
done

{
    echo
    echo "| store | mix | concurrency | ops/s | p50 ms | p99 ms | errors | CPU µs/call gateway | CPU µs/call PostgreSQL | CPU µs/call load generator |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    # CPU per call: the window's CPU seconds over every call started in it (failed ones too).
    jq -r 'def per_call($calls): if . == null or $calls == 0 then "-" else (. * 1e6 / $calls | round | tostring) end;
        def ms: if . == null then "-" else (. * 100 | round) / 100 | tostring end;
        (.load.total.count + .load.total.errorCount) as $calls
        | "| \(.store) | \(.mix) | \(.concurrency) | \(.load.total.opsPerSecond | round)"
        + " | \(.load.total.latencyMs.p50 | ms) | \(.load.total.latencyMs.p99 | ms) | \(.load.total.errorCount)"
        + " | \(.cpuSeconds.gateway | per_call($calls)) | \(.cpuSeconds.postgres | per_call($calls))"
        + " | \(.cpuSeconds.loadGenerator | per_call($calls)) |"' "$out/load.jsonl"
    echo
    echo "| ceiling, same machine, same run | ops/s |"
    echo "|---|---|"
    printf '%s\n' "${ceilings[@]}"
} | tee "$out/tables.md"
echo "bench-deployment: results in $out" >&2

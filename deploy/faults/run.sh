#!/usr/bin/env bash
# Ferry's cluster fault suite. For each scenario: a fresh local cluster (deploy/local/up.sh: Redis
# with AOF fsync always, 3 gateway nodes, HAProxy health-checking /readyz), the load generator
# driving traffic through HAProxy with reconnecting clients, one fault injected at a fixed point,
# then the verifier's verdict: every message answered `sent` delivered exactly once, in order.
# In the scenarios where Redis loses data (redis-amnesia, redis-aof-rollback, replica-promote,
# cluster-async-loss), a message answered `sent` before the incident may instead be reported lost
# to its recipient through `reset`; everything answered after it must be delivered.
#
#   deploy/faults/run.sh [scenario...]            (the standalone-Redis ones by default)
#   deploy/faults/run.sh --cluster [scenario...]  (on a Redis Cluster: deploy/faults/cluster.sh)
#   deploy/faults/run.sh --list                   (both sets)
#
# Exits non-zero if any scenario failed. Results (a JSON report per scenario, logs, the table) go
# to $FERRY_FAULTS_DIR (default /tmp/ferry-faults). See docs/RELIABILITY.md.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOCAL="$ROOT/deploy/local"

ALL_SCENARIOS=(kill-node rolling-restart pubsub-kill redis-restart redis-pause node-cut
    redis-amnesia redis-aof-rollback replica-promote)
# On a Redis Cluster of 3 primaries x 1 replica (deploy/local/up.sh --cluster).
ALL_CLUSTER_SCENARIOS=(cluster-primary-kill cluster-failover cluster-reshard cluster-pubsub-kill
    cluster-async-loss cluster-async-loss-acked)

log() { printf '%s faults: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    printf 'faults: error: %s\n' "$*" >&2
    exit 2
}

CLUSTER=0
case "${1:-}" in
-h | --help)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    echo "scenarios: ${ALL_SCENARIOS[*]}"
    echo "with --cluster: ${ALL_CLUSTER_SCENARIOS[*]}"
    exit 0
    ;;
--list)
    printf '%s\n' "${ALL_SCENARIOS[@]}" "${ALL_CLUSTER_SCENARIOS[@]}"
    exit 0
    ;;
--cluster)
    CLUSTER=1
    shift
    ;;
esac
SCENARIOS=("$@")
if ((CLUSTER)); then
    ((${#SCENARIOS[@]})) || SCENARIOS=("${ALL_CLUSTER_SCENARIOS[@]}")
    KNOWN=("${ALL_CLUSTER_SCENARIOS[@]}")
else
    ((${#SCENARIOS[@]})) || SCENARIOS=("${ALL_SCENARIOS[@]}")
    KNOWN=("${ALL_SCENARIOS[@]}")
fi
for s in "${SCENARIOS[@]}"; do
    if [[ " ${KNOWN[*]} " != *" $s "* ]]; then
        if ((CLUSTER == 0)) && [[ " ${ALL_CLUSTER_SCENARIOS[*]} " == *" $s "* ]]; then
            die "'$s' runs on a Redis Cluster: deploy/faults/run.sh --cluster $s"
        fi
        die "unknown scenario '$s' (known: ${KNOWN[*]})"
    fi
done

BIN_DIR=${FERRY_BIN_DIR:-$ROOT/target/debug}
OUT=${FERRY_FAULTS_DIR:-/tmp/ferry-faults}
PORT_BASE=${FERRY_FAULTS_PORT_BASE:-}   # default: the first of 27380, 27480, ... whose ports are free
CLIENTS=${FERRY_FAULTS_CLIENTS:-80}
RATE=${FERRY_FAULTS_RATE:-400}
DURATION=${FERRY_FAULTS_DURATION:-15}   # seconds of sending
DRAIN=${FERRY_FAULTS_DRAIN:-45}         # the verifier's longest wait after sending
FAULT_AT=${FERRY_FAULTS_AT:-3}          # seconds after every client connected
# In the scenarios where Redis loses data, a share of the users is offline from OFFLINE_AT to
# OFFLINE_AT + OFFLINE_FOR seconds after the start of sending: across the fault (at about 3 s) and
# the nodes' audit after it, so that what Redis lost of their inboxes is found by the audit, not
# by a live session.
OFFLINE_FRACTION=${FERRY_FAULTS_OFFLINE_FRACTION:-0.2}
OFFLINE_AT=${FERRY_FAULTS_OFFLINE_AT:-1}
OFFLINE_FOR=${FERRY_FAULTS_OFFLINE_FOR:-7}
REPLICA_LAG=${FERRY_FAULTS_REPLICA_LAG:-1.5} # replica-promote: seconds of writes the replica misses
NODES=3

# Ports (loopback), below Linux's ephemeral range: HAProxy PORT_BASE, stats +4, node i WebSocket
# +i, admin +10+i, Redis -1, the replica (replica-promote) +5; with --cluster, Redis node i (of 6)
# +19+i and its cluster bus +29+i. The TCP proxies take free ports of their own.
CLUSTER_REDIS_OFFSET=20
CLUSTER_BUS_OFFSET=10
CLUSTER_NODES=6
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports_free() {
    local p last=$(($1 + 10 + NODES))
    ((CLUSTER == 0)) || last=$(($1 + CLUSTER_REDIS_OFFSET + CLUSTER_BUS_OFFSET + CLUSTER_NODES - 1))
    for p in $(seq $(($1 - 1)) "$last"); do
        if port_busy "$p"; then return 1; fi
    done
}
if [[ -z "$PORT_BASE" ]]; then
    for b in $(seq 27380 100 28280); do
        if ports_free "$b"; then
            PORT_BASE=$b
            break
        fi
    done
    [[ -n "$PORT_BASE" ]] || die "no free port range in 27379..28315; set FERRY_FAULTS_PORT_BASE"
fi
LB_PORT=$PORT_BASE
STATS_PORT=$((PORT_BASE + 4))
WS_BASE=$PORT_BASE
ADMIN_BASE=$((PORT_BASE + 10))
REDIS_PORT=$((PORT_BASE - 1))
REPLICA_PORT=$((PORT_BASE + 5))
CLUSTER_BASE=$((PORT_BASE + CLUSTER_REDIS_OFFSET)) # redis-1's port; redis-i's is CLUSTER_BASE+i-1

GATEWAY="$BIN_DIR/ferry-gateway"
LOADTEST="$BIN_DIR/ferry-loadtest"

# --- prerequisites ------------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v timeout >/dev/null 2>&1 || missing+=(coreutils)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing missing packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" ||
            { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } ||
            die "could not install ${missing[*]}"
    else
        die "missing: ${missing[*]}. Install them with:
    sudo apt-get install -y --no-install-recommends ${missing[*]}"
    fi
fi
if [[ ! -x "$GATEWAY" || ! -x "$LOADTEST" ]]; then
    [[ "$BIN_DIR" == "$ROOT/target/debug" ]] || die "$GATEWAY or $LOADTEST is missing (FERRY_BIN_DIR=$BIN_DIR)"
    log "building the debug gateway and load generator"
    (cd "$ROOT" && cargo build -p ferry-gateway -p ferry-loadtest) || die "cargo build failed"
fi
HAS_WATCHDOG=0
if "$GATEWAY" --help 2>/dev/null | grep -q -- '--store-outage-grace'; then HAS_WATCHDOG=1; fi

mkdir -p "$OUT"
# A --cluster run keeps its own results and table, so that it does not overwrite the other's.
RESULTS="$OUT/results.jsonl" TABLE="$OUT/table.md"
((CLUSTER == 0)) || RESULTS="$OUT/cluster-results.jsonl" TABLE="$OUT/cluster-table.md"
: >"$RESULTS"

# --- what runs now, for the cleanup -------------------------------------------------------------
STATE=""        # the current scenario's cluster state dir (down.sh stops what it lists, by PID)
LOAD_PID=""     # the load generator (under timeout)
SAMPLER_PID=""  # the metrics sampler
PROXY_PID=""    # the fault-injecting TCP proxy (node-cut: gw-3's link; replica-promote: every node's)
LINK_PROXY_PID="" # replica-promote: the TCP proxy on the replica's link to the primary
REPLICA_PID=""  # replica-promote: the replica's redis-server
AOF_SAMPLER_PID="" # redis-aof-rollback: the sampler of the AOF's size
PAUSED_PID=""   # a SIGSTOPped redis-server, to SIGCONT
LOAD_ARGS=()    # the load generator's extra flags for this scenario

cluster_env() {
    export FERRY_LOCAL_DIR=$STATE FERRY_LOCAL_PROMETHEUS=0 FERRY_LOCAL_BIN_DIR=$BIN_DIR
    export FERRY_LOCAL_LB_PORT=$LB_PORT FERRY_LOCAL_STATS_PORT=$STATS_PORT
    export FERRY_LOCAL_WS_BASE=$WS_BASE FERRY_LOCAL_ADMIN_BASE=$ADMIN_BASE
    export FERRY_LOCAL_REDIS_PORT=$REDIS_PORT FERRY_LOCAL_DRAIN_TIMEOUT=2s
    export FERRY_LOCAL_DEADLINE=60 FERRY_LOCAL_STOP_TIMEOUT=10
    if ((CLUSTER)); then
        export FERRY_LOCAL_REDIS_PORT=$CLUSTER_BASE FERRY_LOCAL_REDIS_BUS_OFFSET=$CLUSTER_BUS_OFFSET
    fi
}

stop_pid() { # PID: SIGTERM, then SIGKILL after 5 s; only processes this script started
    local pid=$1 i
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

teardown() {
    if [[ -n "$PAUSED_PID" ]]; then kill -CONT "$PAUSED_PID" 2>/dev/null || true; fi
    PAUSED_PID=""
    stop_pid "$LOAD_PID"
    LOAD_PID=""
    stop_pid "$SAMPLER_PID"
    SAMPLER_PID=""
    if [[ -n "$STATE" && -d "$STATE/pids" ]]; then
        "$LOCAL/down.sh" >>"$STATE/down.log" 2>&1 || log "down.sh reported a problem; see $STATE/down.log"
    fi
    stop_pid "$PROXY_PID"
    PROXY_PID=""
    stop_pid "$LINK_PROXY_PID"
    LINK_PROXY_PID=""
    stop_pid "$REPLICA_PID"
    REPLICA_PID=""
    stop_pid "$AOF_SAMPLER_PID"
    AOF_SAMPLER_PID=""
}
on_exit() {
    local rc=$?
    teardown
    exit "$rc"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- helpers -------------------------------------------------------------------------------------
CHECKS=()   # this scenario's checks: "ok|FAIL what"
NOTES=()    # this scenario's facts: "key=value"
check() { # OK(0/1) WHAT
    if [[ $1 == 0 ]]; then CHECKS+=("ok   $2"); else CHECKS+=("FAIL $2"); fi
}
note() { NOTES+=("$1"); }

pid_of() { # NAME: the PID up.sh recorded
    local pid=""
    [[ -e "$STATE/pids/$1.pid" ]] && read -r pid _ <"$STATE/pids/$1.pid"
    echo "$pid"
}
admin() { echo "http://127.0.0.1:$((ADMIN_BASE + $1))"; }
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" 2>/dev/null; }

# haproxy_status NODE: UP, DOWN, "UP 1/2", ... from the stats CSV (field 18).
haproxy_status() {
    curl -s --max-time 1 "http://127.0.0.1:$STATS_PORT/;csv" 2>/dev/null |
        awk -F, -v n="$1" '$1 == "gateways" && $2 == n { print $18 }'
}

# wait_until SECONDS CMD...: poll CMD every 0.1 s; fail after SECONDS. Prints the time it took.
wait_until() {
    local limit=$1 start=$EPOCHREALTIME
    shift
    local end
    end=$(awk -v s="$start" -v l="$limit" 'BEGIN { printf "%.3f", s + l }')
    until "$@" >/dev/null 2>&1; do
        if awk -v now="$EPOCHREALTIME" -v e="$end" 'BEGIN { exit !(now >= e) }'; then
            return 1
        fi
        sleep 0.1
    done
    awk -v s="$start" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - s }'
}

# sample NODE: append one metrics sample of node NODE to $SAMPLES:
# time node pid delivered connections_open sends_unavailable sends_duplicate pubsub_reconnects
# epochs_replaced (all reasons) and by reason: head_behind seq_reused resume_beyond_head
# append_lost meta_lost; store_audits store_lost_appends; live_resyncs live_topology_changes
# live_lost_subscriptions. judge.py reads the columns in this order.
sample() {
    local i=$1 pid
    pid=$(pid_of "gw-$i")
    [[ -n "$pid" ]] || return 0
    curl -s --max-time 1 "$(admin "$i")/metrics" 2>/dev/null | awk -v n="gw-$i" -v pid="$pid" \
        -v t="$EPOCHREALTIME" '
        /^ferry_messages_delivered_total/ { d += $2 }
        /^ferry_connections_open / { c = $2 }
        /^ferry_sends_total\{outcome="unavailable"\}/ { u = $2 }
        /^ferry_sends_total\{outcome="duplicate"\}/ { dup = $2 }
        /^ferry_pubsub_reconnects_total/ { p += $2 }
        /^ferry_epochs_replaced_total\{/ {
            e += $2
            if (match($0, /reason="[a-z_]+"/)) r[substr($0, RSTART + 8, RLENGTH - 9)] += $2
        }
        /^ferry_store_audits_total/ { a = $2 }
        /^ferry_store_lost_appends_total/ { l = $2 }
        /^ferry_live_resyncs_total/ { rs = $2 }
        /^ferry_live_topology_changes_total/ { tc = $2 }
        /^ferry_live_lost_subscriptions_total/ { ls = $2 }
        END {
            if (NR > 0) printf "%s %s %s %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d\n", t, n,
                pid, d, c, u, dup, p, e, r["head_behind"], r["seq_reused"], r["resume_beyond_head"],
                r["append_lost"], r["meta_lost"], a, l, rs, tc, ls
        }' >>"$SAMPLES" || true
}
sample_all() {
    local i
    for i in $(seq 1 "$NODES"); do sample "$i"; done
}
start_sampler() {
    (
        trap 'exit 0' TERM
        while :; do
            sample_all
            sleep 0.25
        done
    ) &
    SAMPLER_PID=$!
}
# snapshot LABEL: every node's /metrics into $STATE/metrics/gw-I.LABEL.txt, and on a cluster what
# each Redis node says of the cluster and of its replication into $STATE/redis.LABEL.txt: the
# evidence to compare before the fault and after the run.
snapshot() {
    local i
    mkdir -p "$STATE/metrics"
    for i in $(seq 1 "$NODES"); do
        curl -s --max-time 1 "$(admin "$i")/metrics" >"$STATE/metrics/gw-$i.$1.txt" 2>/dev/null
    done
    if ((CLUSTER)); then cluster_snapshot >"$STATE/redis.$1.txt"; fi
}
# metric_sum NAME: NAME (all its series) summed over the nodes that answer.
metric_sum() {
    local i
    for i in $(seq 1 "$NODES"); do
        curl -s --max-time 1 "$(admin "$i")/metrics" 2>/dev/null
    done | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
# connections NODE: connections open on NODE now (empty if it does not answer).
connections() {
    curl -s --max-time 1 "$(admin "$1")/metrics" 2>/dev/null |
        awk '/^ferry_connections_open / { print $2 }'
}
all_connected() {
    local i total=0 c
    for i in $(seq 1 "$NODES"); do
        c=$(connections "$i")
        total=$((total + ${c:-0}))
    done
    ((total >= CLIENTS))
}

# --- the faults ----------------------------------------------------------------------------------
# Each runs while the load generator sends, and records what it did and saw with note / check.

fault_kill-node() {
    local pid took
    pid=$(pid_of gw-2)
    sample 2 # its deliveries up to the kill
    kill -KILL "$pid"
    log "SIGKILL gw-2 (PID $pid)"
    took=$(wait_until 10 node_status_is gw-2 DOWN)
    check $? "HAProxy marks the killed gw-2 DOWN (${took:-—} s)"
    # Its clients reconnect through HAProxy to gw-1 and gw-3 (checked by the report's resumes).
    sleep 2
    "$LOCAL/up.sh" --restart gw-2 >>"$STATE/restart.log" 2>&1
    check $? "gw-2 restarted on the same ports, /readyz 200"
}
# node_status_is NODE STATUS: HAProxy's status of NODE is exactly STATUS (not "UP 1/2" etc.).
node_status_is() { [[ "$(haproxy_status "$1")" == "$2" ]]; }

fault_rolling-restart() {
    local i pid took code drained
    for i in $(seq 1 "$NODES"); do
        pid=$(pid_of "gw-$i")
        kill -TERM "$pid"
        log "SIGTERM gw-$i (PID $pid)"
        # Readiness fails at once (503 while draining, or nothing once the listener closed).
        took=$(wait_until 2 not_ready "$i")
        check $? "gw-$i /readyz fails as soon as it drains (${took:-—} s)"
        took=$(wait_until 10 node_status_is "gw-$i" DOWN)
        check $? "HAProxy marks draining gw-$i DOWN (${took:-—} s)"
        # Its admin listener outlives the drain: sample its deliveries until it exits.
        drained=$(wait_until 15 sampled_until_gone "$i" "$pid")
        check $? "gw-$i drains and exits within 15 s (${drained:-—} s)"
        "$LOCAL/up.sh" --restart "gw-$i" >>"$STATE/restart.log" 2>&1
        check $? "gw-$i restarted, /readyz 200"
        took=$(wait_until 15 node_status_is "gw-$i" UP)
        check $? "HAProxy marks gw-$i UP again (${took:-—} s)"
    done
}
not_alive() { ! kill -0 "$1" 2>/dev/null; }
sampled_until_gone() { # NODE PID
    not_alive "$2" && return 0
    sample "$1"
    return 1
}

fault_pubsub-kill() {
    local n total=0 first=""
    for _ in 1 2 3 4 5; do
        n=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" CLIENT KILL TYPE pubsub 2>&1)
        log "CLIENT KILL TYPE pubsub: $n"
        [[ "$n" =~ ^[0-9]+$ ]] || n=0
        [[ -n "$first" ]] || first=$n
        total=$((total + n))
        sleep 1
    done
    note "pubsub_killed=$total"
    ((first >= NODES))
    check $? "the first CLIENT KILL cut every node's pub/sub connection ($first of $NODES)"
}

fault_redis-restart() {
    local pid took
    pid=$(pid_of redis)
    kill -KILL "$pid"
    log "SIGKILL redis-server (PID $pid)"
    local t_kill=$EPOCHREALTIME
    wait_until 5 not_alive "$pid" >/dev/null
    sleep 1
    "$LOCAL/up.sh" --restart redis >>"$STATE/restart.log" 2>&1
    local ok=$?
    took=$(awk -v s="$t_kill" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - s }')
    check $ok "Redis restarted on the same port and dir, loaded its AOF, answers PING (down ${took} s)"
    note "redis_down_secs=$took"
}

fault_redis-pause() {
    local pid
    pid=$(pid_of redis)
    kill -STOP "$pid"
    PAUSED_PID=$pid
    log "SIGSTOP redis-server (PID $pid) for 4 s"
    sleep 4
    kill -CONT "$pid"
    PAUSED_PID=""
    log "SIGCONT redis-server"
    note "redis_unreachable_secs=4"
}

fault_node-cut() {
    local took i code
    kill -USR1 "$PROXY_PID"
    log "cut gw-3 from Redis (SIGUSR1 to the proxy, PID $PROXY_PID)"
    took=$(wait_until 15 not_ready 3)
    check $? "gw-3 /readyz fails (${took:-—} s)"
    took=$(wait_until 15 node_status_is gw-3 DOWN)
    check $? "HAProxy marks gw-3 DOWN (${took:-—} s)"
    if ((HAS_WATCHDOG == 0)); then
        check 1 "the gateway has --store-outage-grace (the store-outage watchdog)"
    fi
    took=$(wait_until 20 no_connections 3)
    check $? "gw-3's clients move to the other nodes: its connections reach 0 (${took:-—} s)"
    for i in 1 2; do
        code=$(http_code "$(admin "$i")/readyz")
        [[ "$code" == 200 && "$(haproxy_status "gw-$i")" == UP* ]]
        check $? "gw-$i stays ready and UP"
    done
    # Restored after the load run, in restore_node-cut.
}
not_ready() { [[ "$(http_code "$(admin "$1")/readyz")" != 200 ]]; }
no_connections() { [[ "$(connections "$1")" == 0 ]]; }

setup_node-cut() {
    rm -f "$STATE/proxy.port"
    python3 "$HERE/tcp_proxy.py" --port-file "$STATE/proxy.port" \
        --target "127.0.0.1:$REDIS_PORT" >"$STATE/proxy.log" 2>&1 </dev/null &
    PROXY_PID=$!
    wait_until 10 test -s "$STATE/proxy.port" >/dev/null || die "the TCP proxy did not start; see $STATE/proxy.log"
    local port
    port=$(<"$STATE/proxy.port")
    export FERRY_LOCAL_REDIS_URL_3="redis://127.0.0.1:$port"
    log "gw-3 reaches Redis through the proxy at $FERRY_LOCAL_REDIS_URL_3"
    if ((HAS_WATCHDOG)); then
        export FERRY_LOCAL_GATEWAY_ARGS="--store-outage-grace ${FERRY_FAULTS_OUTAGE_GRACE:-2s}"
    fi
}
restore_node-cut() {
    local took
    kill -USR2 "$PROXY_PID"
    log "restored gw-3's link to Redis (SIGUSR2)"
    took=$(wait_until 20 node_status_is gw-3 UP)
    check $? "after the link returns, gw-3 is ready and UP again (${took:-—} s)"
}

# --- the faults where Redis loses data ------------------------------------------------------------
# Each ends with incident_over: the instant Redis (or its replacement) serves the nodes again. The
# judge requires every message answered `sent` after it delivered; a message answered before it
# may instead be reported lost to its recipient through `reset`.

to_ms() { local t=${1/./}; echo $((t / 1000)); } # an $EPOCHREALTIME in Unix ms
now_ms() { to_ms "$EPOCHREALTIME"; }
incident_over() {
    note "incident_end_unix_ms=$(now_ms)"
    log "incident over: Redis serves the nodes again"
}
# Offline users across the incident (see OFFLINE_* at the top); data_loss_load: and reported
# losses allowed.
offline_load() {
    LOAD_ARGS=(--offline-fraction "$OFFLINE_FRACTION" --offline-at "${OFFLINE_AT}s"
        --offline-for "${OFFLINE_FOR}s")
}
data_loss_load() {
    offline_load
    LOAD_ARGS=(--allow-reported-loss "${LOAD_ARGS[@]}")
}
redis_cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>&1 | tr -d '\r'; }
# info_field PORT SECTION FIELD: one field of INFO.
info_field() { redis_cli "$1" INFO "$2" | awk -F: -v f="$3" '$1 == f { print $2 }'; }
# restart_redis T_KILL: up.sh --restart redis; checks it and notes the time Redis was down.
restart_redis() {
    local ok took
    "$LOCAL/up.sh" --restart redis >>"$STATE/restart.log" 2>&1
    ok=$?
    took=$(awk -v s="$1" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - s }')
    check $ok "Redis restarted on the same port and dir, answers PING (down ${took} s)"
    note "redis_down_secs=$took"
}

setup_redis-amnesia() { data_loss_load; }
fault_redis-amnesia() {
    local pid t_kill keys
    keys=$(redis_cli "$REDIS_PORT" DBSIZE)
    pid=$(pid_of redis)
    kill -KILL "$pid"
    t_kill=$EPOCHREALTIME
    log "SIGKILL redis-server (PID $pid, $keys keys); deleting its data before the restart"
    wait_until 5 not_alive "$pid" >/dev/null
    # No persistence: the AOF (and any RDB) goes, the directory stays for the restart.
    rm -rf "${STATE:?}/redis/appendonlydir" "$STATE"/redis/*.rdb
    [[ -z "$(ls -A "$STATE/redis")" ]]
    check $? "Redis's data dir is empty before the restart (it held $keys keys)"
    sleep 1
    restart_redis "$t_kill"
    incident_over
    # The restart found no AOF to load: Redis created a fresh one (once at start, once now).
    (($(grep -c 'Creating AOF base file' "$STATE/logs/redis.log") >= 2))
    check $? "Redis restarted empty (its log: a new AOF base file, nothing loaded)"
}

# The AOF's incr file (Redis 7 multi-part AOF: the manifest names it): "NAME SIZE".
aof_incr() {
    local dir="$STATE/redis/appendonlydir" name
    name=$(awk '$NF == "i" && $1 == "file" { n = $2 } END { print n }' "$dir"/*.manifest 2>/dev/null)
    [[ -n "$name" && -e "$dir/$name" ]] || return 1
    echo "$name $(stat -c %s "$dir/$name")"
}
setup_redis-aof-rollback() {
    data_loss_load
    export FERRY_LOCAL_REDIS_APPENDFSYNC=everysec
}
prepare_redis-aof-rollback() {
    # Every 0.1 s, the incr file's size: at the fault the file is cut back to what it was about
    # a second before (see fault_redis-aof-rollback).
    (
        trap 'exit 0' TERM
        while :; do
            if line=$(aof_incr); then echo "$EPOCHREALTIME $line"; fi
            sleep 0.1
        done
    ) >"$STATE/aof-sizes.txt" &
    AOF_SAMPLER_PID=$!
}
# Simulates a machine crash (power loss, kernel panic) under `appendfsync everysec`: Redis has
# write()n every acknowledged command to the AOF, but the kernel's page cache holds the last
# second or so, not yet fsynced, and a machine crash loses it. SIGKILL of redis-server alone
# would lose nothing (the page cache survives a process), so the fault kills Redis and then cuts
# the AOF's incr file back to the size it had about 1 s earlier, at a page boundary (what the
# disk held at the last fsync), usually in the middle of a command; Redis loads the file up to
# the last whole command (`aof-load-truncated yes`, the default) and answers as if the last
# second never happened, under the same inbox epochs.
fault_redis-aof-rollback() {
    local pid t_kill t_size name size kept now_name now_size cut
    pid=$(pid_of redis)
    kill -KILL "$pid"
    t_kill=$EPOCHREALTIME
    log "SIGKILL redis-server (PID $pid); its AOF loses the last second, as in a machine crash"
    wait_until 5 not_alive "$pid" >/dev/null
    stop_pid "$AOF_SAMPLER_PID"
    AOF_SAMPLER_PID=""
    read -r t_size name size < <(awk -v t="$t_kill" '$1 <= t - 1.0 { a = $1; n = $2; s = $3 }
        END { print a, n, s }' "$STATE/aof-sizes.txt")
    read -r now_name now_size < <(aof_incr)
    if [[ -n "$name" && "$name" == "$now_name" ]] && ((size < now_size)); then
        kept=$((size / 4096 * 4096))
        truncate -s "$kept" "$STATE/redis/appendonlydir/$name"
        cut=$((now_size - kept))
        log "cut $name from $now_size to $kept bytes ($cut bytes, about the last second)"
        note "aof_bytes_cut=$cut"
        # Redis writes a command to the AOF before it answers: what it answered before t_size is
        # in the part kept, and must not be lost.
        note "loss_from_unix_ms=$(to_ms "$t_size")"
        check 0 "the AOF lost about its last second: $cut of $now_size bytes cut from $name"
    else
        check 1 "the AOF lost about its last second (incr file then: ${name:-?} ${size:-?} B; at the kill: ${now_name:-?} ${now_size:-?} B)"
    fi
    sleep 1
    restart_redis "$t_kill"
    incident_over
    if grep -q 'loaded anyway because aof-load-truncated is enabled' "$STATE/logs/redis.log"; then
        note "aof_cut_mid_command=1"
        log "Redis dropped the command cut in the middle and loaded the rest (aof-load-truncated)"
    else
        note "aof_cut_mid_command=0"
    fi
}

# replica-promote: the nodes reach Redis through a TCP proxy (all three), and a replica follows the
# primary through a second proxy. The fault cuts the replica's link, lets the nodes write to the
# primary for REPLICA_LAG seconds more, then fails over: the primary becomes unreachable (the
# nodes' proxy resets every connection and refuses new ones), the replica is promoted with
# REPLICAOF NO ONE, and the proxy forwards to it. Whatever the primary took after the link was
# cut is gone.
# start_proxy NAME TARGET_PORT: starts tcp_proxy.py (its PID in STARTED_PID) and waits for its
# port, in $STATE/NAME.port; its target can be switched through $STATE/NAME.target.
start_proxy() {
    rm -f "$STATE/$1.port"
    python3 "$HERE/tcp_proxy.py" --port-file "$STATE/$1.port" --target "127.0.0.1:$2" \
        --target-file "$STATE/$1.target" >"$STATE/$1.log" 2>&1 </dev/null &
    STARTED_PID=$!
    wait_until 10 test -s "$STATE/$1.port" >/dev/null || die "the TCP proxy $1 did not start; see $STATE/$1.log"
}
setup_replica-promote() {
    local i
    data_loss_load
    start_proxy store-proxy "$REDIS_PORT"
    PROXY_PID=$STARTED_PID
    for i in $(seq 1 "$NODES"); do
        export "FERRY_LOCAL_REDIS_URL_$i=redis://127.0.0.1:$(<"$STATE/store-proxy.port")"
    done
    log "the nodes reach Redis through the proxy at 127.0.0.1:$(<"$STATE/store-proxy.port")"
}
replica_synced() {
    [[ "$(info_field "$REPLICA_PORT" replication master_link_status)" == up &&
        "$(info_field "$REPLICA_PORT" replication master_sync_in_progress)" == 0 ]]
}
prepare_replica-promote() {
    # The primary streams its snapshot to the replica at once instead of waiting 5 s for others.
    redis_cli "$REDIS_PORT" CONFIG SET repl-diskless-sync-delay 0 >/dev/null
    start_proxy link-proxy "$REDIS_PORT"
    LINK_PROXY_PID=$STARTED_PID
    mkdir -p "$STATE/replica"
    redis-server --bind 127.0.0.1 --port "$REPLICA_PORT" --dir "$STATE/replica" \
        --appendonly no --save '' --daemonize no --protected-mode yes \
        --replicaof 127.0.0.1 "$(<"$STATE/link-proxy.port")" >"$STATE/logs/replica.log" 2>&1 </dev/null &
    REPLICA_PID=$!
    local took
    took=$(wait_until 20 replica_synced)
    check $? "a replica on 127.0.0.1:$REPLICA_PORT follows the primary (synced in ${took:-—} s)"
}
fault_replica-promote() {
    local took primary replica role
    # The replica has what the primary did before this: that must not be lost.
    note "loss_from_unix_ms=$(now_ms)"
    kill -USR1 "$LINK_PROXY_PID"
    log "cut the replica's link to the primary; the nodes write to the primary for ${REPLICA_LAG} s more"
    took=$(wait_until 10 replica_link_down)
    check $? "the replica lost its link to the primary (${took:-—} s)"
    sleep "$REPLICA_LAG"
    kill -USR1 "$PROXY_PID"
    log "the primary is unreachable for the nodes (proxy cut); promoting the replica"
    primary=$(info_field "$REDIS_PORT" replication master_repl_offset)
    replica=$(info_field "$REPLICA_PORT" replication master_repl_offset)
    note "replica_lag_bytes=$((primary - replica))"
    ((primary > replica))
    check $? "the replica lags the primary by $((primary - replica)) bytes of replication stream"
    [[ "$(redis_cli "$REPLICA_PORT" REPLICAOF NO ONE)" == OK ]]
    check $? "REPLICAOF NO ONE on the replica"
    role=$(info_field "$REPLICA_PORT" replication role)
    [[ "$role" == master ]]
    check $? "the replica is now a primary (role: $role)"
    echo "127.0.0.1:$REPLICA_PORT" >"$STATE/store-proxy.target"
    sleep 0.5 # anything the old primary answered before the cut is handled by now
    kill -USR2 "$PROXY_PID"
    incident_over
    took=$(wait_until 15 all_ready)
    check $? "every node is ready again on the promoted replica (${took:-—} s)"
}
replica_link_down() { [[ "$(info_field "$REPLICA_PORT" replication master_link_status)" == down ]]; }
all_ready() {
    local i
    for i in $(seq 1 "$NODES"); do
        [[ "$(http_code "$(admin "$i")/readyz")" == 200 ]] || return 1
    done
}

# --- the faults on a Redis Cluster (run.sh --cluster) ---------------------------------------------
# shellcheck source=deploy/local/redis-cluster.sh
. "$LOCAL/redis-cluster.sh"
# shellcheck source=deploy/faults/cluster.sh
. "$HERE/cluster.sh"

# --- one scenario --------------------------------------------------------------------------------
# What a scenario's setup may have set for up.sh, cleared before and after each scenario.
unset_cluster_overrides() {
    local i
    unset FERRY_LOCAL_GATEWAY_ARGS FERRY_LOCAL_REDIS_APPENDFSYNC
    for i in $(seq 1 "$NODES"); do unset "FERRY_LOCAL_REDIS_URL_$i"; done
}
run_scenario() {
    local name=$1 t_start=$SECONDS rc limit up_args=("$NODES")
    STATE="$OUT/$name"
    SAMPLES="$STATE/samples.txt"
    RUN_ID="$name-$$" # the users are lt-$RUN_ID-0 .. lt-$RUN_ID-(CLIENTS-1)
    CHECKS=() NOTES=() LOAD_ARGS=()
    rm -rf "$STATE"
    mkdir -p "$STATE"
    cluster_env
    unset_cluster_overrides
    if ((CLUSTER)); then
        up_args=(--cluster "$NODES")
        log "=== $name: starting a 3-node cluster on a Redis Cluster (3 primaries x 1 replica) in $STATE"
    else
        log "=== $name: starting a 3-node cluster in $STATE"
    fi
    if declare -F "setup_$name" >/dev/null; then "setup_$name"; fi
    if ! "$LOCAL/up.sh" "${up_args[@]}" >"$STATE/up.log" 2>&1; then
        check 1 "the cluster starts (see $STATE/up.log)"
        finish_scenario "$name" "$t_start" 99
        return
    fi
    if declare -F "prepare_$name" >/dev/null; then "prepare_$name"; fi
    : >"$SAMPLES"
    start_sampler
    limit=$((DURATION + DRAIN + 90))
    FERRY_JWT_SECRET=$(<"$STATE/jwt-secret") timeout -k 10 "$limit" "$LOADTEST" --json run \
        --url "ws://127.0.0.1:$LB_PORT/v1/ws" --run-id "$RUN_ID" \
        -c "$CLIENTS" -r "$RATE" -d "${DURATION}s" --drain "${DRAIN}s" -b 64 \
        ${LOAD_ARGS[@]+"${LOAD_ARGS[@]}"} >"$STATE/report.json" 2>"$STATE/loadtest.log" </dev/null &
    LOAD_PID=$!
    log "load: $CLIENTS clients, $RATE msg/s for ${DURATION}s through HAProxy (PID $LOAD_PID)"
    if wait_until 30 all_connected >/dev/null; then
        sleep "$FAULT_AT"
        if kill -0 "$LOAD_PID" 2>/dev/null; then
            snapshot before
            # The machine's load at the fault: figures from a busy machine are not comparable.
            note "load_avg=$(cut -d' ' -f1-3 /proc/loadavg)"
            "fault_$name"
        else
            check 1 "the load generator is running when the fault comes"
        fi
    else
        check 1 "all $CLIENTS clients connected within 30 s"
    fi
    wait "$LOAD_PID"
    rc=$?
    LOAD_PID=""
    if declare -F "restore_$name" >/dev/null; then "restore_$name"; fi
    stop_pid "$SAMPLER_PID"
    SAMPLER_PID=""
    sample_all
    snapshot after
    finish_scenario "$name" "$t_start" "$rc"
}

# finish_scenario NAME T_START LOADTEST_RC: stop the cluster, judge, record the result.
finish_scenario() {
    local name=$1 t_start=$2 rc=$3 c
    teardown
    unset_cluster_overrides
    printf '%s\n' "${CHECKS[@]+"${CHECKS[@]}"}" >"$STATE/checks.txt"
    printf '%s\n' "${NOTES[@]+"${NOTES[@]}"}" >"$STATE/notes.txt"
    python3 "$HERE/judge.py" scenario --name "$name" --dir "$STATE" --loadtest-rc "$rc" \
        --secs $((SECONDS - t_start)) >>"$RESULTS"
    python3 "$HERE/judge.py" show --line "$(tail -n 1 "$RESULTS")"
    STATE=""
}

last_port=$((PORT_BASE + 10 + NODES))
((CLUSTER == 0)) || last_port=$((CLUSTER_BASE + CLUSTER_BUS_OFFSET + CLUSTER_NODES - 1))
log "Ferry fault suite: ${SCENARIOS[*]} (binaries: $BIN_DIR; results: $OUT; ports $((PORT_BASE - 1))..$last_port)"
if ((HAS_WATCHDOG == 0)); then
    log "NOTE: $GATEWAY has no --store-outage-grace: node-cut cannot pass (its clients never move)"
fi
t0=$SECONDS
for s in "${SCENARIOS[@]}"; do run_scenario "$s"; done
python3 "$HERE/judge.py" table --results "$RESULTS" --secs $((SECONDS - t0)) | tee "$TABLE"
python3 "$HERE/judge.py" verdict --results "$RESULTS"

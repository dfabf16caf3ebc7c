#!/usr/bin/env bash
# Ferry's cluster fault suite. For each scenario: a fresh local cluster (deploy/local/up.sh: Redis
# with AOF fsync always, 3 gateway nodes, HAProxy health-checking /readyz), the load generator
# driving traffic through HAProxy with reconnecting clients, one fault injected at a fixed point,
# then the verifier's verdict: every message answered `sent` delivered exactly once, in order.
#
#   deploy/faults/run.sh [scenario...]      (all by default; see --list)
#
# Exits non-zero if any scenario failed. Results (a JSON report per scenario, logs, the table) go
# to $FERRY_FAULTS_DIR (default /tmp/ferry-faults). See docs/RELIABILITY.md.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOCAL="$ROOT/deploy/local"

ALL_SCENARIOS=(kill-node rolling-restart pubsub-kill redis-restart redis-pause node-cut)

BIN_DIR=${FERRY_BIN_DIR:-$ROOT/target/debug}
OUT=${FERRY_FAULTS_DIR:-/tmp/ferry-faults}
PORT_BASE=${FERRY_FAULTS_PORT_BASE:-}   # default: the first of 27380, 27480, ... whose ports are free
CLIENTS=${FERRY_FAULTS_CLIENTS:-80}
RATE=${FERRY_FAULTS_RATE:-400}
DURATION=${FERRY_FAULTS_DURATION:-15}   # seconds of sending
DRAIN=${FERRY_FAULTS_DRAIN:-45}         # the verifier's longest wait after sending
FAULT_AT=${FERRY_FAULTS_AT:-3}          # seconds after every client connected
NODES=3

# Ports (loopback), below Linux's ephemeral range: HAProxy PORT_BASE, stats +4, node i WebSocket
# +i, admin +10+i, Redis -1. The TCP proxy takes a free port of its own.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports_free() {
    local p
    for p in $(seq $(($1 - 1)) $(($1 + 10 + NODES))); do
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
    [[ -n "$PORT_BASE" ]] || die "no free port range in 27379..28293; set FERRY_FAULTS_PORT_BASE"
fi
LB_PORT=$PORT_BASE
STATS_PORT=$((PORT_BASE + 4))
WS_BASE=$PORT_BASE
ADMIN_BASE=$((PORT_BASE + 10))
REDIS_PORT=$((PORT_BASE - 1))

GATEWAY="$BIN_DIR/ferry-gateway"
LOADTEST="$BIN_DIR/ferry-loadtest"

log() { printf '%s faults: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    printf 'faults: error: %s\n' "$*" >&2
    exit 2
}

case "${1:-}" in
-h | --help)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo "scenarios: ${ALL_SCENARIOS[*]}"
    exit 0
    ;;
--list)
    printf '%s\n' "${ALL_SCENARIOS[@]}"
    exit 0
    ;;
esac
SCENARIOS=("$@")
((${#SCENARIOS[@]})) || SCENARIOS=("${ALL_SCENARIOS[@]}")
for s in "${SCENARIOS[@]}"; do
    [[ " ${ALL_SCENARIOS[*]} " == *" $s "* ]] || die "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]})"
done

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
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"

# --- what runs now, for the cleanup -------------------------------------------------------------
STATE=""        # the current scenario's cluster state dir (down.sh stops what it lists, by PID)
LOAD_PID=""     # the load generator (under timeout)
SAMPLER_PID=""  # the metrics sampler
PROXY_PID=""    # the fault-injecting TCP proxy
PAUSED_PID=""   # a SIGSTOPped redis-server, to SIGCONT

cluster_env() {
    export FERRY_LOCAL_DIR=$STATE FERRY_LOCAL_PROMETHEUS=0 FERRY_LOCAL_BIN_DIR=$BIN_DIR
    export FERRY_LOCAL_LB_PORT=$LB_PORT FERRY_LOCAL_STATS_PORT=$STATS_PORT
    export FERRY_LOCAL_WS_BASE=$WS_BASE FERRY_LOCAL_ADMIN_BASE=$ADMIN_BASE
    export FERRY_LOCAL_REDIS_PORT=$REDIS_PORT FERRY_LOCAL_DRAIN_TIMEOUT=2s
    export FERRY_LOCAL_DEADLINE=60 FERRY_LOCAL_STOP_TIMEOUT=10
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
        END { if (NR > 0) printf "%s %s %s %d %d %d %d %d\n", t, n, pid, d, c, u, dup, p }' \
        >>"$SAMPLES" || true
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
    export FERRY_LOCAL_REDIS_URL_3="redis://127.0.0.1:$(<"$STATE/proxy.port")"
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

# --- one scenario --------------------------------------------------------------------------------
run_scenario() {
    local name=$1 t_start=$SECONDS rc limit
    STATE="$OUT/$name"
    SAMPLES="$STATE/samples.txt"
    CHECKS=() NOTES=()
    rm -rf "$STATE"
    mkdir -p "$STATE"
    cluster_env
    unset FERRY_LOCAL_GATEWAY_ARGS FERRY_LOCAL_REDIS_URL_3
    log "=== $name: starting a 3-node cluster in $STATE"
    if declare -F "setup_$name" >/dev/null; then "setup_$name"; fi
    if ! "$LOCAL/up.sh" "$NODES" >"$STATE/up.log" 2>&1; then
        check 1 "the cluster starts (see $STATE/up.log)"
        finish_scenario "$name" "$t_start" 99
        return
    fi
    : >"$SAMPLES"
    start_sampler
    limit=$((DURATION + DRAIN + 90))
    FERRY_JWT_SECRET=$(<"$STATE/jwt-secret") timeout -k 10 "$limit" "$LOADTEST" --json run \
        --url "ws://127.0.0.1:$LB_PORT/v1/ws" --run-id "$name-$$" \
        -c "$CLIENTS" -r "$RATE" -d "${DURATION}s" --drain "${DRAIN}s" -b 64 \
        >"$STATE/report.json" 2>"$STATE/loadtest.log" </dev/null &
    LOAD_PID=$!
    log "load: $CLIENTS clients, $RATE msg/s for ${DURATION}s through HAProxy (PID $LOAD_PID)"
    if wait_until 30 all_connected >/dev/null; then
        sleep "$FAULT_AT"
        if kill -0 "$LOAD_PID" 2>/dev/null; then
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
    finish_scenario "$name" "$t_start" "$rc"
}

# finish_scenario NAME T_START LOADTEST_RC: stop the cluster, judge, record the result.
finish_scenario() {
    local name=$1 t_start=$2 rc=$3 c
    teardown
    unset FERRY_LOCAL_GATEWAY_ARGS FERRY_LOCAL_REDIS_URL_3
    printf '%s\n' "${CHECKS[@]+"${CHECKS[@]}"}" >"$STATE/checks.txt"
    printf '%s\n' "${NOTES[@]+"${NOTES[@]}"}" >"$STATE/notes.txt"
    python3 "$HERE/judge.py" scenario --name "$name" --dir "$STATE" --loadtest-rc "$rc" \
        --secs $((SECONDS - t_start)) >>"$RESULTS"
    python3 "$HERE/judge.py" show --line "$(tail -n 1 "$RESULTS")"
    STATE=""
}

log "Ferry fault suite: ${SCENARIOS[*]} (binaries: $BIN_DIR; results: $OUT; ports $((PORT_BASE - 1))..$((PORT_BASE + 10 + NODES)))"
if ((HAS_WATCHDOG == 0)); then
    log "NOTE: $GATEWAY has no --store-outage-grace: node-cut cannot pass (its clients never move)"
fi
t0=$SECONDS
for s in "${SCENARIOS[@]}"; do run_scenario "$s"; done
python3 "$HERE/judge.py" table --results "$RESULTS" --secs $((SECONDS - t0)) | tee "$OUT/table.md"
python3 "$HERE/judge.py" verdict --results "$RESULTS"

#!/usr/bin/env bash
# Bring up a local Ferry cluster on 127.0.0.1: Redis (AOF, fsync always by default), N gateway nodes in --dev
# mode, HAProxy in front of them and Prometheus scraping them. Usage: deploy/local/up.sh [N]
# Stop it with deploy/local/down.sh. See deploy/local/README.md.
#
# deploy/local/up.sh --cluster [N]: the same with a Redis Cluster of 3 primaries and 1 replica
# each (`redis-1`..`redis-6`) instead of one Redis, and the nodes started with --redis-cluster.
#
# deploy/local/up.sh --restart NAME (re)starts one stopped process of a running cluster (`redis`,
# `redis-I` or `gw-I`) exactly as up.sh first started it (its launcher in $STATE/launch/), and
# waits until it is ready. The fault suite (deploy/faults/run.sh) uses it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=deploy/local/redis-cluster.sh
. "$HERE/redis-cluster.sh"

RESTART=""
CLUSTER=0
case "${1:-}" in
--restart)
    RESTART=${2:?usage: up.sh --restart redis|redis-I|gw-I}
    N=1
    ;;
--cluster)
    CLUSTER=1
    N=${2:-3}
    ;;
*) N=${1:-3} ;;
esac
STATE=${FERRY_LOCAL_DIR:-/tmp/ferry-local}
REDIS_PORT=${FERRY_LOCAL_REDIS_PORT:-6390}
LB_PORT=${FERRY_LOCAL_LB_PORT:-8080}
STATS_PORT=${FERRY_LOCAL_STATS_PORT:-8404}
PROM_PORT=${FERRY_LOCAL_PROM_PORT:-9089}
PROMETHEUS=${FERRY_LOCAL_PROMETHEUS:-1}    # 0: no Prometheus
WS_BASE=${FERRY_LOCAL_WS_BASE:-8080}       # node i listens on WS_BASE+i    (8081..)
ADMIN_BASE=${FERRY_LOCAL_ADMIN_BASE:-9090} # node i's admin is ADMIN_BASE+i (9091..)
DRAIN_TIMEOUT=${FERRY_LOCAL_DRAIN_TIMEOUT:-5s}
DEADLINE_SECS=${FERRY_LOCAL_DEADLINE:-60}
# Redis's appendfsync: always (a write is on disk before Redis answers), everysec or no.
APPENDFSYNC=${FERRY_LOCAL_REDIS_APPENDFSYNC:-always}
# Redis Cluster (--cluster): node redis-i listens on REDIS_PORT+i-1 (6390..6395) and its cluster
# bus on that port + BUS_OFFSET (16390..16395); a primary unreachable for NODE_TIMEOUT ms is
# failed over to its replica.
CLUSTER_NODES=6
BUS_OFFSET=${FERRY_LOCAL_REDIS_BUS_OFFSET:-10000}
NODE_TIMEOUT=${FERRY_LOCAL_CLUSTER_NODE_TIMEOUT:-1500}
# Extra flags for every gateway node (split on spaces), e.g. "--store-timeout 1s".
GATEWAY_ARGS=${FERRY_LOCAL_GATEWAY_ARGS:-}
BIN_DIR=${FERRY_LOCAL_BIN_DIR:-$ROOT/target/release}
GATEWAY="$BIN_DIR/ferry-gateway"

log() { printf 'up.sh: %s\n' "$*"; }
die() { printf 'up.sh: error: %s\n' "$*" >&2; exit 1; }

if ! [[ "$N" =~ ^[1-9]$ ]]; then
    die "N must be 1..9 (WebSocket ports 8081..808N, admin 9091..909N), got '$N'"
fi
[[ "$PROMETHEUS" == 0 || "$PROMETHEUS" == 1 ]] || die "FERRY_LOCAL_PROMETHEUS must be 0 or 1"
case "$APPENDFSYNC" in
always | everysec | no) ;;
*) die "FERRY_LOCAL_REDIS_APPENDFSYNC must be always, everysec or no, got '$APPENDFSYNC'" ;;
esac
[[ "$BUS_OFFSET" =~ ^[1-9][0-9]*$ ]] || die "FERRY_LOCAL_REDIS_BUS_OFFSET must be a positive number"
[[ "$NODE_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "FERRY_LOCAL_CLUSTER_NODE_TIMEOUT must be milliseconds"

# --- 1. prerequisites -------------------------------------------------------------------------
need_curl=""
command -v curl >/dev/null 2>&1 || need_curl=curl
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
[[ "$PROMETHEUS" == 0 ]] || command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[[ -z "$need_curl" ]] || missing+=(curl)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing missing packages: ${missing[*]}"
        # Without recommends: the prometheus package would also pull in node-exporter etc.
        # On a systemd host Debian starts each package's service on install (redis on 6379,
        # prometheus on 9090); neither collides with the ports used here, so they are left alone.
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" ||
            { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
    else
        die "missing: ${missing[*]}. Install them with:
    sudo apt-get install -y --no-install-recommends ${missing[*]}"
    fi
fi

if [[ ! -x "$GATEWAY" ]]; then
    case "$BIN_DIR" in
    "$ROOT/target/release")
        log "building ferry-gateway (target/release/ferry-gateway is missing)"
        (cd "$ROOT" && cargo build --release -p ferry-gateway)
        ;;
    "$ROOT/target/debug")
        log "building ferry-gateway (target/debug/ferry-gateway is missing)"
        (cd "$ROOT" && cargo build -p ferry-gateway)
        ;;
    *) die "$GATEWAY is missing (FERRY_LOCAL_BIN_DIR=$BIN_DIR)" ;;
    esac
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]]; }
redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping) == PONG ]]; }

# start NAME COMM: run the launcher launch/NAME.sh in the background, logging to logs/NAME.log
# (appended), and record "PID COMM" in pids/NAME.pid (COMM is what down.sh expects in
# /proc/PID/comm, against PID reuse; the launcher execs the program, so the PID is the program's).
start() {
    local name=$1 comm=$2
    nohup bash "$STATE/launch/$name.sh" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo "$! $comm" >"$STATE/pids/$name.pid"
    log "started $name (PID $!)"
}

# launcher NAME CMD...: write launch/NAME.sh, which execs CMD (arguments quoted as given), after
# the shell lines in $PRELUDE if set.
launcher() {
    local name=$1
    shift
    {
        echo '#!/usr/bin/env bash'
        echo "# Written by up.sh: starts $name as up.sh did. Restart it with: up.sh --restart $name"
        [[ -z "${PRELUDE:-}" ]] || printf '%s\n' "$PRELUDE"
        printf 'exec'
        printf ' %q' "$@"
        echo
    } >"$STATE/launch/$name.sh"
}

# --- restart of one process of a running cluster ---------------------------------------------
if [[ -n "$RESTART" ]]; then
    [[ -e "$STATE/launch/$RESTART.sh" ]] || die "no launcher $STATE/launch/$RESTART.sh (is the cluster up?)"
    if [[ -e "$STATE/pids/$RESTART.pid" ]]; then
        read -r pid _ <"$STATE/pids/$RESTART.pid"
        if kill -0 "$pid" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
            die "$RESTART is still running (PID $pid)"
        fi
    fi
    case "$RESTART" in
    redis)
        start redis redis-server
        check() { redis_ping; }
        ;;
    redis-[1-9])
        # Its port, as up.sh --cluster recorded it.
        port=$(awk -v n="$RESTART" '$1 == n { print $2 }' "$STATE/redis-nodes" 2>/dev/null)
        [[ -n "$port" ]] || die "no port for $RESTART in $STATE/redis-nodes"
        start "$RESTART" redis-server
        # Ready once it has loaded its data and rejoined: it answers PING and sees the cluster ok.
        check() { rc_ping "$port" && [[ "$(rc_field "$port" cluster_state CLUSTER INFO)" == ok ]]; }
        ;;
    gw-[1-9])
        i=${RESTART#gw-}
        start "$RESTART" ferry-gateway
        check() { http_ok "http://127.0.0.1:$((ADMIN_BASE + i))/readyz"; }
        ;;
    *) die "--restart takes redis, redis-I or gw-I, got '$RESTART'" ;;
    esac
    read -r pid _ <"$STATE/pids/$RESTART.pid"
    deadline=$((SECONDS + DEADLINE_SECS))
    until check >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$RESTART (PID $pid) exited; see $STATE/logs/$RESTART.log"
        ((SECONDS < deadline)) || die "timed out after ${DEADLINE_SECS}s waiting for $RESTART"
        sleep 0.1
    done
    log "ready: $RESTART"
    exit 0
fi

# --- 2. state dir, refusing to start twice ----------------------------------------------------
mkdir -p "$STATE/pids" "$STATE/logs" "$STATE/launch"
if ((CLUSTER)); then
    for i in $(seq 1 "$CLUSTER_NODES"); do mkdir -p "$STATE/redis-cluster/redis-$i"; done
else
    mkdir -p "$STATE/redis"
fi
[[ "$PROMETHEUS" == 0 ]] || mkdir -p "$STATE/prometheus"
for f in "$STATE"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    pid=$(cut -d' ' -f1 "$f")
    if kill -0 "$pid" 2>/dev/null; then
        die "already running (PID $pid from $f); run deploy/local/down.sh first"
    fi
    rm -f "$f"
done

ports=("$LB_PORT" "$STATS_PORT")
if ((CLUSTER)); then
    for i in $(seq 0 $((CLUSTER_NODES - 1))); do
        ports+=($((REDIS_PORT + i)) $((REDIS_PORT + i + BUS_OFFSET)))
    done
else
    ports+=("$REDIS_PORT")
fi
[[ "$PROMETHEUS" == 0 ]] || ports+=("$PROM_PORT")
for i in $(seq 1 "$N"); do ports+=($((WS_BASE + i)) $((ADMIN_BASE + i))); done
busy=()
for p in "${ports[@]}"; do
    if port_busy "$p"; then busy+=("$p"); fi
done
if ((${#busy[@]})); then
    msg="port(s) already in use on 127.0.0.1: ${busy[*]}"
    if command -v ss >/dev/null 2>&1; then
        msg+=$'\n'"$(ss -ltnp 2>/dev/null | grep -E ":($(
            IFS='|'
            echo "${busy[*]}"
        ))\b" || true)"
    fi
    msg+=$'\n'"Free them (e.g. 'systemctl stop prometheus' if it is Debian's service), or set"
    msg+=" FERRY_LOCAL_REDIS_PORT / FERRY_LOCAL_REDIS_BUS_OFFSET / FERRY_LOCAL_PROM_PORT /"
    msg+=" FERRY_LOCAL_LB_PORT /"
    msg+=" FERRY_LOCAL_STATS_PORT / FERRY_LOCAL_WS_BASE / FERRY_LOCAL_ADMIN_BASE."
    die "$msg"
fi

# If anything below fails, stop whatever was already started.
started_ok=0
on_exit() {
    if [[ $started_ok -eq 0 ]]; then
        printf 'up.sh: start-up failed; last log lines:\n' >&2
        for l in "$STATE"/logs/*.log; do
            [[ -e "$l" ]] || continue
            printf '  --- %s\n' "$l" >&2
            tail -n 5 "$l" | sed 's/^/  /' >&2
        done
        "$HERE/down.sh" >&2 || true
    fi
}
trap on_exit EXIT

# render TEMPLATE OUT KEY=VALUE...: replace each @KEY@ in TEMPLATE by VALUE (may be multi-line).
render() {
    local text kv
    shopt -u patsub_replacement 2>/dev/null || true # bash 5.2: keep '&' in values literal
    text=$(<"$1")
    for kv in "${@:3}"; do text=${text//@${kv%%=*}@/${kv#*=}}; done
    printf '%s\n' "$text" >"$2"
}

# all_alive: fail (naming it) if a process up.sh started has exited.
all_alive() {
    local f pid
    for f in "$STATE"/pids/*.pid; do
        [[ -e "$f" ]] || continue
        read -r pid _ <"$f"
        kill -0 "$pid" 2>/dev/null || die "$(basename "$f" .pid) (PID $pid) exited; see $STATE/logs/"
    done
}

# wait_for WHAT CMD...: poll CMD until it succeeds, or fail at the deadline.
deadline=$((SECONDS + DEADLINE_SECS))
wait_for() {
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        all_alive
        if ((SECONDS >= deadline)); then die "timed out after ${DEADLINE_SECS}s waiting for $what"; fi
        sleep 0.2
    done
    log "ready: $what"
}

# A fresh start: new logs (a --restart appends to them).
rm -f "$STATE"/logs/*.log

# --- 3. Redis ---------------------------------------------------------------------------------
# cluster_ports: the ports of the cluster's nodes, redis-1 first.
cluster_ports() { seq "$REDIS_PORT" $((REDIS_PORT + CLUSTER_NODES - 1)); }
# cluster_shaped: every node sees the cluster settled, with 3 primaries and a replica of each.
cluster_shaped() {
    # shellcheck disable=SC2046 # one argument per port
    cluster_settled $(cluster_ports) || return 1
    local table
    table=$(cluster_table "$REDIS_PORT")
    [[ $(awk '$3 == "primary" && $6 != "-"' <<<"$table" | wc -l) == 3 &&
        $(awk '$3 == "replica" && $4 != "-"' <<<"$table" | wc -l) == 3 ]]
}
if ((CLUSTER)); then
    : >"$STATE/redis-nodes"
    for i in $(seq 1 "$CLUSTER_NODES"); do
        port=$((REDIS_PORT + i - 1))
        dir="$STATE/redis-cluster/redis-$i"
        # repl-diskless-sync-delay 0: a replica syncs at once instead of 5 s later (at creation,
        # and when a failed primary comes back as a replica). repl-ping-replica-period 1: Redis
        # 7.0 lists a replica in CLUSTER SLOTS only once its offset moves; pings move it.
        launcher "redis-$i" redis-server --bind 127.0.0.1 --port "$port" \
            --dir "$dir" --appendonly yes --appendfsync "$APPENDFSYNC" \
            --save '' --daemonize no --protected-mode yes \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
            --cluster-port $((port + BUS_OFFSET)) --cluster-node-timeout "$NODE_TIMEOUT" \
            --repl-diskless-sync-delay 0 --repl-ping-replica-period 1
        start "redis-$i" redis-server
        echo "redis-$i $port" >>"$STATE/redis-nodes"
    done
    for port in $(cluster_ports); do wait_for "redis PING on 127.0.0.1:$port" rc_ping "$port"; done
    # Fresh nodes (no nodes.conf yet) know only themselves; nodes from an earlier run rejoin.
    fresh=0
    for port in $(cluster_ports); do
        if [[ "$(rc_field "$port" cluster_known_nodes CLUSTER INFO)" == 1 &&
            "$(rc_field "$port" cluster_slots_assigned CLUSTER INFO)" == 0 ]]; then
            fresh=$((fresh + 1))
        fi
    done
    if ((fresh == CLUSTER_NODES)); then
        seeds=()
        for port in $(cluster_ports); do seeds+=("127.0.0.1:$port"); done
        log "creating the Redis Cluster (3 primaries, 1 replica each)"
        redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes \
            >"$STATE/logs/redis-cluster-create.log" 2>&1 </dev/null ||
            die "redis-cli --cluster create failed; see $STATE/logs/redis-cluster-create.log"
    elif ((fresh > 0)); then
        die "$fresh of the $CLUSTER_NODES Redis nodes have no cluster state and the others do;" \
            "delete $STATE/redis-cluster for a fresh cluster"
    fi
    wait_for "Redis Cluster settled (cluster_state:ok everywhere, replicas in sync)" cluster_shaped
    REDIS_URL=""
    for port in $(cluster_ports); do REDIS_URL+="${REDIS_URL:+,}redis://127.0.0.1:$port"; done
    CLUSTER_ARGS=(--redis-cluster)
else
    launcher redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
        --dir "$STATE/redis" --appendonly yes --appendfsync "$APPENDFSYNC" \
        --save '' --daemonize no --protected-mode yes
    start redis redis-server
    wait_for "redis PING on 127.0.0.1:$REDIS_PORT" redis_ping
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    CLUSTER_ARGS=()
fi

# --- 4. gateway nodes -------------------------------------------------------------------------
# One HS256 secret shared by every node. Without it each --dev node draws its own random secret,
# and a token from one node's /dev/token (HAProxy picks the node) would fail on the others. With
# --jwt-secret set, /dev/token is off unless --dev-token-with-key says to mint with it (a
# throwaway secret of this local cluster, never a production key). Kept in the state dir (mode 600) and reused, and
# passed through the environment (the launcher reads the file) so it does not show in `ps`.
# A node's Redis URL can be overridden with FERRY_LOCAL_REDIS_URL_<i> (e.g. to go through a
# fault-injecting proxy).
SECRET_FILE="$STATE/jwt-secret"
if [[ ! -s "$SECRET_FILE" ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE")
fi
read -r -a extra_args <<<"$GATEWAY_ARGS"
for i in $(seq 1 "$N"); do
    url_var="FERRY_LOCAL_REDIS_URL_$i"
    PRELUDE="export FERRY_JWT_SECRET=\$(<$(printf %q "$SECRET_FILE"))" \
        launcher "gw-$i" env NO_COLOR=1 "$GATEWAY" --dev --dev-token-with-key \
        --listen "127.0.0.1:$((WS_BASE + i))" --admin-listen "127.0.0.1:$((ADMIN_BASE + i))" \
        --redis-url "${!url_var:-$REDIS_URL}" ${CLUSTER_ARGS[@]+"${CLUSTER_ARGS[@]}"} \
        --node-id "gw-$i" --drain-timeout "$DRAIN_TIMEOUT" --log-format text \
        ${extra_args[@]+"${extra_args[@]}"}
    start "gw-$i" ferry-gateway
done

# --- 5. HAProxy and Prometheus configs, then the processes ------------------------------------
servers="" targets=""
for i in $(seq 1 "$N"); do
    servers+="    server gw-$i 127.0.0.1:$((WS_BASE + i)) check port $((ADMIN_BASE + i))"$'\n'
    targets+="      - targets: [\"127.0.0.1:$((ADMIN_BASE + i))\"]"$'\n'
    targets+="        labels: { node: \"gw-$i\" }"$'\n'
done
# HAProxy needs about two descriptors per connection and refuses to start if maxconn does not
# fit the open-files limit, so size it from that limit (at most 20000).
nofile=$(ulimit -n)
[[ "$nofile" =~ ^[0-9]+$ ]] || nofile=1048576
maxconn=$(((nofile - 200) / 2))
((maxconn <= 20000)) || maxconn=20000
((maxconn >= 100)) || die "open-files limit too low for HAProxy ($nofile); raise it with ulimit -n"
render "$HERE/haproxy.cfg.tmpl" "$STATE/haproxy.cfg" "MAXCONN=$maxconn" \
    "LB_PORT=$LB_PORT" "STATS_PORT=$STATS_PORT" "SERVERS=${servers%$'\n'}"
# Prometheus loads a copy of the alerting rules (deploy/monitoring/rules.yml).
cp "$ROOT/deploy/monitoring/rules.yml" "$STATE/rules.yml"
render "$HERE/prometheus.yml.tmpl" "$STATE/prometheus.yml" \
    "PROM_PORT=$PROM_PORT" "TARGETS=${targets%$'\n'}" "RULES_FILE=$STATE/rules.yml"
haproxy -c -q -f "$STATE/haproxy.cfg" || die "haproxy rejected $STATE/haproxy.cfg"

# -db: stay in the foreground (no daemon), so the recorded PID is HAProxy's own.
launcher haproxy haproxy -db -f "$STATE/haproxy.cfg"
start haproxy haproxy
if [[ "$PROMETHEUS" == 1 ]]; then
    launcher prometheus prometheus --config.file="$STATE/prometheus.yml" \
        --storage.tsdb.path="$STATE/prometheus" --web.listen-address="127.0.0.1:$PROM_PORT"
    start prometheus prometheus
fi

for i in $(seq 1 "$N"); do
    wait_for "gw-$i /readyz (127.0.0.1:$((ADMIN_BASE + i)))" http_ok "http://127.0.0.1:$((ADMIN_BASE + i))/readyz"
done
wait_for "haproxy stats (127.0.0.1:$STATS_PORT)" http_ok "http://127.0.0.1:$STATS_PORT/"
# Through the load balancer: HAProxy needs a passing health check before it routes.
wait_for "haproxy -> gateway (127.0.0.1:$LB_PORT/dev/token)" http_ok "http://127.0.0.1:$LB_PORT/dev/token?user=up-check"
if [[ "$PROMETHEUS" == 1 ]]; then
    wait_for "prometheus /-/ready (127.0.0.1:$PROM_PORT)" http_ok "http://127.0.0.1:$PROM_PORT/-/ready"
fi

started_ok=1
cat <<EOF

Ferry local cluster is up ($N nodes$( ((CLUSTER == 0)) || echo ", Redis Cluster")). State, logs and PIDs: $STATE
  WebSocket (via HAProxy): ws://127.0.0.1:$LB_PORT/v1/ws   (subprotocol ferry.v1.json)
  Dev token (via HAProxy): curl 'http://127.0.0.1:$LB_PORT/dev/token?user=alice'
  HAProxy stats:           http://127.0.0.1:$STATS_PORT/   (CSV: http://127.0.0.1:$STATS_PORT/;csv)
$(if [[ "$PROMETHEUS" == 1 ]]; then
    echo "  Prometheus:              http://127.0.0.1:$PROM_PORT/   (targets: /targets)"
else echo "  Prometheus:              not started (FERRY_LOCAL_PROMETHEUS=0)"; fi)
EOF
if ((CLUSTER)); then
    echo "  Redis Cluster:           3 primaries x 1 replica (AOF on, appendfsync $APPENDFSYNC, node timeout ${NODE_TIMEOUT} ms; data in $STATE/redis-cluster)"
    while read -r name port; do
        cluster_table "$port" | awk -v n="$name" -v p="$port" '$1 == p {
            printf "    %-8s redis://127.0.0.1:%s  %s%s\n", n, p, $3,
                ($3 == "primary" ? " of slots " $6 : " of 127.0.0.1:" $4) }'
    done <"$STATE/redis-nodes"
else
    echo "  Redis:                   redis://127.0.0.1:$REDIS_PORT   (AOF on, appendfsync $APPENDFSYNC; data in $STATE/redis)"
fi
for i in $(seq 1 "$N"); do
    a=$((ADMIN_BASE + i))
    echo "  gw-$i: ws://127.0.0.1:$((WS_BASE + i))/v1/ws  admin http://127.0.0.1:$a/{healthz,readyz,metrics}"
done
cat <<EOF

WARNING: the nodes run with --dev, which is INSECURE: anyone who can reach them gets a token for
any user from /dev/token. Everything listens on 127.0.0.1 only; keep it that way.
Tokens are HS256, signed with the shared secret in $SECRET_FILE (mint your own with it,
e.g. ferry-loadtest run --jwt-secret "\$(cat $SECRET_FILE)").

Stop everything: $HERE/down.sh
EOF

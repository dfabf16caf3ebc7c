#!/usr/bin/env bash
# Ferry's one-machine benchmark: starts its own redis-server (free loopback port, temp dir, no
# snapshots) and a release gateway on it, measures the Redis ceiling for Ferry's own append
# script with redis-benchmark (EVALSHA, pipelined), runs the load generator, and prints Ferry's
# delivered throughput beside that ceiling as a ratio. Then, optionally: a latency run, the node
# under twice its capacity, the cost of prompt acks, CPU per message by codec, a connection ramp
# and a reconnect storm (on one gateway, or on three gateways driven by several generator
# processes). Everything it starts is stopped by PID on exit; every step is bounded in time;
# all traffic stays on loopback.
#
# Usage: loadtest/bench.sh [step...]
#   steps: ceiling throughput latency overload acks codecs ramp storm ramp3 storm3 cluster
#   (default: ceiling throughput latency)
# Settings (environment; durations as whole seconds or ms: 20s, 250ms):
#   CONNECTIONS=1000 RATE=60000 DURATION=20s BODY=100 MAX_IN_FLIGHT=200   throughput run
#   LATENCY_RATE=20000 LATENCY_DURATION=20s                 latency run (same connections)
#   CODEC=msgpack (json|msgpack: the clients' subprotocol in throughput and latency)
#   ACK_INTERVAL=100ms (the clients' ack coalescing; each ack is one trim in Redis)
#   CAPACITY= (msg/s the node delivers; default: this invocation's throughput step, run first
#     if it was not asked for) — the base of overload and acks
#   OVERLOAD_FACTOR=2 OVERLOAD_DURATION=20s OVERLOAD_DRAIN=60s   overload: factor × capacity
#   OVERLOAD_CODEC=json (overload and acks)  OVERLOAD_ON_RATE_LIMITED=give-up (or retry)
#   ACKS_LOAD=1.0 ACKS_DURATION=20s ACKS_FAST=20ms ACKS_SLOW=250ms   acks: ACKS_LOAD × capacity
#   CODECS_RATE=10000 CODECS_DURATION=20s                   codecs: JSON, then MessagePack
#   RAMP_CONNECTIONS=10000 RAMP_STEP=2000                   ramp (one gateway, one generator)
#   STORM_CONNECTIONS=5000 STORM_BACKLOG=10                 storm (one gateway, one generator)
#   GATEWAYS=3 GENERATORS=4 MULTI_SOURCE_ADDRS=8            ramp3 and storm3: processes
#   RAMP3_CONNECTIONS=50000 RAMP3_STEPS=5                   ramp3 (each generator in 5 steps)
#   STORM3_CONNECTIONS=50000                                storm3 (backlog STORM_BACKLOG)
#   CLUSTER_RATE=10000 CLUSTER_DURATION=20s                 cluster: the same load on the
#     standalone Redis, then on a 3-primary Redis Cluster (Redis CPU per message, per shard)
#   SOURCE_ADDRS=4 CEILING_REQUESTS=2000000 APPENDONLY=no (yes: appendfsync everysec)
#   SKIP_BUILD=1 (use the existing release binaries)  OUT=dir (keep JSON reports there)
#   GATEWAY_BIN=path (another gateway build, e.g. an older commit's, to compare in one session)
#   LOADTEST_BIN=path (default: the release build, under CARGO_TARGET_DIR if set)
# Needs: cargo, redis-server, redis-cli, redis-benchmark, curl, jq.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS=("${@:-ceiling throughput latency}")
read -r -a STEPS <<<"${STEPS[*]}"
CONNECTIONS=${CONNECTIONS:-1000}
RATE=${RATE:-60000}
DURATION=${DURATION:-20s}
BODY=${BODY:-100}
MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-200}
LATENCY_RATE=${LATENCY_RATE:-20000}
LATENCY_DURATION=${LATENCY_DURATION:-20s}
CODEC=${CODEC:-msgpack}
CAPACITY=${CAPACITY:-}
OVERLOAD_FACTOR=${OVERLOAD_FACTOR:-2}
OVERLOAD_DURATION=${OVERLOAD_DURATION:-20s}
OVERLOAD_DRAIN=${OVERLOAD_DRAIN:-60s}
OVERLOAD_CODEC=${OVERLOAD_CODEC:-json}
OVERLOAD_ON_RATE_LIMITED=${OVERLOAD_ON_RATE_LIMITED:-give-up}
ACKS_LOAD=${ACKS_LOAD:-1.0}
ACKS_DURATION=${ACKS_DURATION:-20s}
ACKS_FAST=${ACKS_FAST:-20ms}
ACKS_SLOW=${ACKS_SLOW:-250ms}
CODECS_RATE=${CODECS_RATE:-10000}
CODECS_DURATION=${CODECS_DURATION:-20s}
RAMP_CONNECTIONS=${RAMP_CONNECTIONS:-10000}
RAMP_STEP=${RAMP_STEP:-2000}
STORM_CONNECTIONS=${STORM_CONNECTIONS:-5000}
STORM_BACKLOG=${STORM_BACKLOG:-10}
GATEWAYS=${GATEWAYS:-3}
GENERATORS=${GENERATORS:-4}
MULTI_SOURCE_ADDRS=${MULTI_SOURCE_ADDRS:-8}
RAMP3_CONNECTIONS=${RAMP3_CONNECTIONS:-50000}
RAMP3_STEPS=${RAMP3_STEPS:-5}
STORM3_CONNECTIONS=${STORM3_CONNECTIONS:-50000}
SOURCE_ADDRS=${SOURCE_ADDRS:-4}
CLUSTER_RATE=${CLUSTER_RATE:-10000}
CLUSTER_DURATION=${CLUSTER_DURATION:-20s}
CEILING_REQUESTS=${CEILING_REQUESTS:-2000000}
APPENDONLY=${APPENDONLY:-no}
ACK_INTERVAL=${ACK_INTERVAL:-100ms}
SECRET=${SECRET:-bench-secret-$RANDOM-$RANDOM-of-at-least-32-bytes}

for tool in redis-server redis-cli redis-benchmark curl jq; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool is required" >&2; exit 2; }
done

# Many connections: as many descriptors as this shell may have (the gateway and the load
# generator inherit it).
ulimit -n "$(ulimit -Hn)"
echo "open files per process: $(ulimit -n)"

WORK=$(mktemp -d /tmp/ferry-bench.XXXXXX)
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK/redis"
  [[ "$OUT" == "$WORK" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

# A loopback port nobody listens on.
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "bench.sh: no free port" >&2
  exit 2
}

# A duration setting (20s, 250ms, 2m) in whole seconds, rounded up: for time limits.
secs() {
  case "$1" in
  *ms) echo $(((${1%ms} + 999) / 1000)) ;;
  *s) echo "${1%s}" ;;
  *m) echo $((${1%m} * 60)) ;;
  *) echo "$1" ;;
  esac
}

# Polls a command until it succeeds, for up to $1 seconds.
wait_for() {
  local secs=$1
  shift
  for _ in $(seq 1 $((secs * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench.sh: timed out waiting for: $*" >&2
  exit 2
}

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$ROOT" && cargo build --release -p ferry-gateway -p ferry-loadtest)
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN=${GATEWAY_BIN:-$TARGET_DIR/release/ferry-gateway}
LOADTEST_BIN=${LOADTEST_BIN:-$TARGET_DIR/release/ferry-loadtest}

# --- Redis ---
REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis_args=(--port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save ''
  --appendonly "$APPENDONLY" --logfile "$WORK/redis/redis.log" --maxclients 10000)
[[ "$APPENDONLY" == yes ]] && redis_args+=(--appendfsync everysec)
redis-server "${redis_args[@]}" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_for 10 redis-cli -p "$REDIS_PORT" ping
echo "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT (appendonly $APPENDONLY)"

# --- gateways: a fresh one (or several) for every step, so no step inherits another's heap ---
# Where they store: the standalone Redis above; the cluster step points them at its cluster.
GATEWAY_REDIS=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
GW_PIDS=()
URLS=()
ADMIN_PORTS=()
GW_PID=""
start_gateways() {
  local count=$1 i port admin pid
  for i in $(seq 1 "$count"); do
    port=$(free_port)
    admin=$(free_port)
    # Every generator connects from loopback: no per-address cap (an environment variable, so an
    # older GATEWAY_BIN that has no such setting ignores it).
    FERRY_MAX_CONNECTIONS_PER_ADDRESS=1000000 \
    FERRY_LOG=${FERRY_LOG:-warn} "$GATEWAY_BIN" "${GATEWAY_REDIS[@]}" \
      --jwt-secret "$SECRET" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
      --send-rate 1000000 --send-burst 1000000 --max-connections 100000 --node-id "bench-$i" \
      --drain-timeout 1s >>"$WORK/gateway.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    GW_PIDS+=("$pid")
    URLS+=("ws://127.0.0.1:$port/v1/ws")
    ADMIN_PORTS+=("$admin")
    wait_for 20 curl -sf "http://127.0.0.1:$admin/readyz"
    echo "ferry-gateway pid $pid on 127.0.0.1:$port"
  done
  redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
  GW_PID=${GW_PIDS[0]}
  URL=${URLS[0]}
}
start_gateway() { start_gateways 1; }
stop_gateway() {
  [[ ${#GW_PIDS[@]} -gt 0 ]] || return 0
  local pid gw kept=()
  for pid in "${GW_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${GW_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for gw in "${GW_PIDS[@]}"; do
      [[ "$pid" == "$gw" ]] && continue 2
    done
    kept+=("$pid")
  done
  PIDS=("${kept[@]}")
  GW_PIDS=()
  URLS=()
  ADMIN_PORTS=()
  GW_PID=""
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
}

# The sum of a gateway metric over every running gateway (a series' labels in $2, e.g.
# 'type="ack"'); empty if no gateway exports it.
gateway_metric() {
  local name=$1 labels=${2:-} port
  for port in "${ADMIN_PORTS[@]}"; do
    curl -sf "http://127.0.0.1:$port/metrics" || true
  done | awk -v name="$name" -v labels="$labels" '
    (labels == "" && $1 == name) || (index($1, name "{") == 1 && index($1, labels) > 0) {
      sum += $2; found = 1 }
    END { if (found) printf "%.0f\n", sum }'
}

# Machine-wide busy CPU ticks and total ticks (/proc/stat), and a process's CPU ticks.
machine_ticks() {
  local _cpu a b c d e f g h
  read -r _cpu a b c d e f g h _ </proc/stat
  echo "$((a + b + c + e + f + g + h + d)) $((d + e))"
}
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
gateway_ticks() {
  local pid sum=0
  for pid in "${GW_PIDS[@]}"; do
    sum=$((sum + $(proc_ticks "$pid")))
  done
  echo "$sum"
}
gateway_rss_bytes() {
  local pid sum=0 kb
  for pid in "${GW_PIDS[@]}"; do
    kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    sum=$((sum + ${kb:-0} * 1024))
  done
  echo "$sum"
}

# Waits (up to QUIET_WAIT seconds) until the machine is nearly idle, so that other work on it
# (builds) does not share the cores with a measurement; says so if it never gets quiet.
QUIET_WAIT=${QUIET_WAIT:-300}
wait_quiet() {
  local t0 i0 t1 i1 busy
  for _ in $(seq 1 "$QUIET_WAIT"); do
    read -r t0 i0 < <(machine_ticks)
    sleep 1
    read -r t1 i1 < <(machine_ticks)
    busy=$(( 100 - 100 * (i1 - i0) / (t1 - t0 + 1) ))
    if (( busy < 15 )); then
      return 0
    fi
  done
  echo "bench.sh: the machine is still ${busy}% busy with other work; measuring anyway" >&2
}

# CPU accounting of one step: cores used by the gateway, Redis, the load generator and the
# rest of the machine (everything shares the same cores).
CPU_MARK=()
cpu_mark() { CPU_MARK=($(machine_ticks) "$(gateway_ticks)" "$(proc_ticks "$REDIS_PID")" "$(date +%s%N)"); }
cpu_report() {
  local t0=${CPU_MARK[0]} i0=${CPU_MARK[1]} g0=${CPU_MARK[2]} r0=${CPU_MARK[3]} n0=${CPU_MARK[4]}
  local t1 i1 g1 r1 n1
  read -r t1 i1 < <(machine_ticks)
  g1=$(gateway_ticks)
  r1=$(proc_ticks "$REDIS_PID")
  n1=$(date +%s%N)
  local wall_cs=$(( (n1 - n0) / 10000000 ))
  local cores
  cores=$(nproc)
  awk -v t=$((t1 - t0)) -v i=$((i1 - i0)) -v g=$((g1 - g0)) -v r=$((r1 - r0)) -v w="$wall_cs" \
    -v n="$cores" -v lg="${1:-0}" 'BEGIN {
      busy = n * (1 - i / t); gw = g / w; rd = r / w;
      printf "cpu (cores of %d): machine %.2f busy; gateway %.2f, redis %.2f, loadgen %.2f, other %.2f\n",
        n, busy, gw, rd, lg, busy - gw - rd - lg }'
}

loadtest() {
  local name=$1
  shift
  local limit=$1
  shift
  stop_gateway
  start_gateway
  wait_quiet
  echo
  echo "== $name: ferry-loadtest $*"
  cpu_mark
  local rc=0
  FERRY_JWT_SECRET="$SECRET" timeout "$limit" "$LOADTEST_BIN" --json "$@" \
    --url "$URL" --gateway-pid "$GW_PID" --redis-pid "$REDIS_PID" --source-addrs "$SOURCE_ADDRS" \
    >"$OUT/$name.json" || rc=$?
  if [[ ! -s "$OUT/$name.json" ]]; then
    echo "bench.sh: $name produced no report (exit $rc)" >&2
    return 1
  fi
  cpu_report "$(jq -r '.loadgen.cores // 0' "$OUT/$name.json")"
  return 0
}

CEILING=""
ceiling() {
  stop_gateway
  # Ferry's own append script, as the router loads it.
  local script sha
  script=$(awk '/const APPEND: &str = r#"/ {on = 1; next} on && /^"#;/ {exit} on' \
    "$ROOT/router/src/script.rs")
  [[ -n "$script" ]] || { echo "bench.sh: APPEND not found in router/src/script.rs" >&2; exit 2; }
  sha=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$script")
  echo
  echo "== ceiling: redis-benchmark EVALSHA append script $sha"
  # KEYS: inbox, meta, dedupe, devices, sender's share; ARGV: payload, max_inbox, epoch,
  # dedupe ms, ttl ms, channel, replicas (0), cluster (0), device ttl ms, known recipient (0),
  # share (half of max_inbox, as the gateway's default --max-inbox-share).
  # A random inbox per call (one in a million users) and a dedupe key unique per call; a huge
  # max_inbox so the script always stores. Payload ≈ Ferry's record for a 100-byte body.
  local payload
  payload=$(head -c "$BODY" /dev/zero | tr '\0' 'x')
  payload="$payload-from-lt-bench-0000-id-0000000"
  wait_quiet
  cpu_mark
  timeout 120 redis-benchmark -p "$REDIS_PORT" -c 50 -P 16 -r 1000000 -n "$CEILING_REQUESTS" --csv \
    EVALSHA "$sha" 5 'bench:{u:__rand_int__}:inbox' 'bench:{u:__rand_int__}:meta' \
    'bench:dedupe:__rand_int__:__rand_int__' 'bench:{u:__rand_int__}:devices' \
    'bench:{u:__rand_int__}:from:lt-bench' "$payload" \
    1000000000 e1 60000 2592000000 'bench:live' 0 0 604800000 0 500000000 >"$OUT/ceiling.csv"
  CEILING=$(tail -n 1 "$OUT/ceiling.csv" | cut -d, -f2 | tr -d '"')
  echo "redis-benchmark EVALSHA append: $CEILING ops/s (-c 50 -P 16, $CEILING_REQUESTS calls)"
  cpu_report
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
}

# The figures every load run prints: throughput whole-run and during sending, pushback,
# latencies from the schedule, the generator's own lag, and CPU per delivered message.
summary() {
  jq -r '
    def f: . * 10 | floor / 10;
    def us: if . == null then "?" else f end;
    "codec \(.codec), acks every \(.ack_interval_ms) ms, in flight per connection \(if .max_in_flight == 0 then "unlimited" else .max_in_flight end), on rate_limited: \(.on_rate_limited)",
    "delivered \(.delivered_per_sec | floor) msg/s (sent \(.sent_per_sec | floor)) over the whole run; lost \(.lost), dup \(.duplicates), out of order \(.out_of_order), seq mismatch \(.seq_mismatch), errors \(.send_errors)",
    "during sending (\(.sending_secs) s): delivered \(.delivered_per_sec_during_sending | floor) msg/s, stored (sent) \(.sent_per_sec_during_sending | floor) msg/s",
    "pushed back: rate_limited answers \(.rate_limited), sends refused \(.sends_refused), not sent (behind schedule) \(.not_dispatched)",
    "delivery ms p50 \(.latency_delivery.p50_ms) p90 \(.latency_delivery.p90_ms) p99 \(.latency_delivery.p99_ms) p99.9 \(.latency_delivery.p999_ms) max \(.latency_delivery.max_ms)",
    "sent ms     p50 \(.latency_sent.p50_ms) p99 \(.latency_sent.p99_ms); the generator'"'"'s own lag ms p99 \(.dispatch_lag.p99_ms) max \(.dispatch_lag.max_ms)",
    "cpu per delivered message: gateway \(.cpu_per_message.gateway_us | us) µs, redis \(.cpu_per_message.redis_us | us) µs, loadgen \(.cpu_per_message.loadgen_us | us) µs (\(.cpu_per_message.delivered) messages, \(.cpu_per_message.window_secs | f) s from the first send to the end of the drain)",
    "gateway CPU \(.gateway.cores * 100 | floor)% of a core, RSS \(.gateway.after.rss_bytes / 1048576 | floor) MiB; loadgen CPU \(.loadgen.cores * 100 | floor)%"
  ' "$1"
  local acks
  acks=$(gateway_metric ferry_frames_in_total 'type="ack"')
  if [[ -n "$acks" ]]; then
    jq -r --arg acks "$acks" '"acks the gateway received: \($acks) (\(($acks | tonumber) / ([.delivered, 1] | max) * 100 | floor / 100) per delivered message)"' "$1"
  fi
  echo "redis commands (calls, µs per call, seconds; EVALSHA's time includes the commands its script runs, listed too):"
  redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | awk -F'[:=,]' '
    /^cmdstat_/ { name = substr($1, 9); calls[name] = $3; usec[name] = $5; total += $5 }
    END { for (n in calls) if (usec[n] > total / 100)
      printf "  %-20s %10d calls %7.2f µs %7.2f s\n", n, calls[n], usec[n] / calls[n], usec[n] / 1e6 }' |
    sort -k6 -rn
  # The last acks of closing clients may still be on their way: give them a moment.
  sleep 2
  echo "inboxes left unacknowledged in Redis: $(redis-cli -p "$REDIS_PORT" --scan --pattern 'ferry:*:inbox' | wc -l)"
}

# A load run's time limit: connecting, sending, the drain, closing.
run_limit() { echo $((90 + $(secs "$1") + $(secs "$2"))); }

THROUGHPUT=""
throughput() {
  loadtest throughput "$(run_limit "$DURATION" 30s)" run -c "$CONNECTIONS" -r "$RATE" \
    -d "$DURATION" -b "$BODY" --drain 30s --max-in-flight "$MAX_IN_FLIGHT" \
    --ack-interval "$ACK_INTERVAL" --codec "$CODEC" || return 0
  summary "$OUT/throughput.json"
  THROUGHPUT=$(jq -r '.delivered_per_sec | floor' "$OUT/throughput.json")
  if [[ -n "$CEILING" ]]; then
    jq -r --arg c "$CEILING" '"ratio: Ferry delivered \(.delivered_per_sec | floor) msg/s ÷ redis-benchmark \($c | tonumber | floor) append ops/s = \(.delivered_per_sec / ($c | tonumber) * 100 | floor)%"' \
      "$OUT/throughput.json"
  fi
}

# The node's capacity in msg/s: CAPACITY, else this invocation's throughput step (run now if
# it has not run).
capacity() {
  if [[ -n "$CAPACITY" ]]; then
    echo "capacity: $CAPACITY msg/s (CAPACITY)"
    return
  fi
  if [[ -z "$THROUGHPUT" ]]; then
    echo "capacity: no CAPACITY given and no throughput step yet; measuring it first"
    throughput
  fi
  [[ -n "$THROUGHPUT" && "$THROUGHPUT" -gt 0 ]] || {
    echo "bench.sh: no capacity measured" >&2
    exit 2
  }
  CAPACITY=$THROUGHPUT
  echo "capacity: $CAPACITY msg/s (this run's throughput step, codec $CODEC)"
}

# factor × capacity, a whole number of msg/s.
times_capacity() { awk -v c="$CAPACITY" -v f="$1" 'BEGIN { printf "%d\n", c * f }'; }

overload() {
  capacity
  local rate
  rate=$(times_capacity "$OVERLOAD_FACTOR")
  loadtest overload "$(run_limit "$OVERLOAD_DURATION" "$OVERLOAD_DRAIN")" run -c "$CONNECTIONS" \
    -r "$rate" -d "$OVERLOAD_DURATION" -b "$BODY" --drain "$OVERLOAD_DRAIN" --codec "$OVERLOAD_CODEC" \
    --max-in-flight 0 --ack-interval 100ms --on-rate-limited "$OVERLOAD_ON_RATE_LIMITED" || return 0
  summary "$OUT/overload.json"
  jq -r --arg cap "$CAPACITY" --arg factor "$OVERLOAD_FACTOR" '
    ($cap | tonumber) as $c
    | "overload: offered \(.rate_target | floor) msg/s (\($factor) × capacity \($c)) for \(.duration_secs) s; \(.codec), no in-flight cap, acks every \(.ack_interval_ms) ms",
      "  delivered during sending: \(.delivered_per_sec_during_sending | floor) msg/s = \(.delivered_per_sec_during_sending / $c * 100 | floor)% of capacity",
      "  accepted messages (answered sent): \(.sent) of \(.scheduled) scheduled; send→delivery p50 \(.latency_delivery.p50_ms) ms, p99 \(.latency_delivery.p99_ms) ms; send→sent p50 \(.latency_sent.p50_ms) ms, p99 \(.latency_sent.p99_ms) ms",
      "  pushed back: rate_limited answers \(.rate_limited), sends refused \(.sends_refused); send errors by code \(.send_errors)",
      "  by the end of sending: stored (answered sent) \(.sent_during_sending), delivered \(.delivered_during_sending), stored − delivered \(.sent_during_sending - .delivered_during_sending)",
      "  whole run: delivered \(.delivered_per_sec | floor) msg/s, drained in \(.drain_secs * 10 | floor / 10) s (drained: \(.drained))",
      "  delivered per second: \(.delivered_per_second | map(tostring) | join(" "))",
      "  stored per second:    \(.sent_per_second | map(tostring) | join(" "))"
  ' "$OUT/overload.json"
}

acks() {
  capacity
  local rate interval name
  rate=$(times_capacity "$ACKS_LOAD")
  for interval in "$ACKS_FAST" "$ACKS_SLOW"; do
    name="acks-$interval"
    loadtest "$name" "$(run_limit "$ACKS_DURATION" 60s)" run -c "$CONNECTIONS" -r "$rate" \
      -d "$ACKS_DURATION" -b "$BODY" --drain 60s --codec "$OVERLOAD_CODEC" --max-in-flight 0 \
      --ack-interval "$interval" --on-rate-limited "$OVERLOAD_ON_RATE_LIMITED" || return 0
    summary "$OUT/$name.json"
  done
  jq -rn --slurpfile fast "$OUT/acks-$ACKS_FAST.json" --slurpfile slow "$OUT/acks-$ACKS_SLOW.json" \
    --arg f "$ACKS_FAST" --arg s "$ACKS_SLOW" '
    ($fast[0]) as $a | ($slow[0]) as $b
    | def ratio(x; y): if y > 0 then x / y * 100 | floor / 100 else "?" end;
      def us: if . == null then "?" else . * 10 | floor / 10 | tostring end;
    "acks: offered \($a.rate_target | floor) msg/s; delivered during sending \($a.delivered_per_sec_during_sending | floor) msg/s with acks every \($f), \($b.delivered_per_sec_during_sending | floor) with acks every \($s): ratio \(ratio($a.delivered_per_sec_during_sending; $b.delivered_per_sec_during_sending))",
    "  whole run: \($a.delivered_per_sec | floor) vs \($b.delivered_per_sec | floor) msg/s: ratio \(ratio($a.delivered_per_sec; $b.delivered_per_sec)); CPU per delivered message: gateway \($a.cpu_per_message.gateway_us | us) vs \($b.cpu_per_message.gateway_us | us) µs, redis \($a.cpu_per_message.redis_us | us) vs \($b.cpu_per_message.redis_us | us) µs"'
}

codecs() {
  local codec
  for codec in json msgpack; do
    loadtest "codecs-$codec" "$(run_limit "$CODECS_DURATION" 60s)" run -c "$CONNECTIONS" \
      -r "$CODECS_RATE" -d "$CODECS_DURATION" -b "$BODY" --drain 60s --codec "$codec" \
      --max-in-flight 0 --ack-interval "$ACK_INTERVAL" || return 0
    summary "$OUT/codecs-$codec.json"
  done
  for codec in json msgpack; do
    jq -r '
      def us: if . == null then "?" else . * 10 | floor / 10 | tostring end;
      "codecs: \(.codec) at \(.rate_target | floor) msg/s offered: delivered \(.delivered_per_sec_during_sending | floor) msg/s during sending; CPU per delivered message: gateway \(.cpu_per_message.gateway_us | us) µs, redis \(.cpu_per_message.redis_us | us) µs, loadgen \(.cpu_per_message.loadgen_us | us) µs; delivery p99 \(.latency_delivery.p99_ms) ms"
    ' "$OUT/codecs-$codec.json"
  done
}

# --- several gateways and several generator processes (ramp3, storm3) ---

# Starts GENERATORS load generators in the background, each with its share of $2 connections
# and the same mode arguments ($3…), every gateway's URL, and a barrier in $WORK/$1.*; their
# reports go to $OUT/$1-<n>.json. Sets GEN_PIDS.
GEN_PIDS=()
start_generators() {
  local name=$1 total=$2 limit=$3
  shift 3
  local g share urls=()
  for url in "${URLS[@]}"; do
    urls+=(--url "$url")
  done
  rm -f "$WORK/$name".*
  GEN_PIDS=()
  for g in $(seq 1 "$GENERATORS"); do
    share=$((total / GENERATORS + (g <= total % GENERATORS ? 1 : 0)))
    FERRY_JWT_SECRET="$SECRET" timeout "$limit" "$LOADTEST_BIN" --json "$@" -c "$share" \
      "${urls[@]}" --source-addrs "$MULTI_SOURCE_ADDRS" --ready-file "$WORK/$name.ready.$g" \
      --go-file "$WORK/$name.go" >"$OUT/$name-$g.json" 2>"$OUT/$name-$g.log" &
    GEN_PIDS+=("$!")
    PIDS+=("$!")
  done
  echo "$GENERATORS generators (pids ${GEN_PIDS[*]}), $total connections over ${#URLS[@]} gateways"
}

# Waits (up to $2 seconds) until every generator of $1 is at its barrier.
wait_ready() {
  local name=$1 secs=$2 g ready
  for _ in $(seq 1 $((secs * 10))); do
    ready=0
    for g in $(seq 1 "$GENERATORS"); do
      [[ -e "$WORK/$name.ready.$g" ]] && ready=$((ready + 1))
    done
    ((ready == GENERATORS)) && return 0
    for g in "${GEN_PIDS[@]}"; do
      kill -0 "$g" 2>/dev/null || { echo "bench.sh: a $name generator ended early (see $OUT/$name-*.log)" >&2; return 1; }
    done
    sleep 0.1
  done
  echo "bench.sh: the $name generators were not all ready within $secs s" >&2
  return 1
}

# Lets the generators of $1 go on, and waits for them to end.
go_and_wait() {
  local name=$1 pid
  touch "$WORK/$name.go"
  for pid in "${GEN_PIDS[@]}"; do
    wait "$pid" || echo "bench.sh: a $name generator exited with $? (see $OUT/$name-*.log)" >&2
  done
  local kept=()
  for pid in "${PIDS[@]}"; do
    for g in "${GEN_PIDS[@]}"; do
      [[ "$pid" == "$g" ]] && continue 2
    done
    kept+=("$pid")
  done
  PIDS=("${kept[@]}")
  GEN_PIDS=()
}

ramp3() {
  stop_gateway
  start_gateways "$GATEWAYS"
  wait_quiet
  local per_gen=$(((RAMP3_CONNECTIONS + GENERATORS - 1) / GENERATORS))
  local step=$(((per_gen + RAMP3_STEPS - 1) / RAMP3_STEPS))
  echo
  echo "== ramp3: $RAMP3_CONNECTIONS idle connections over $GATEWAYS gateways from $GENERATORS generators (ferry-loadtest ramp --step $step --settle 1s each)"
  local before after started=$SECONDS
  before=$(gateway_rss_bytes)
  start_generators ramp3 "$RAMP3_CONNECTIONS" 900 ramp --step "$step" --settle 1s
  wait_ready ramp3 600 || { go_and_wait ramp3; return 0; }
  sleep 2
  after=$(gateway_rss_bytes)
  local connected open pid
  connected=$(cat "$WORK"/ramp3.ready.* | awk '{ sum += $1 } END { print sum + 0 }')
  open=$(gateway_metric ferry_connections_open)
  for pid in "${GW_PIDS[@]}"; do
    echo "gateway pid $pid: RSS $(awk '/^VmRSS:/ {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status")"
  done
  go_and_wait ramp3
  awk -v b="$before" -v a="$after" -v n="$connected" -v counted="${open:-?}" -v g="$GATEWAYS" \
    -v t=$((SECONDS - started)) 'BEGIN {
      printf "ramp3: %d connections open (the gateways count %s): gateways RSS %.1f → %.1f MiB over %d gateways; %.0f bytes per idle authenticated connection (%d s)\n",
        n, counted, b / 1048576, a / 1048576, g, (n > 0 ? (a - b) / n : 0), t }'
  jq -rs '"generators: \(map(.connected) | add) connected, \(map(.connect_failed) | add) failed\(map(.first_error // empty) | if length > 0 then "; first error: " + .[0] else "" end)"' \
    "$OUT"/ramp3-*.json
}

storm3() {
  stop_gateway
  start_gateways "$GATEWAYS"
  wait_quiet
  echo
  echo "== storm3: $STORM3_CONNECTIONS clients over $GATEWAYS gateways from $GENERATORS generators (ferry-loadtest storm --backlog $STORM_BACKLOG each), all resuming at one instant"
  local started=$SECONDS
  start_generators storm3 "$STORM3_CONNECTIONS" 900 storm --backlog "$STORM_BACKLOG" --timeout 120s
  wait_ready storm3 600 || { go_and_wait storm3; return 0; }
  echo "every generator connected, dropped its clients and stored their backlog ($(cat "$WORK"/storm3.ready.* | awk '{ n += $1; s += $2 } END { print n " clients, " s " messages" }'))"
  wait_quiet
  cpu_mark
  local go_ms
  go_ms=$(date +%s%3N)
  go_and_wait storm3
  cpu_report
  echo "(the generators' CPU is in other)"
  jq -rs --arg go "$go_ms" --arg t "$((SECONDS - started))" '
    ($go | tonumber) as $go
    | def at(f): map(.storm_unix_ms + (f // 1e9) * 1000) | max - $go | floor / 1000;
    "storm3: \(map(.reconnected) | add) of \(map(.connections) | add) resumed in \(at(.resumed_secs)) s, caught up (\(map(.stored) | add) messages) in \(if any(.caught_up_secs == null) then "— (a generator timed out)" else "\(at(.caught_up_secs)) s" end) from the go (the slowest generator); lost \(map(.lost) | add), out of order \(map(.out_of_order) | add), duplicates \(map(.duplicates) | add), reconnects failed \(map(.reconnect_failed) | add) (\($t) s in all)",
    "  per generator: resumed \(map(.resumed_secs * 100 | floor / 100) | map(tostring) | join(", ")) s; caught up \(map(.caught_up_secs // "—" | if type == "number" then . * 100 | floor / 100 else . end) | map(tostring) | join(", ")) s; started \(map(.storm_unix_ms - $go) | map(tostring) | join(", ")) ms after the go"
  ' "$OUT"/storm3-*.json
}

latency() {
  loadtest latency "$(run_limit "$LATENCY_DURATION" 30s)" run -c "$CONNECTIONS" \
    -r "$LATENCY_RATE" -d "$LATENCY_DURATION" -b "$BODY" --drain 30s \
    --ack-interval "$ACK_INTERVAL" --codec "$CODEC" || return 0
  summary "$OUT/latency.json"
}

ramp() {
  loadtest ramp 300 ramp -c "$RAMP_CONNECTIONS" --step "$RAMP_STEP" --settle 2s || return 0
  jq -r '.steps[] | "\(.connections) connections: gateway RSS \(.gateway_rss_bytes / 1048576 * 10 | floor / 10) MiB"' "$OUT/ramp.json"
  jq -r '"gateway RSS per idle authenticated connection: \(.gateway_bytes_per_connection | floor) bytes (\(.connected) connected, \(.connect_failed) failed)"' "$OUT/ramp.json"
}

storm() {
  loadtest storm 300 storm -c "$STORM_CONNECTIONS" --backlog "$STORM_BACKLOG" --timeout 120s || return 0
  jq -r '"storm: \(.reconnected) of \(.connections) resumed in \(.resumed_secs) s, caught up (\(.stored) messages) in \(.caught_up_secs) s; lost \(.lost), out of order \(.out_of_order)"' "$OUT/storm.json"
}

# The same load on the standalone Redis and on a Redis Cluster of 3 primaries (no replicas, like
# the standalone server), each with a fresh gateway: Redis CPU per delivered message (the sum
# over the cluster's nodes), and how it spreads over the shards (CPU and append calls per node).
CLUSTER_PIDS=()
cluster_run() {
  local name=$1
  shift
  local -a pids=("$@") before=() after=()
  local pid i
  stop_gateway
  start_gateway
  wait_quiet
  echo
  echo "== $name: ferry-loadtest run -c $CONNECTIONS -r $CLUSTER_RATE -d $CLUSTER_DURATION"
  for pid in "${pids[@]}"; do before+=("$(proc_ticks "$pid")"); done
  FERRY_JWT_SECRET="$SECRET" timeout "$(run_limit "$CLUSTER_DURATION" 30s)" "$LOADTEST_BIN" --json \
    run -c "$CONNECTIONS" -r "$CLUSTER_RATE" -d "$CLUSTER_DURATION" -b "$BODY" --drain 30s \
    --max-in-flight "$MAX_IN_FLIGHT" --ack-interval "$ACK_INTERVAL" --codec "$CODEC" \
    --url "$URL" --gateway-pid "$GW_PID" --source-addrs "$SOURCE_ADDRS" >"$OUT/$name.json" || true
  for pid in "${pids[@]}"; do after+=("$(proc_ticks "$pid")"); done
  [[ -s "$OUT/$name.json" ]] || { echo "bench.sh: $name produced no report" >&2; return 1; }
  jq -r '"delivered \(.delivered) (\(.delivered_per_sec | floor) msg/s); lost \(.lost), out of order \(.out_of_order), errors \(.send_errors); gateway \(.cpu_per_message.gateway_us * 10 | floor / 10) µs CPU per message"' \
    "$OUT/$name.json"
  local delivered total=0 ticks
  delivered=$(jq -r '.delivered' "$OUT/$name.json")
  for i in "${!pids[@]}"; do
    ticks=$((after[i] - before[i]))
    total=$((total + ticks))
    CLUSTER_TICKS[i]=$ticks
  done
  # Clock ticks are 1/100 s.
  awk -v t="$total" -v d="$delivered" -v n="${#pids[@]}" 'BEGIN {
    printf "redis CPU per delivered message: %.2f µs (%d node%s, %.1f s of CPU in all)\n",
      t * 10000 / (d > 0 ? d : 1), n, (n > 1 ? "s" : ""), t / 100 }'
}

cluster() {
  # Standalone first, on the script's own Redis.
  GATEWAY_REDIS=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  CLUSTER_TICKS=()
  cluster_run cluster-standalone "$REDIS_PID" || return 0

  # Three primaries, each on a free port whose bus port (+10000) is free too.
  local ports=() port i seeds=() calls
  while [[ ${#ports[@]} -lt 3 ]]; do
    port=$(free_port)
    (exec 3<>"/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null && continue
    ports+=("$port")
  done
  CLUSTER_PIDS=()
  for port in "${ports[@]}"; do
    mkdir -p "$WORK/redis/c$port"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK/redis/c$port" --save '' \
      --appendonly "$APPENDONLY" --logfile "$WORK/redis/c$port/redis.log" --maxclients 10000 \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 &
    PIDS+=("$!")
    CLUSTER_PIDS+=("$!")
    seeds+=("redis://127.0.0.1:$port")
  done
  sleep 0.5
  for i in "${!ports[@]}"; do
    if ! kill -0 "${CLUSTER_PIDS[i]}" 2>/dev/null; then
      echo "bench.sh: the cluster node on ${ports[i]} exited:" >&2
      tail -5 "$WORK/redis/c${ports[i]}/redis.log" >&2
      return 1
    fi
    wait_for 10 redis-cli -p "${ports[i]}" ping
  done
  redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
  for port in "${ports[@]}"; do
    wait_for 30 bash -c "redis-cli -p $port CLUSTER INFO | grep -q cluster_state:ok"
  done
  echo "redis cluster: 3 primaries on ${ports[*]} (pids ${CLUSTER_PIDS[*]})"
  GATEWAY_REDIS=(--redis-cluster --redis-url "$(IFS=,; echo "${seeds[*]}")")
  for port in "${ports[@]}"; do redis-cli -p "$port" CONFIG RESETSTAT >/dev/null; done
  CLUSTER_TICKS=()
  cluster_run cluster-3-primaries "${CLUSTER_PIDS[@]}" || true
  # Spread: each shard's share of the CPU and of the append calls (EVALSHA, EVAL).
  local total_ticks=0 total_calls=0 shard_calls=()
  for i in "${!ports[@]}"; do
    calls=$(redis-cli -p "${ports[i]}" INFO commandstats | tr -d '\r' |
      awk -F'[:=,]' '/^cmdstat_(evalsha|eval):/ {c += $3} END {print c + 0}')
    shard_calls+=("$calls")
    total_ticks=$((total_ticks + ${CLUSTER_TICKS[i]:-0}))
    total_calls=$((total_calls + calls))
  done
  for i in "${!ports[@]}"; do
    awk -v p="${ports[i]}" -v t="${CLUSTER_TICKS[i]:-0}" -v tt="$total_ticks" \
      -v c="${shard_calls[i]}" -v tc="$total_calls" 'BEGIN {
        printf "  shard on %s: %4.1f%% of the Redis CPU, %4.1f%% of the script calls (%d)\n",
          p, 100 * t / (tt > 0 ? tt : 1), 100 * c / (tc > 0 ? tc : 1), c }'
  done
  stop_gateway
  GATEWAY_REDIS=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  for i in "${!CLUSTER_PIDS[@]}"; do
    kill "${CLUSTER_PIDS[i]}" 2>/dev/null || true
    wait "${CLUSTER_PIDS[i]}" 2>/dev/null || true
  done
  CLUSTER_PIDS=()
  jq -rs '
    def f: . * 100 | floor / 100;
    "cluster vs standalone at the same offered load: delivered \(.[1].delivered) vs \(.[0].delivered); gateway CPU per message \(.[1].cpu_per_message.gateway_us | f) vs \(.[0].cpu_per_message.gateway_us | f) µs"
  ' "$OUT/cluster-standalone.json" "$OUT/cluster-3-primaries.json"
}

for step in "${STEPS[@]}"; do
  case "$step" in
  ceiling | throughput | latency | overload | acks | codecs | ramp | storm | ramp3 | storm3 | cluster) ;;
  *)
    echo "bench.sh: unknown step $step" >&2
    exit 2
    ;;
  esac
done
for step in "${STEPS[@]}"; do
  step_started=$SECONDS
  "$step"
  echo "($step: $((SECONDS - step_started)) s, waiting for a quiet machine included)"
done
echo
echo "reports: $OUT"

#!/usr/bin/env bash
# Ferry's one-machine benchmark: starts its own redis-server (free loopback port, temp dir, no
# snapshots) and a release gateway on it, measures the Redis ceiling for Ferry's own append
# script with redis-benchmark (EVALSHA, pipelined), runs the load generator, and prints Ferry's
# delivered throughput beside that ceiling as a ratio. Then, optionally, a latency run, a
# connection ramp and a reconnect storm. Everything it starts is stopped by PID on exit; every
# step is bounded in time; all traffic stays on loopback.
#
# Usage: loadtest/bench.sh [step...]   steps: ceiling throughput latency ramp storm
#        (default: ceiling throughput latency)
# Settings (environment):
#   CONNECTIONS=1000 RATE=60000 DURATION=20s BODY=100       throughput run
#   LATENCY_RATE=20000 LATENCY_DURATION=20s                 latency run (same connections)
#   RAMP_CONNECTIONS=10000 RAMP_STEP=2000                   ramp
#   STORM_CONNECTIONS=5000 STORM_BACKLOG=10                 storm
#   ACK_INTERVAL=100ms (the clients' ack coalescing; each ack is one trim in Redis)
#   SOURCE_ADDRS=4 CEILING_REQUESTS=2000000 APPENDONLY=no (yes: appendfsync everysec)
#   SKIP_BUILD=1 (use the existing release binaries)  OUT=dir (keep JSON reports there)
#   GATEWAY_BIN=path (another gateway build, e.g. an older commit's, to compare in one session)
# Needs: cargo, redis-server, redis-cli, redis-benchmark, curl, jq.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS=("${@:-ceiling throughput latency}")
read -r -a STEPS <<<"${STEPS[*]}"
CONNECTIONS=${CONNECTIONS:-1000}
RATE=${RATE:-60000}
DURATION=${DURATION:-20s}
BODY=${BODY:-100}
LATENCY_RATE=${LATENCY_RATE:-20000}
LATENCY_DURATION=${LATENCY_DURATION:-20s}
RAMP_CONNECTIONS=${RAMP_CONNECTIONS:-10000}
RAMP_STEP=${RAMP_STEP:-2000}
STORM_CONNECTIONS=${STORM_CONNECTIONS:-5000}
STORM_BACKLOG=${STORM_BACKLOG:-10}
SOURCE_ADDRS=${SOURCE_ADDRS:-4}
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
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/ferry-gateway}
LOADTEST_BIN="$ROOT/target/release/ferry-loadtest"

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

# --- gateway: a fresh one for every step, so no step inherits another's heap ---
GW_PID=""
start_gateway() {
  GW_PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  FERRY_LOG=${FERRY_LOG:-warn} "$GATEWAY_BIN" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --jwt-secret "$SECRET" --listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --send-rate 1000000 --send-burst 1000000 --max-connections 100000 --node-id bench \
    --drain-timeout 1s >>"$WORK/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_for 20 curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz"
  redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
  URL="ws://127.0.0.1:$GW_PORT/v1/ws"
  echo "ferry-gateway pid $GW_PID on 127.0.0.1:$GW_PORT"
}
stop_gateway() {
  [[ -n "$GW_PID" ]] || return 0
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
  local pid kept=()
  for pid in "${PIDS[@]}"; do
    [[ "$pid" == "$GW_PID" ]] || kept+=("$pid")
  done
  PIDS=("${kept[@]}")
  GW_PID=""
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
}

# Machine-wide busy CPU ticks and total ticks (/proc/stat), and a process's CPU ticks.
machine_ticks() {
  local _cpu a b c d e f g h
  read -r _cpu a b c d e f g h _ </proc/stat
  echo "$((a + b + c + e + f + g + h + d)) $((d + e))"
}
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

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
cpu_mark() { CPU_MARK=($(machine_ticks) "$(proc_ticks "${GW_PID:-0}")" "$(proc_ticks "$REDIS_PID")" "$(date +%s%N)"); }
cpu_report() {
  local t0=${CPU_MARK[0]} i0=${CPU_MARK[1]} g0=${CPU_MARK[2]} r0=${CPU_MARK[3]} n0=${CPU_MARK[4]}
  local t1 i1 g1 r1 n1
  read -r t1 i1 < <(machine_ticks)
  g1=$(proc_ticks "${GW_PID:-0}")
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
    --url "$URL" --gateway-pid "$GW_PID" --source-addrs "$SOURCE_ADDRS" \
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
  # KEYS: inbox, meta, dedupe; ARGV: payload, max_inbox, epoch, dedupe ms, ttl ms, channel.
  # A random inbox per call (one in a million users) and a dedupe key unique per call; a huge
  # max_inbox so the script always stores. Payload ≈ Ferry's record for a 100-byte body.
  local payload
  payload=$(head -c "$BODY" /dev/zero | tr '\0' 'x')
  payload="$payload-from-lt-bench-0000-id-0000000"
  wait_quiet
  cpu_mark
  timeout 120 redis-benchmark -p "$REDIS_PORT" -c 50 -P 16 -r 1000000 -n "$CEILING_REQUESTS" --csv \
    EVALSHA "$sha" 3 'bench:{u:__rand_int__}:inbox' 'bench:{u:__rand_int__}:meta' \
    'bench:dedupe:__rand_int__:__rand_int__' "$payload" 1000000000 e1 60000 2592000000 \
    'bench:live' >"$OUT/ceiling.csv"
  CEILING=$(tail -n 1 "$OUT/ceiling.csv" | cut -d, -f2 | tr -d '"')
  echo "redis-benchmark EVALSHA append: $CEILING ops/s (-c 50 -P 16, $CEILING_REQUESTS calls)"
  cpu_report
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
}

summary() {
  jq -r '"delivered \(.delivered_per_sec | floor) msg/s (sent \(.sent_per_sec | floor)); lost \(.lost), dup \(.duplicates), out of order \(.out_of_order), errors \(.send_errors)\ndelivery ms p50 \(.latency_delivery.p50_ms) p90 \(.latency_delivery.p90_ms) p99 \(.latency_delivery.p99_ms) p99.9 \(.latency_delivery.p999_ms) max \(.latency_delivery.max_ms)\nsent ms     p50 \(.latency_sent.p50_ms) p99 \(.latency_sent.p99_ms)\ngateway CPU \(.gateway.cores * 100 | floor)% of a core, RSS \(.gateway.after.rss_bytes / 1048576 | floor) MiB; loadgen CPU \(.loadgen.cores * 100 | floor)%"' "$1"
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

for step in "${STEPS[@]}"; do
  case "$step" in
  ceiling) ceiling ;;
  throughput)
    loadtest throughput 180 run -c "$CONNECTIONS" -r "$RATE" -d "$DURATION" -b "$BODY" --drain 30s \
      --max-in-flight 200 --ack-interval "$ACK_INTERVAL" || continue
    summary "$OUT/throughput.json"
    if [[ -n "$CEILING" ]]; then
      jq -r --arg c "$CEILING" '"ratio: Ferry delivered \(.delivered_per_sec | floor) msg/s ÷ redis-benchmark \($c | tonumber | floor) append ops/s = \(.delivered_per_sec / ($c | tonumber) * 100 | floor)%"' \
        "$OUT/throughput.json"
    fi
    ;;
  latency)
    loadtest latency 180 run -c "$CONNECTIONS" -r "$LATENCY_RATE" -d "$LATENCY_DURATION" -b "$BODY" \
      --drain 30s --ack-interval "$ACK_INTERVAL" || continue
    summary "$OUT/latency.json"
    ;;
  ramp)
    loadtest ramp 300 ramp -c "$RAMP_CONNECTIONS" --step "$RAMP_STEP" --settle 2s || continue
    jq -r '.steps[] | "\(.connections) connections: gateway RSS \(.gateway_rss_bytes / 1048576 * 10 | floor / 10) MiB"' "$OUT/ramp.json"
    jq -r '"gateway RSS per idle authenticated connection: \(.gateway_bytes_per_connection | floor) bytes (\(.connected) connected, \(.connect_failed) failed)"' "$OUT/ramp.json"
    ;;
  storm)
    loadtest storm 300 storm -c "$STORM_CONNECTIONS" --backlog "$STORM_BACKLOG" --timeout 120s || continue
    jq -r '"storm: \(.reconnected) of \(.connections) resumed in \(.resumed_secs) s, caught up (\(.stored) messages) in \(.caught_up_secs) s; lost \(.lost), out of order \(.out_of_order)"' "$OUT/storm.json"
    ;;
  *)
    echo "bench.sh: unknown step $step" >&2
    exit 2
    ;;
  esac
done
echo
echo "reports: $OUT"

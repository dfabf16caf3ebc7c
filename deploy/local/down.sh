#!/usr/bin/env bash
# Stop the local Ferry cluster started by up.sh, by the PIDs it recorded in the state dir:
# SIGTERM, wait, SIGKILL after a bound. Idempotent: running it again stops nothing and says so.
set -euo pipefail

STATE=${FERRY_LOCAL_DIR:-/tmp/ferry-local}
BOUND=${FERRY_LOCAL_STOP_TIMEOUT:-15} # seconds to wait after SIGTERM before SIGKILL

log() { printf 'down.sh: %s\n' "$*"; }

if [[ ! -d "$STATE/pids" ]]; then
    log "nothing to stop (no $STATE/pids)"
    exit 0
fi

# alive NAME: the PID recorded in pids/NAME.pid, if it still runs the recorded program.
alive() {
    local f="$STATE/pids/$1.pid" pid comm
    [[ -e "$f" ]] || return 1
    read -r pid comm <"$f" || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # Guard against PID reuse: the process must still be the program up.sh started.
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    # An exited process not yet reaped by its parent (a zombie) holds nothing: count it as stopped.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
    echo "$pid"
}

# stop NAME...: SIGTERM all of them at once, wait up to BOUND seconds, then SIGKILL the rest.
stop() {
    local name pid names=() t
    for name in "$@"; do
        if pid=$(alive "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            log "SIGTERM $name (PID $pid)"
            names+=("$name")
        elif [[ -e "$STATE/pids/$name.pid" ]]; then
            log "$name: not running (stale $STATE/pids/$name.pid)"
            rm -f "$STATE/pids/$name.pid"
        fi
    done
    t=$((SECONDS + BOUND))
    for name in "${names[@]}"; do
        while pid=$(alive "$name"); do
            if ((SECONDS >= t)); then
                kill -KILL "$pid" 2>/dev/null || true
                log "SIGKILL $name (PID $pid): still running ${BOUND}s after SIGTERM"
                for _ in $(seq 1 50); do # up to 5 s for the kernel to tear it down
                    alive "$name" >/dev/null || break
                    sleep 0.1
                done
                break
            fi
            sleep 0.1
        done
        if pid=$(alive "$name"); then
            log "WARNING: $name (PID $pid) is still running"
        else
            log "stopped $name"
            stopped=$((stopped + 1))
            rm -f "$STATE/pids/$name.pid"
        fi
    done
}

# named PATTERN: the names of the recorded processes whose name matches PATTERN (gw-*, redis-*).
named() {
    local f n
    for f in "$STATE"/pids/$1.pid; do
        [[ -e "$f" ]] || continue
        n=${f##*/}
        echo "${n%.pid}"
    done
}

stopped=0
mapfile -t gateways < <(named 'gw-*')
# A Redis Cluster's nodes (up.sh --cluster): redis-1, redis-2, ...
mapfile -t redis_nodes < <(named 'redis-*')

# Front to back: the load balancer and the scraper first, then the nodes (which drain), Redis last.
stop haproxy prometheus
((${#gateways[@]} == 0)) || stop "${gateways[@]}"
stop redis ${redis_nodes[@]+"${redis_nodes[@]}"}

left=()
for f in "$STATE"/pids/*.pid; do [[ -e "$f" ]] && left+=("$f"); done
if ((${#left[@]})); then
    log "some processes did not stop: ${left[*]}"
    exit 1
fi
if ((stopped == 0)); then
    log "nothing was running"
else
    log "stopped $stopped process(es); logs and data kept in $STATE (delete it for a clean start)"
fi

# The fault suite's scenarios on a Redis Cluster (deploy/faults/run.sh --cluster): sourced by
# run.sh, whose machinery (the local cluster per scenario, the load, the judge) runs them. The
# cluster is deploy/local/up.sh --cluster: 3 primaries with 1 replica each (redis-1..redis-6,
# ports CLUSTER_BASE..CLUSTER_BASE+5), AOF with fsync always, cluster-node-timeout 1.5 s, and the
# 3 gateway nodes started with --redis-cluster and all six nodes as seeds.
# shellcheck shell=bash
# shellcheck disable=SC2034 # PAUSED_PID is run.sh's: its teardown resumes a node left frozen

# How many slots cluster-reshard moves (redis-cli --cluster reshard moves a primary's lowest ones).
RESHARD_SLOTS=${FERRY_FAULTS_RESHARD_SLOTS:-3000}
# Longest wait for the cluster to promote a replica, or to settle after a change.
SETTLE_LIMIT=30

# --- where things are ------------------------------------------------------------------------------
node_name() { echo "redis-$(($1 - CLUSTER_BASE + 1))"; } # PORT: redis-I
node_alive() {                                            # PORT: its recorded redis-server runs
    local pid
    pid=$(pid_of "$(node_name "$1")")
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != [TtZ] ]]
}
running_ports() {
    local p
    for p in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + CLUSTER_NODES - 1))); do
        if node_alive "$p"; then echo "$p"; fi
    done
}
any_port() { running_ports | head -n 1; }
# shellcheck disable=SC2046 # one argument per port
settled() { cluster_settled $(running_ports); }
node_id() { cluster_table "$(any_port)" | awk -v p="$1" '$1 == p { print $2 }'; }
label() { echo "$(node_name "$1") (127.0.0.1:$1)"; } # PORT, for humans

# cluster_snapshot: what each node says of the cluster and of its replication.
cluster_snapshot() {
    local p
    for p in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + CLUSTER_NODES - 1))); do
        echo "### $(label "$p")"
        if ! node_alive "$p"; then
            echo "(not running)"
            continue
        fi
        rc_cli "$p" CLUSTER INFO | grep -E '^cluster_(state|slots_ok|slots_pfail|slots_fail|known_nodes|current_epoch|my_epoch):'
        rc_cli "$p" INFO replication | grep -E '^(role|master_host|master_port|master_link_status|master_sync_in_progress|master_repl_offset|connected_slaves|slave[0-9]+):'
        echo "port id role primary state slots"
        cluster_table "$p"
    done
}

# --- the test users' slots ------------------------------------------------------------------------
# user_slots: "user slot" for each of the run's users (their keys share the tag `{u:<user>}`),
# asked once of the cluster (CLUSTER KEYSLOT) and kept in $STATE/user-slots.txt.
user_slots() {
    local n
    if [[ ! -s "$STATE/user-slots.txt" ]]; then
        for n in $(seq 0 $((CLIENTS - 1))); do
            echo "CLUSTER KEYSLOT ferry:{u:lt-$RUN_ID-$n}:meta"
        done | timeout -k 1 10 redis-cli -h 127.0.0.1 -p "$(any_port)" 2>&1 | tr -d '\r' |
            awk -v id="$RUN_ID" '{ print "lt-" id "-" (NR - 1), $1 }' >"$STATE/user-slots.txt"
    fi
    cat "$STATE/user-slots.txt"
}
# users_in RANGES: how many of the run's users have their slot in RANGES ("0-99,200-299").
users_in() {
    user_slots | awk -v ranges="$1" '
        BEGIN { n = split(ranges, r, ",") }
        { for (i = 1; i <= n; i++) { split(r[i], b, "-"); hi = (b[2] == "" ? b[1] : b[2])
              if ($2 + 0 >= b[1] + 0 && $2 + 0 <= hi + 0) { c++; break } } }
        END { print c + 0 }'
}
slots_of() { cluster_table "$(any_port)" | awk -v p="$1" '$1 == p { print $6 }'; } # PORT: its ranges
users_of() { users_in "$(slots_of "$1")"; }                                       # PORT: its users
# busiest_primary: the primary serving the most test users (the fault hits it).
busiest_primary() {
    local p best="" most=-1 n
    for p in $(cluster_primaries "$(any_port)"); do
        n=$(users_of "$p")
        if ((n > most)); then best=$p most=$n; fi
    done
    echo "$best"
}

# took_over PORT: node PORT says it is a primary (INFO replication: role:master).
took_over() { [[ "$(rc_field "$1" role INFO replication)" == master ]]; }
# since T: seconds from $EPOCHREALTIME T until now.
since() { awk -v s="$1" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.1f", now - s }'; }
# promoted PORT: every running node sees PORT as a primary serving slots, and the cluster settled.
promoted() {
    local p
    settled >/dev/null || return 1
    for p in $(running_ports); do
        cluster_table "$p" | awk -v n="$1" '$1 == n && $3 == "primary" && $6 != "-" { ok = 1 } END { exit !ok }' ||
            return 1
    done
}
# replica_in_sync PORT PRIMARY: PORT is PRIMARY's replica, in sync, and the cluster settled.
replica_in_sync() {
    settled >/dev/null &&
        [[ "$(rc_field "$1" role INFO replication)" == slave &&
            "$(rc_field "$1" master_port INFO replication)" == "$2" ]]
}
# topology_seen BEFORE: the nodes counted a change of the slot map since BEFORE.
topology_seen() { (($(metric_sum ferry_live_topology_changes_total) > $1)); }

# rejoin PORT PRIMARY: restart the stopped node PORT (up.sh --restart, same port, data and cluster
# config); it comes back as PRIMARY's replica and resyncs from it.
rejoin() {
    local took
    "$LOCAL/up.sh" --restart "$(node_name "$1")" >>"$STATE/restart.log" 2>&1
    check $? "$(label "$1") restarted (up.sh --restart), answers PING, sees the cluster ok"
    took=$(wait_until "$SETTLE_LIMIT" replica_in_sync "$1" "$2")
    check $? "$(label "$1") is back as the replica of $(label "$2"), in sync (${took:-—} s)"
    note "rejoined_secs=${took:-}"
}
# wait_topology_seen BEFORE: check that the nodes saw the new slot map.
wait_topology_seen() {
    local took
    took=$(wait_until 10 topology_seen "$1")
    check $? "the nodes saw the new slot map (ferry_live_topology_changes_total: $1 -> $(metric_sum ferry_live_topology_changes_total), ${took:-—} s after the cluster settled)"
}

# --- the faults ------------------------------------------------------------------------------------

# cluster-primary-kill: SIGKILL the primary serving the most test users; the cluster promotes its
# replica. Then the killed node is restarted and comes back as the new primary's replica.
fault_cluster-primary-kill() {
    local primary replica pid took users topo slots t_kill settled_in
    primary=$(busiest_primary)
    replica=$(cluster_replica_of "$primary" "$primary")
    users=$(users_of "$primary")
    topo=$(metric_sum ferry_live_topology_changes_total)
    pid=$(pid_of "$(node_name "$primary")")
    slots=$(slots_of "$primary")
    kill -KILL "$pid"
    t_kill=$EPOCHREALTIME
    log "SIGKILL $(label "$primary"), primary of slots $slots ($users test users); waiting for its replica $(label "$replica")"
    wait_until "$SETTLE_LIMIT" took_over "$replica" >/dev/null
    check $? "the cluster promoted the replica $(label "$replica") ($(since "$t_kill") s after the kill)"
    took=$(since "$t_kill")
    wait_until "$SETTLE_LIMIT" promoted "$replica" >/dev/null
    check $? "every node sees it serving slots $slots, the cluster settled ($(since "$t_kill") s after the kill)"
    settled_in=$(since "$t_kill")
    note "failover_secs=$took"
    note "settled_secs=$settled_in"
    note "users_on_shard=$users"
    note "summary=SIGKILL $(node_name "$primary") ($users users); $(node_name "$replica") promoted $took s after, cluster settled after $settled_in s"
    log "failover: $(label "$replica") took over $took s after the kill; settled after $settled_in s"
    wait_topology_seen "$topo"
    rejoin "$primary" "$replica"
}

# cluster-failover: CLUSTER FAILOVER on the replica of the primary serving the most test users: a
# coordinated failover (the primary stops writes, the replica catches up, then takes over).
fault_cluster-failover() {
    local primary replica took settled_in users answer topo t0
    primary=$(busiest_primary)
    replica=$(cluster_replica_of "$primary" "$primary")
    users=$(users_of "$primary")
    topo=$(metric_sum ferry_live_topology_changes_total)
    t0=$EPOCHREALTIME
    answer=$(rc_cli "$replica" CLUSTER FAILOVER)
    log "CLUSTER FAILOVER on $(label "$replica"), replica of $(label "$primary") ($users test users): $answer"
    [[ "$answer" == OK ]]
    check $? "CLUSTER FAILOVER accepted by $(label "$replica") ($answer)"
    wait_until "$SETTLE_LIMIT" took_over "$replica" >/dev/null
    check $? "$(label "$replica") took over ($(since "$t0") s after CLUSTER FAILOVER)"
    took=$(since "$t0")
    wait_until "$SETTLE_LIMIT" promoted "$replica" >/dev/null &&
        wait_until "$SETTLE_LIMIT" replica_in_sync "$primary" "$replica" >/dev/null
    check $? "every node sees it serving the slots and the former primary $(label "$primary") is its replica, in sync ($(since "$t0") s)"
    settled_in=$(since "$t0")
    note "failover_secs=$took"
    note "settled_secs=$settled_in"
    note "users_on_shard=$users"
    note "summary=CLUSTER FAILOVER to $(node_name "$replica") ($users users): took over after $took s, settled after $settled_in s"
    wait_topology_seen "$topo"
}

# lowest_slots RANGES N: the lowest N slots of RANGES, as ranges (what redis-cli --cluster reshard
# moves from a single source).
lowest_slots() {
    awk -v ranges="$1" -v want="$2" 'BEGIN {
        n = split(ranges, r, ",")
        for (i = 1; i <= n && want > 0; i++) {
            split(r[i], b, "-"); lo = b[1] + 0; hi = (b[2] == "" ? b[1] : b[2]) + 0
            if (hi - lo + 1 > want) hi = lo + want - 1
            out = out (out == "" ? "" : ",") lo "-" hi
            want -= hi - lo + 1
        }
        print out
    }'
}

# cluster-reshard: RESHARD_SLOTS slots (about 18 % of them) move from one primary to another with
# redis-cli --cluster reshard while their users send and receive: keys move with MIGRATE, the
# slots change owner, and Redis drops the moved slots' shard channel subscriptions.
fault_cluster-reshard() {
    local p from="" to="" best=-1 n moving="" users took rc topo first last moved_in t0
    for p in $(cluster_primaries "$(any_port)"); do
        n=$(users_in "$(lowest_slots "$(slots_of "$p")" "$RESHARD_SLOTS")")
        if ((n > best)); then from=$p best=$n; fi
    done
    moving=$(lowest_slots "$(slots_of "$from")" "$RESHARD_SLOTS")
    users=$best
    for p in $(cluster_primaries "$(any_port)"); do
        [[ "$p" == "$from" ]] || { to=$p; break; }
    done
    topo=$(metric_sum ferry_live_topology_changes_total)
    log "resharding: slots $moving ($users test users) from $(label "$from") to $(label "$to")"
    t0=$EPOCHREALTIME
    timeout -k 5 120 redis-cli --cluster reshard "127.0.0.1:$from" --cluster-from "$(node_id "$from")" \
        --cluster-to "$(node_id "$to")" --cluster-slots "$RESHARD_SLOTS" --cluster-yes \
        >"$STATE/reshard.log" 2>&1 </dev/null
    rc=$?
    moved_in=$(since "$t0")
    check $rc "redis-cli --cluster reshard ran to its end in $moved_in s (exit $rc; see reshard.log)"
    log "reshard done in $moved_in s (exit $rc): $(grep -c '^Moving slot' "$STATE/reshard.log") slots moved"
    took=$(wait_until "$SETTLE_LIMIT" settled)
    check $? "the cluster settled after the reshard (${took:-—} s)"
    first=${moving%%-*} last=${moving##*-}
    [[ "$(cluster_owner "$(any_port)" "$first")" == "$to" && "$(cluster_owner "$(any_port)" "$last")" == "$to" ]]
    check $? "the slots $moving are served by $(label "$to")"
    ((users * 10 >= CLIENTS))
    check $? "the moved slots held a good share of the test users: $users of $CLIENTS (at least 10 %)"
    note "reshard_slots=$RESHARD_SLOTS"
    note "reshard_secs=$moved_in"
    note "users_moved=$users"
    note "summary=$RESHARD_SLOTS slots ($users users) moved $(node_name "$from") -> $(node_name "$to") in $moved_in s"
    wait_topology_seen "$topo"
}

# cluster-pubsub-kill: CLIENT KILL TYPE pubsub on every primary, five times a second apart: each
# node's shard pub/sub connection to every primary is cut, and must be made again, resubscribing
# each slot's users, and the sessions resync from their inboxes.
fault_cluster-pubsub-kill() {
    local round p n total=0 first="" primaries
    primaries=$(cluster_primaries "$(any_port)")
    for round in 1 2 3 4 5; do
        for p in $primaries; do
            n=$(rc_cli "$p" CLIENT KILL TYPE pubsub)
            [[ "$n" =~ ^[0-9]+$ ]] || n=0
            total=$((total + n))
            if ((round == 1)); then first+="${first:+ }$n"; fi
        done
        log "CLIENT KILL TYPE pubsub on every primary (round $round): $total so far"
        sleep 1
    done
    note "pubsub_killed=$total"
    note "summary=5 rounds of CLIENT KILL TYPE pubsub on the 3 primaries: $total connections cut"
    # Each of the 3 nodes holds one connection to each primary that serves some of its users.
    local every=1
    for n in $first; do ((n >= NODES)) || every=0; done
    ((every))
    check $? "the first round cut every node's connection to each primary (per primary: $first)"
}

# cluster-async-loss: a primary is lost with asynchronous replication, and its replica, promoted,
# lacks the last REPLICA_LAG seconds of writes. The replica is frozen (SIGSTOP) and the primary
# drops its link to it (CLIENT KILL TYPE replica), so that nothing the primary writes from then on
# reaches the replica; REPLICA_LAG seconds later the primary is killed (SIGKILL) and the replica
# resumed (SIGCONT); the cluster promotes it (CLUSTER FAILOVER TAKEOVER on it if it has not within
# 15 s). What the primary took after the cut is gone; Ferry must report it through `reset`.
# cluster-async-loss-acked: the same with the gateways at --min-replicas-ack 1, where no append is
# answered `sent` before the replica has it, so nothing answered `sent` may be lost.
setup_cluster-async-loss() { data_loss_load; }
setup_cluster-async-loss-acked() {
    # The offline users too, without --allow-reported-loss: nothing may be lost, even for them.
    offline_load
    export FERRY_LOCAL_GATEWAY_ARGS="--min-replicas-ack 1"
}
fault_cluster-async-loss() { async_loss; }
fault_cluster-async-loss-acked() { async_loss; }
async_loss() {
    local primary replica ppid rpid users took killed off_cut off_kill takeover=0 topo t_kill
    primary=$(busiest_primary)
    replica=$(cluster_replica_of "$primary" "$primary")
    users=$(users_of "$primary")
    topo=$(metric_sum ferry_live_topology_changes_total)
    ppid=$(pid_of "$(node_name "$primary")")
    rpid=$(pid_of "$(node_name "$replica")")
    kill -STOP "$rpid"
    PAUSED_PID=$rpid
    # The replica has what the primary wrote before this: that must not be lost.
    note "loss_from_unix_ms=$(now_ms)"
    off_cut=$(rc_field "$primary" master_repl_offset INFO replication)
    killed=$(rc_cli "$primary" CLIENT KILL TYPE replica)
    log "froze the replica $(label "$replica") and cut its link (CLIENT KILL TYPE replica: $killed); $(label "$primary") ($users test users) takes writes alone for $REPLICA_LAG s"
    [[ "$killed" =~ ^[1-9][0-9]*$ ]]
    check $? "the primary $(label "$primary") dropped its replica's link ($killed)"
    sleep "$REPLICA_LAG"
    off_kill=$(rc_field "$primary" master_repl_offset INFO replication)
    kill -KILL "$ppid"
    t_kill=$EPOCHREALTIME
    kill -CONT "$rpid"
    PAUSED_PID=""
    note "replica_lag_bytes=$((off_kill - off_cut))"
    ((off_kill > off_cut))
    check $? "the replica missed $((off_kill - off_cut)) bytes of replication stream"
    log "SIGKILL $(label "$primary"), SIGCONT $(label "$replica"); waiting for the cluster to promote it"
    if ! wait_until 15 took_over "$replica" >/dev/null; then
        log "not promoted within 15 s: CLUSTER FAILOVER TAKEOVER on $(label "$replica")"
        rc_cli "$replica" CLUSTER FAILOVER TAKEOVER >/dev/null
        takeover=1
        wait_until "$SETTLE_LIMIT" took_over "$replica" >/dev/null
    fi
    took=$(since "$t_kill")
    # From here the replica takes writes: whatever it answers must be kept.
    incident_over
    wait_until "$SETTLE_LIMIT" promoted "$replica" >/dev/null
    check $? "$(label "$replica") is the primary ($(
        ((takeover)) && echo "after CLUSTER FAILOVER TAKEOVER" || echo "promoted by the cluster"
    ) $took s after the SIGKILL), the cluster settled ($(since "$t_kill") s)"
    note "failover_secs=$took"
    note "settled_secs=$(since "$t_kill")"
    note "takeover=$takeover"
    note "users_on_shard=$users"
    note "summary=$(node_name "$replica") missed ${REPLICA_LAG} s ($((off_kill - off_cut)) B) of $(node_name "$primary") ($users users); promoted $took s after the SIGKILL$( ((takeover == 0)) || echo " (TAKEOVER)")"
    wait_topology_seen "$topo"
    # Back as the new primary's replica, the old primary drops what the new one lacks (a full
    # resync); with --min-replicas-ack the shard needs it to answer appends again.
    rejoin "$primary" "$replica"
}

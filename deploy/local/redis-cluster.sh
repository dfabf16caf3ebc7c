# Reading a local Redis Cluster's state with redis-cli, for deploy/local/up.sh --cluster and the
# fault suite (deploy/faults/run.sh --cluster). Sourced, not run; every node is on 127.0.0.1.
# Nothing here exits or relies on `set -e`: each function's status says what it found.
# shellcheck shell=bash

# rc_cli PORT ARG...: redis-cli against the node on PORT (errors on stdout too, no \r), given up
# after 5 s (a frozen node accepts the connection and never answers).
rc_cli() { timeout -k 1 5 redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>&1 | tr -d '\r'; }

# rc_field PORT FIELD ARG...: one `FIELD:value` of what `ARG...` answers (INFO, CLUSTER INFO).
rc_field() { rc_cli "$1" "${@:3}" | awk -F: -v f="$2" '$1 == f { print $2; exit }'; }

# rc_ping PORT: the node answers PONG (not LOADING, not refused).
rc_ping() { [[ "$(rc_cli "$1" PING)" == PONG ]]; }

# node_view PORT: what node PORT says of the cluster and of its replication, in one call:
# CLUSTER INFO and INFO replication (`field:value` lines), then CLUSTER NODES.
node_view() {
    printf 'CLUSTER INFO\nINFO replication\nCLUSTER NODES\n' |
        timeout -k 1 5 redis-cli -h 127.0.0.1 -p "$1" 2>&1 | tr -d '\r'
}
# view_field VIEW FIELD: a `FIELD:value` of a node_view.
view_field() { awk -F: -v f="$2" '$1 == f { print $2; exit }' <<<"$1"; }

# view_table VIEW: the cluster as a node_view (or CLUSTER NODES) has it, one line per node:
#   port id role master_port state slots
# role is `primary` or `replica`; master_port is a replica's primary (`-` for a primary); state
# is `ok`, `pfail` (fail?), `fail`, `handshake` or `noaddr`; slots is the node's slot ranges,
# comma-separated (`-` for none; the asked node's own line also shows open migrations,
# `[slot->-id]`).
view_table() {
    awk '
        NF >= 8 && length($1) == 40 && $1 ~ /^[0-9a-f]+$/ {
            split($2, a, "@"); n = split(a[1], hp, ":"); port[$1] = hp[n]
            k++; id[k] = $1; flags[k] = $3; master[k] = $4
            s = ""
            for (i = 9; i <= NF; i++) s = s (s == "" ? "" : ",") $i
            slots[k] = (s == "" ? "-" : s)
        }
        END {
            for (r = 1; r <= k; r++) {
                f = flags[r]
                role = (f ~ /master/) ? "primary" : "replica"
                state = "ok"
                if (f ~ /fail\?/) state = "pfail"
                else if (f ~ /(^|,)fail(,|$)/) state = "fail"
                else if (f ~ /handshake/) state = "handshake"
                else if (f ~ /noaddr/) state = "noaddr"
                mp = (role == "replica" && (master[r] in port)) ? port[master[r]] : "-"
                print port[id[r]], id[r], role, mp, state, slots[r]
            }
        }' <<<"$1" | sort -n
}
# cluster_table PORT: view_table as node PORT sees it.
cluster_table() { view_table "$(rc_cli "$1" CLUSTER NODES)"; }

# cluster_primaries PORT: the ports of the primaries serving slots, as node PORT sees them.
cluster_primaries() { cluster_table "$1" | awk '$3 == "primary" && $6 != "-" { print $1 }'; }

# cluster_replica_of PORT PRIMARY: the port of a replica of PRIMARY, as node PORT sees it.
cluster_replica_of() { cluster_table "$1" | awk -v p="$2" '$3 == "replica" && $4 == p { print $1; exit }'; }

# cluster_owner PORT SLOT: the port of the primary serving SLOT, as node PORT sees it.
cluster_owner() {
    cluster_table "$1" | awk -v s="$2" '$3 == "primary" {
        n = split($6, r, ",")
        for (i = 1; i <= n; i++) {
            if (r[i] ~ /^\[/) continue
            m = split(r[i], b, "-"); lo = b[1]; hi = (m > 1 ? b[2] : b[1])
            if (s + 0 >= lo + 0 && s + 0 <= hi + 0) { print $1; exit }
        }
    }'
}

# cluster_settled PORT...: the running nodes PORT... form a settled cluster: each answers and
# says cluster_state:ok with all 16384 slots served, they agree on which primary serves which
# slots, every slot's primary is one of them, none of them is seen failed or still handshaking,
# no slot is being migrated, and each replica among them is in sync with its primary. Nodes not
# listed (stopped ones) may be seen failed. Prints what is not yet so, and fails, if anything.
cluster_settled() {
    local port p state view table owners="" first=""
    for port in "$@"; do
        view=$(node_view "$port")
        [[ "$(view_field "$view" cluster_state)" == ok ]] ||
            { echo "127.0.0.1:$port: cluster_state is not ok"; return 1; }
        [[ "$(view_field "$view" cluster_slots_ok)" == 16384 ]] ||
            { echo "127.0.0.1:$port: not every slot is served"; return 1; }
        table=$(view_table "$view")
        if grep -q '\[' <<<"$table"; then
            echo "127.0.0.1:$port has a slot being migrated"
            return 1
        fi
        owners=$(awk '$3 == "primary" && $6 != "-" { print $1, $6 }' <<<"$table")
        if [[ -z "$first" ]]; then
            first=$owners
        elif [[ "$owners" != "$first" ]]; then
            echo "127.0.0.1:$port disagrees on the slot owners: $owners / $first"
            return 1
        fi
        while read -r p state; do
            [[ " $* " != *" $p "* ]] || { echo "127.0.0.1:$port sees running 127.0.0.1:$p as $state"; return 1; }
        done < <(awk '$5 != "ok" { print $1, $5 }' <<<"$table")
        while read -r p _; do
            [[ " $* " == *" $p "* ]] || { echo "slots are served by stopped 127.0.0.1:$p"; return 1; }
        done <<<"$owners"
        if [[ "$(view_field "$view" role)" == slave ]]; then
            [[ "$(view_field "$view" master_link_status)" == up &&
                "$(view_field "$view" master_sync_in_progress)" == 0 ]] ||
                { echo "replica 127.0.0.1:$port is not in sync with its primary"; return 1; }
        fi
    done
}

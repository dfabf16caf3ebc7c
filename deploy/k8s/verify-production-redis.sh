#!/usr/bin/env bash
# Runs a real gateway with exactly the Redis settings of the production overlay
# (deploy/k8s/overlays/production) against a local Redis with TLS only and an ACL user, and checks
# that it works. Run from anywhere:
#
#   bash deploy/k8s/verify-production-redis.sh [standalone] [cluster]     (both by default)
#
# For each target it:
#   1. renders the overlay (`kubectl kustomize`, as deploy/check.sh does) and takes from the
#      gateway container its FERRY_REDIS_* variables (ConfigMap keys resolved) and the Secret
#      volumes mounted into it; checks the mounts are readOnly, readable by the pod's fsGroup and
#      not by others, and that the URL carries a user but no password;
#   2. makes a CA, a server certificate for IP:127.0.0.1 and a client certificate (openssl);
#   3. starts redis-server with TLS only (`port 0`) on free loopback ports, the `default` user
#      off, an admin user for this script and the gateway's ACL user exactly as written in
#      docs/OPERATIONS.md (the `ACL SETUSER ferry …` line); for `cluster`, three primaries with a
#      replica each, joined by `redis-cli --cluster create --tls` (TLS on the bus and replication);
#   4. writes the Secret's files (`password`, `ca.crt`; `tls.crt`/`tls.key` if the overlay's mTLS
#      lines are uncommented, and then Redis requires client certificates) under a temporary
#      root that mirrors the mount paths, with the volume's mode, and points the path variables
#      there; replaces the URL's host:port with the local server's (scheme, user and path stay);
#   5. runs the gateway (target/debug/ferry-gateway, or $FERRY_GATEWAY_BIN) with those variables
#      only, plus loopback listeners and a JWT secret, in an otherwise empty environment; waits
#      for /readyz to answer 200; sends messages through it with ferry-loadtest when it is built
#      (every one verified delivered once, in order, some after a reconnect); checks that no live
#      channel stays subscribed once every client has left, that Redis's ACL LOG recorded no
#      refusal, and that the password is in neither the gateway's log nor its command line nor
#      its environment;
#   6. stops what it started, by PID, and removes its temporary directory.
#
# `standalone` sets FERRY_REDIS_CLUSTER=false (a standalone server has no CLUSTER SLOTS); all
# else is the overlay's. `cluster` uses the overlay's variables unchanged.
# Knobs: FERRY_GATEWAY_BIN, FERRY_LOADTEST_BIN (binaries), FERRY_VERIFY_OVERLAY (another overlay
# directory), FERRY_VERIFY_LOG (the gateway's FERRY_LOG), FERRY_VERIFY_KEEP=1 (keep the files).
# Needs kubectl (deploy/check.sh installs it), python3 with PyYAML, openssl, curl, and
# redis-server/redis-cli 7 or later built with TLS (Debian's are).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OVERLAY=${FERRY_VERIFY_OVERLAY:-$HERE/overlays/production}
OPERATIONS="$ROOT/docs/OPERATIONS.md"
GATEWAY=${FERRY_GATEWAY_BIN:-$ROOT/target/debug/ferry-gateway}
LOADTEST=${FERRY_LOADTEST_BIN:-$ROOT/target/debug/ferry-loadtest}
PY=${PYTHON:-python3}

log() { printf 'verify: %s\n' "$*"; }
die() { printf 'verify: FAIL: %s\n' "$*" >&2; exit 1; }

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(standalone cluster)
for t in "${targets[@]}"; do
    [[ $t == standalone || $t == cluster ]] || die "usage: $0 [standalone] [cluster]"
done
for tool in kubectl openssl curl redis-server redis-cli "$PY"; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ -x $GATEWAY ]] || die "no gateway binary at $GATEWAY (cargo build -p ferry-gateway)"

TMP=$(mktemp -d)
PIDS=()
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
# FERRY_VERIFY_KEEP=1 keeps the directory (logs, certificates, Redis files) for a look.
trap 'stop_all; if [[ ${FERRY_VERIFY_KEEP:-0} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi' EXIT

# --- 1. the overlay's settings ------------------------------------------------------------------
kubectl kustomize "$OVERLAY" >"$TMP/rendered.yaml" || die "kubectl kustomize $OVERLAY failed"
"$PY" - "$TMP/rendered.yaml" >"$TMP/settings.tsv" <<'PY' || die "the overlay's Redis settings are not usable (above)"
import sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployment = next(d for d in docs if d["kind"] == "Deployment")
config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
pod = deployment["spec"]["template"]["spec"]
container = next(c for c in pod["containers"] if c["name"] == "gateway")
security = pod.get("securityContext", {})
volumes = {v["name"]: v for v in pod.get("volumes", [])}
bad = []

env = {}
if container.get("envFrom"):
    bad.append("envFrom is not handled here; name each FERRY_REDIS_* variable in env")
for e in container.get("env", []):
    if not e["name"].startswith("FERRY_REDIS"):
        continue
    source = e.get("valueFrom", {})
    if "value" in e:
        env[e["name"]] = e["value"]
    elif "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        env[e["name"]] = config_maps[ref["name"]][ref["key"]]
    else:
        bad.append(f"{e['name']}: only literal values and ConfigMap keys are handled here")

files = []
for mount in container.get("volumeMounts", []):
    secret = volumes[mount["name"]].get("secret")
    if secret is None:
        continue
    if not mount.get("readOnly"):
        bad.append(f"volumeMount {mount['name']} is not readOnly")
    if mount.get("subPath"):
        bad.append(f"volumeMount {mount['name']} uses subPath (no updates, not handled here)")
    if not secret.get("items"):
        bad.append(f"volume {mount['name']}: list the Secret's items, so only they are mounted")
    for item in secret.get("items", []):
        mode = item.get("mode", secret.get("defaultMode", 0o644))
        # Secret files are owned by root; with fsGroup their group is fsGroup (Kubernetes also
        # adds group read). The gateway runs as runAsUser with fsGroup as a supplementary group.
        if security.get("runAsUser", 0) != 0 and not (security.get("fsGroup") and mode & 0o040):
            bad.append(f"{item['key']}: mode {mode:#o} with fsGroup {security.get('fsGroup')} "
                       f"is not readable by uid {security.get('runAsUser')}")
        if mode & 0o007:
            bad.append(f"{item['key']}: mode {mode:#o} lets every user read it")
        path = mount["mountPath"].rstrip("/") + "/" + item["path"]
        files.append((secret["secretName"], item["key"], path, mode))

url = env.get("FERRY_REDIS_URL", "")
for u in filter(None, (s.strip() for s in url.split(","))):
    scheme, _, rest = u.partition("://")
    authority = rest.split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    if scheme != "rediss":
        bad.append(f"{u}: not rediss:// (TLS)")
    if not userinfo or ":" in userinfo:
        bad.append(f"{u}: the URL must name the ACL user and carry no password")
if not url:
    bad.append("no FERRY_REDIS_URL")
mounted = {path for _, _, path, _ in files}
for name in ("FERRY_REDIS_PASSWORD_FILE", "FERRY_REDIS_CA_FILE", "FERRY_REDIS_CLIENT_CERT",
             "FERRY_REDIS_CLIENT_KEY"):
    if name in env and env[name] not in mounted:
        bad.append(f"{name}={env[name]} is no file of a mounted Secret ({sorted(mounted)})")
if "FERRY_REDIS_PASSWORD_FILE" not in env:
    bad.append("no FERRY_REDIS_PASSWORD_FILE")

for b in bad:
    print(f"verify: FAIL: overlay: {b}", file=sys.stderr)
if bad:
    sys.exit(1)
for name, value in sorted(env.items()):
    print(f"env\t{name}\t{value}")
for secret, key, path, mode in files:
    print(f"file\t{secret}\t{key}\t{path}\t{mode:o}")
PY

declare -A OVERLAY_ENV=()
FILES=()
while IFS=$'\t' read -r kind a b c d; do
    case $kind in
        env) OVERLAY_ENV[$a]=$b ;;
        file) FILES+=("$a"$'\t'"$b"$'\t'"$c"$'\t'"$d") ;;
    esac
done <"$TMP/settings.tsv"
log "overlay: $(for k in "${!OVERLAY_ENV[@]}"; do printf '%s=%s ' "$k" "${OVERLAY_ENV[$k]}"; done)"
for f in "${FILES[@]}"; do
    IFS=$'\t' read -r secret key path mode <<<"$f"
    log "overlay: Secret $secret key $key -> $path (mode 0$mode, readOnly)"
done
MTLS=false
[[ -n ${OVERLAY_ENV[FERRY_REDIS_CLIENT_CERT]:-} ]] && MTLS=true
USER_NAME=$("$PY" -c '
import sys
u = sys.argv[1].split(",")[0].strip()
print(u.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0])' "${OVERLAY_ENV[FERRY_REDIS_URL]}")

# The ACL rule from docs/OPERATIONS.md: the line `ACL SETUSER <user> ... >CHANGE-ME ...`.
ACL_LINE=$(grep -m1 -E "^ACL SETUSER $USER_NAME " "$OPERATIONS" || true)
[[ -n $ACL_LINE ]] || die "no 'ACL SETUSER $USER_NAME …' line in docs/OPERATIONS.md"
[[ $ACL_LINE == *'>CHANGE-ME'* ]] || die "the ACL line in docs/OPERATIONS.md has no '>CHANGE-ME' password"

# --- 2. certificates ---------------------------------------------------------------------------
CERTS="$TMP/certs"
mkdir -p "$CERTS"
ossl() { openssl "$@" >/dev/null 2>"$TMP/openssl.err" || die "openssl $1: $(cat "$TMP/openssl.err")"; }
CURVE=ec_paramgen_curve:prime256v1
ossl req -x509 -newkey ec -pkeyopt "$CURVE" -nodes -days 2 -subj "/CN=Ferry verify CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt"
sign() { # name, common name, extensions
    ossl req -newkey ec -pkeyopt "$CURVE" -nodes -subj "/CN=$2" \
        -keyout "$CERTS/$1.key" -out "$CERTS/$1.csr"
    printf '%b' "$3" >"$CERTS/$1.ext"
    ossl x509 -req -days 2 -in "$CERTS/$1.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
        -CAcreateserial -extfile "$CERTS/$1.ext" -out "$CERTS/$1.crt"
}
# Redis nodes also present the server certificate as clients of one another (cluster bus).
sign server localhost 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n'
sign client ferry-gateway 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n'
PASSWORD=$(openssl rand -hex 24)
ADMIN_PASSWORD=$(openssl rand -hex 24)
JWT_SECRET=$(openssl rand -hex 32)
log "certificates: CA, server (IP:127.0.0.1), client; ACL user '$USER_NAME' with a random password"

free_ports() { # count
    "$PY" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

cli() { # port, args...: redis-cli as the admin user over TLS
    local port=$1
    shift
    local client=()
    $MTLS && client=(--cert "$CERTS/client.crt" --key "$CERTS/client.key")
    REDISCLI_AUTH=$ADMIN_PASSWORD redis-cli --no-auth-warning --tls --cacert "$CERTS/ca.crt" \
        "${client[@]}" -h 127.0.0.1 -p "$port" --user admin "$@"
}

# --- 3. Redis ----------------------------------------------------------------------------------
start_redis() { # dir, tls port, [cluster bus port]
    local dir=$1 port=$2 bus=${3:-}
    mkdir -p "$dir"
    {
        echo "user default off"
        echo "user admin on >$ADMIN_PASSWORD ~* &* +@all"
        # The documented rule, as an ACL file line: `user <name> <rules…>`.
        echo "user ${ACL_LINE#ACL SETUSER }" | sed "s/>CHANGE-ME/>$PASSWORD/"
    } >"$dir/users.acl"
    {
        echo "port 0"
        echo "bind 127.0.0.1"
        echo "tls-port $port"
        echo "tls-cert-file $CERTS/server.crt"
        echo "tls-key-file $CERTS/server.key"
        echo "tls-ca-cert-file $CERTS/ca.crt"
        echo "tls-auth-clients $($MTLS && echo yes || echo no)"
        echo "aclfile $dir/users.acl"
        echo "dir $dir"
        echo "logfile $dir/redis.log"
        echo "save \"\""
        echo "appendonly no"
        echo "maxmemory-policy noeviction"
        if [[ -n $bus ]]; then
            echo "cluster-enabled yes"
            echo "cluster-config-file $dir/nodes.conf"
            echo "cluster-port $bus"
            echo "cluster-node-timeout 5000"
            echo "tls-cluster yes"
            echo "tls-replication yes"
            echo "masteruser admin"
            echo "masterauth $ADMIN_PASSWORD"
            # Redis 7.0 lists a replica in CLUSTER SLOTS once its offset moves: ping every second.
            echo "repl-ping-replica-period 1"
        fi
    } >"$dir/redis.conf"
    redis-server "$dir/redis.conf" &
    PIDS+=($!)
    local deadline=$((SECONDS + 20))
    until [[ $(cli "$port" PING 2>/dev/null) == PONG ]]; do
        ((SECONDS < deadline)) || die "redis-server on TLS port $port does not answer: $(tail -5 "$dir/redis.log")"
        sleep 0.1
    done
}

# --- 4 and 5: one target -----------------------------------------------------------------------
verify() { # target
    local target=$1 work="$TMP/$1" ports=()
    mkdir -p "$work"
    if [[ $target == standalone ]]; then
        read -r -a ports <<<"$(free_ports 1)"
        start_redis "$work/redis" "${ports[0]}"
        log "$target: redis-server $(redis-server --version | grep -o 'v=[^ ]*'), TLS only on 127.0.0.1:${ports[0]}, default user off"
    else
        # 3 primaries and a replica each, as a managed service runs them.
        local all
        read -r -a all <<<"$(free_ports 12)"
        ports=("${all[@]:0:6}")
        for i in 0 1 2 3 4 5; do
            start_redis "$work/node$i" "${all[$i]}" "${all[$((i + 6))]}"
        done
        cli "${ports[0]}" --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 1 \
            --cluster-yes >"$work/cluster-create.log" 2>&1 ||
            die "redis-cli --cluster create: $(tail -5 "$work/cluster-create.log")"
        local deadline=$((SECONDS + 30))
        for port in "${ports[@]}"; do
            until cli "$port" CLUSTER INFO 2>/dev/null | grep -q '^cluster_state:ok'; do
                ((SECONDS < deadline)) || die "the cluster did not become ok"
                sleep 0.2
            done
        done
        # Every node in CLUSTER SLOTS (the replicas once they synced), so the gateway sees them.
        until [[ $(cli "${ports[0]}" CLUSTER SLOTS | grep -c '^127\.0\.0\.1$') -ge 6 ]]; do
            ((SECONDS < deadline)) || die "CLUSTER SLOTS does not list every node"
            sleep 0.2
        done
        log "$target: 3 primaries + 3 replicas, TLS only (tls-cluster, tls-replication) on 127.0.0.1:${ports[*]}, default user off; cluster_state:ok"
    fi

    # The Secret's files under a root that mirrors the mount paths.
    local root="$work/root" secret key path mode
    for f in "${FILES[@]}"; do
        IFS=$'\t' read -r secret key path mode <<<"$f"
        mkdir -p "$(dirname "$root$path")"
        case $key in
            password) printf '%s\n' "$PASSWORD" >"$root$path" ;; # as a file from `--from-file` often is
            ca.crt) cp "$CERTS/ca.crt" "$root$path" ;;
            tls.crt) cp "$CERTS/client.crt" "$root$path" ;;
            tls.key) cp "$CERTS/client.key" "$root$path" ;;
            keys) continue ;; # the HTTP API's keys (ferry-api-keys): no Redis setting, not used here
            *) die "no test content for key $key of Secret $secret" ;;
        esac
        chmod "$mode" "$root$path"
    done

    # The gateway's environment: the overlay's FERRY_REDIS_* with paths under the root and the
    # URL's host:port made local.
    local env=(PATH=/usr/bin:/bin FERRY_LOG="${FERRY_VERIFY_LOG:-info}" FERRY_JWT_SECRET="$JWT_SECRET")
    for name in "${!OVERLAY_ENV[@]}"; do
        local value=${OVERLAY_ENV[$name]}
        case $name in
            FERRY_REDIS_URL)
                value=$("$PY" - "$value" "${ports[@]}" <<'PY'
import sys
urls, ports = [u.strip() for u in sys.argv[1].split(",") if u.strip()], sys.argv[2:]
out = []
for i, u in enumerate(urls):
    scheme, rest = u.split("://", 1)
    authority, slash, path = rest.partition("/")
    userinfo, at, _ = authority.rpartition("@")
    out.append(f"{scheme}://{userinfo}{at}127.0.0.1:{ports[i % len(ports)]}{slash}{path}")
print(",".join(out))
PY
                ) ;;
            FERRY_REDIS_CLUSTER) [[ $target == standalone ]] && value=false ;;
            *) [[ $value == /* ]] && value="$root$value" ;;
        esac
        env+=("$name=$value")
    done
    for e in "${env[@]}"; do
        [[ $e == FERRY_REDIS* ]] && log "$target: gateway env $e"
    done

    local gwlog="$work/gateway.log"
    env -i "${env[@]}" "$GATEWAY" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --log-format json --drain-timeout 1s --node-id "verify-$target" >"$gwlog" 2>&1 &
    local gw=$!
    PIDS+=("$gw")
    local admin="" ws="" deadline=$((SECONDS + 30)) status=""
    while [[ -z $admin ]]; do
        kill -0 "$gw" 2>/dev/null || die "$target: the gateway exited: $(tail -20 "$gwlog")"
        ((SECONDS < deadline)) || die "$target: the gateway did not start: $(tail -20 "$gwlog")"
        admin=$(grep -m1 '"gateway serving"' "$gwlog" | grep -o '"admin":"Some([0-9.:]*)"' | grep -oE '[0-9.]+:[0-9]+' || true)
        ws=$(grep -m1 '"gateway serving"' "$gwlog" | grep -o '"listen":"Some([0-9.:]*)"' | grep -oE '[0-9.]+:[0-9]+' || true)
        [[ -n $admin ]] || sleep 0.1
    done
    until [[ $status == 200 ]]; do
        ((SECONDS < deadline)) || die "$target: /readyz answers $status: $(tail -20 "$gwlog")"
        status=$(curl -s -o /dev/null -w '%{http_code}' "http://$admin/readyz" || true)
        [[ $status == 200 ]] || sleep 0.2
    done
    log "$target: gateway pid $gw, ws $ws, admin $admin: GET /readyz -> 200"

    if [[ -x $LOADTEST ]]; then
        local lt="$work/loadtest.log"
        if env -i PATH=/usr/bin:/bin FERRY_JWT_SECRET="$JWT_SECRET" "$LOADTEST" run \
            --url "ws://$ws/v1/ws" -c 40 -r 400 -d 3s -b 64 \
            --offline-fraction 0.25 --offline-at 1s --offline-for 1s --drain 10s >"$lt" 2>&1; then
            grep -E '^(run|messages|verify|errors) ' "$lt" | sed "s/^/verify: $target: ferry-loadtest: /"
            # ferry-loadtest judges the messages answered `sent`; here every send must have been.
            local sent delivered
            sent=$(grep -m1 '^messages ' "$lt" | grep -oE ' sent [0-9]+' | grep -oE '[0-9]+' || echo 0)
            delivered=$(grep -m1 '^messages ' "$lt" | grep -oE 'delivered [0-9]+' | grep -oE '[0-9]+' || echo 0)
            if ! ((sent > 0 && sent == delivered)) || ! grep -q '^errors  *send {} ' "$lt"; then
                die "$target: sends failed or went undelivered (sent $sent, delivered $delivered; above)"
            fi
        else
            cat "$lt" >&2
            die "$target: ferry-loadtest found a problem (above)"
        fi
    else
        log "$target: no ferry-loadtest at $LOADTEST; readiness only (cargo build -p ferry-loadtest for traffic)"
    fi

    # Every client has left: the node must have withdrawn every live subscription.
    local left="" deadline=$((SECONDS + 10))
    while :; do
        left=""
        for port in "${ports[@]}"; do
            local channels
            channels=$(cli "$port" PUBSUB CHANNELS '*'; cli "$port" PUBSUB SHARDCHANNELS '*')
            [[ -z ${channels//[[:space:]]/} ]] || left+=" 127.0.0.1:$port: $(grep -c . <<<"$channels")"
        done
        if [[ -z $left ]] || ((SECONDS >= deadline)); then
            break
        fi
        sleep 0.2
    done
    [[ -z $left ]] ||
        die "$target: live channels still subscribed after every client left (node: count):$left"
    log "$target: no live channel left subscribed after every client left"

    local refused=""
    for port in "${ports[@]}"; do
        local acl
        acl=$(cli "$port" ACL LOG)
        [[ -z ${acl//[[:space:]]/} ]] || refused+=$'\n'"127.0.0.1:$port: $acl"
    done
    [[ -z $refused ]] || die "$target: Redis refused the gateway's user (ACL LOG):$refused"
    log "$target: ACL LOG empty on every node: the documented ACL rule allowed everything the gateway did"

    local counts=""
    for port in "${ports[@]}"; do
        local list
        list=$(cli "$port" CLIENT LIST | grep " user=$USER_NAME " || true)
        counts+=" 127.0.0.1:$port $(grep -c . <<<"$list" || true)"
        counts+=" ($(grep -c ' name=ferry-live ' <<<"$list" || true) named ferry-live);"
    done
    log "$target: connections of user $USER_NAME:$counts"

    local where
    for where in "$gwlog" "/proc/$gw/cmdline" "/proc/$gw/environ"; do
        if tr '\0' '\n' <"$where" | grep -qF "$PASSWORD"; then
            die "$target: the Redis password appears in $where"
        fi
    done
    log "$target: the password is in neither the gateway's log ($(wc -l <"$gwlog") lines) nor its command line nor its environment"
    if grep -q '"level":"\(ERROR\|WARN\)"' "$gwlog"; then
        log "$target: gateway warnings and errors:"
        grep '"level":"\(ERROR\|WARN\)"' "$gwlog" | cut -c1-300 | sed 's/^/  /'
    fi
    stop_all
    log "$target: OK (gateway and redis-server stopped)"
}

for t in "${targets[@]}"; do
    verify "$t"
done
log "all passed: ${targets[*]}"

